"""Session-wide test settings: local-run environment defaults (docs/design.md §4), and the CPU
for every test (the CUDA paths are checked against it by ``python -m benchmarks.gpu``)."""

import os
import tempfile

# Before anything starts CUDA. The session's Ray gives its GPU workers their own device
# (tests/flows/test_activations_flow.py); the CPU-only ones stay on the CPU (tasks/ray_pool.py).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest

from salient import config
from salient.cli import apply_env_defaults
from tests.s3server import s3_server  # noqa: F401 -- session fixture: a local S3 server
from tests.helpers import make_checkpoint, make_image_folder

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="salient-test-prefect-"))
apply_env_defaults()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole session, declaring 2 GPUs on this CPU machine so GPU scheduling
    is exercised: workers asking for a GPU each get their own CUDA_VISIBLE_DEVICES and fall back to the CPU.
    It starts after the S3 test server, so its workers inherit the variables that reach that server."""
    import ray

    hidden = os.environ.pop("CUDA_VISIBLE_DEVICES")  # Ray refuses to declare GPUs none of which is visible
    try:
        ray.init(
            address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
            runtime_env={"env_vars": {"PYTHONPATH": ROOT}},
        )
    finally:
        os.environ["CUDA_VISIBLE_DEVICES"] = hidden
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def activation_world(tmp_path):
    """3 classes x 8 random JPEGs plus one zero-byte file, a random tiny_resnet, shards of 5."""
    rels = make_image_folder(tmp_path / "data", classes=3, per_class=8, size=(32, 36))
    (tmp_path / "data" / "n0001" / "zero.JPEG").write_bytes(b"")
    ckpt = make_checkpoint(tmp_path / "tiny.pt", num_classes=3)
    cfg = config.load(None, [
        f"dataset.root={tmp_path / 'data'}", f"model.checkpoint={ckpt}", "model.arch=tiny_resnet",
        "preprocess.resize=32", "preprocess.crop=32", f"output={tmp_path / 'out'}",
        "compute.shard_size=5", "compute.batch_size=4",
    ])
    return cfg, sorted(rels + ["n0001/zero.JPEG"])
