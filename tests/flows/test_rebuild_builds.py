"""The rebuild as users run it: versioned builds, reuse across builds, a killed build, two rebuilds
at once, and the whole flow on S3."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from salient import builds, cli, config, storage, world
from tests.browser import broken_images, browser  # noqa: F401 -- session fixture: headless Chromium
from tests.helpers import make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(base: str, ckpt: str, shard_size: int = 10, evaluate: bool = True) -> config.Config:
    models = f"[{{name: tiny, arch: tiny_resnet, checkpoint: {ckpt}}}]" if evaluate else "[]"
    return config.load(None, [
        f"dataset.root={base}/world/train", f"dataset.class_metadata={base}/world/classes.csv",
        f"model.checkpoint={ckpt}", "model.arch=tiny_resnet", "model.format=robustness",
        "preprocess.resize=32", "preprocess.crop=32", f"output={base}/out",
        f"compute.shard_size={shard_size}", "compute.gpus_per_worker=0", "aggregate.features_per_class=2",
        "discover.images_per_pair=3", "discover.attack_steps=3", "aggregate.grouping=label",
        "generalize.images_per_pair=4", "generalize.masks_per_shard=5",
        f"evaluate.models={models}", "evaluate.sigmas=[0.5]",
    ])


def _write_config(cfg: config.Config, path: str) -> str:
    storage.write_bytes_atomic(path, config.to_yaml(cfg).encode())
    return path


@pytest.fixture
def pipeline(tmp_path):
    world.synthesize(str(tmp_path / "world"), classes=3, per_class=8, size=32, seed=0)
    cfg = _config(str(tmp_path), make_checkpoint(tmp_path / "tiny.pt", num_classes=3))
    return cfg, _write_config(cfg, str(tmp_path / "salient.yaml"))


def test_rebuilds_reuse_everything_then_only_what_changed(pipeline, ray_session, prefect_server, browser, capsys):  # noqa: F811
    from flows.rebuild import rebuild_flow

    cfg, path = pipeline
    root = cfg.output
    t0 = time.perf_counter()
    first = rebuild_flow(cfg)
    t_first = time.perf_counter() - t0
    assert first["published"] and builds.read_pointer(root, "latest") == first["build_id"]
    manifest = storage.read_json(storage.join(first["build"], builds.MANIFEST))
    assert manifest["counts"]["images"] == 24 and manifest["counts"]["pairs"] == 6
    assert manifest["counts"]["spurious_pairs"] + manifest["counts"]["core_pairs"] + manifest["counts"]["pending_pairs"] == 6
    assert set(manifest["seconds"]) == set(first["stages"]) and manifest["software"]["salient"]
    assert "pairs.parquet" in manifest["tables"] and "masks/index.parquet" in manifest["tables"]
    for table in ("pairs.parquet", "annotations/labels.parquet", "masks/index.parquet", "evaluation/summary.parquet"):
        assert storage.parquet_metadata(storage.join(first["build"], table))["build_id"] == first["build_id"]

    # the report, opened in a real browser: every picture loads
    browser.get("file://" + first["stages"]["report"]["report"])
    n_images = browser.execute_script("return document.images.length;")
    labelled = manifest["counts"]["spurious_pairs"] + manifest["counts"]["core_pairs"]
    assert n_images >= 6 * 3 + labelled + 1, "three strips per pair, a mask strip per labelled pair, a chart"
    assert broken_images(browser) == []

    t0 = time.perf_counter()
    second = rebuild_flow(cfg)
    t_second = time.perf_counter() - t0
    print(f"rebuild with nothing changed: {t_second:.1f}s vs {t_first:.1f}s first ({t_second / t_first:.2f})", file=sys.stderr)
    assert second["build_id"] != first["build_id"] and builds.read_pointer(root, "latest") == second["build_id"]
    stages = second["stages"]
    assert stages["activations"]["computed_shards"] == 0
    assert (stages["discover"]["made"], stages["discover"]["reused"]) == (0, 6)
    assert stages["generalize"]["computed_blocks"] == 0
    assert stages["evaluate"]["reused"] == 1
    for table in ("pairs.parquet", "masks/index.parquet"):
        a, b = (storage.read_parquet(storage.join(r["build"], table)) for r in (first, second))
        assert a.equals(b)
    # published builds stay as they were
    assert storage.read_json(storage.join(first["build"], builds.MANIFEST)) == manifest

    # one more image in class 1: only that class's shard is computed again
    wnid = world.wnid_of(1)
    src = sorted(glob.glob(f"{cfg.dataset.root}/{wnid}/*.JPEG"))[0]
    with open(src, "rb") as fh, open(f"{cfg.dataset.root}/{wnid}/{wnid}_99999.JPEG", "wb") as out:
        out.write(fh.read())
    third = rebuild_flow(cfg, ["activations"])
    assert third["stages"]["activations"]["computed_shards"] == 1 and third["stages"]["activations"]["images"] == 25

    # a new checkpoint: every shard again
    cfg.model.checkpoint = make_checkpoint(os.path.join(os.path.dirname(root), "other.pt"), num_classes=3, seed=1)
    fourth = rebuild_flow(cfg, ["activations"])
    assert fourth["stages"]["activations"]["computed_shards"] == fourth["stages"]["activations"]["shards"] == 3

    capsys.readouterr()
    assert cli.main(["builds", root]) == 0
    listing = capsys.readouterr().out
    assert f"{second['build_id']}  complete" in listing and "latest" in listing and "unfinished" in listing
    assert cli.main(["gc", root, "--keep", "1"]) == 0
    assert builds.read_pointer(root, "latest") == second["build_id"]
    assert not os.path.exists(first["build"]) and os.path.exists(second["build"])
    assert os.path.exists(storage.join(builds.incoming(root), "simulated.csv")), "gc never touches answers"


def _spawn(path: str, log: str) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PYTHONPATH": ROOT, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "salient.cli", "run", path], env=env, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_killed_build_leaves_latest_and_concurrent_rebuilds_cannot_both_publish(tmp_path, prefect_server):
    world.synthesize(str(tmp_path / "world"), classes=3, per_class=8, size=32, seed=0)
    cfg = _config(str(tmp_path), make_checkpoint(tmp_path / "tiny.pt", num_classes=3), shard_size=2, evaluate=False)
    path = _write_config(cfg, str(tmp_path / "salient.yaml"))
    root = cfg.output

    # two rebuilds started together: one publishes, the other stops with a clear message
    a, b = _spawn(path, str(tmp_path / "a.log")), _spawn(path, str(tmp_path / "b.log"))
    codes = sorted([a.wait(timeout=600), b.wait(timeout=600)])
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert codes == [0, cli.EXIT_BUSY], logs
    assert "another rebuild holds" in logs and logs.count("published as latest") == 1
    published = builds.read_pointer(root, "latest")
    assert len(builds.list_builds(root)) == 1

    # a rebuild killed once its first shard is in: latest stays on the complete build
    os.remove(os.path.join(root, "current"))  # a fresh build, so the shards are taken from the cache or computed
    for entry in glob.glob(f"{root}/cache/activations/*"):
        os.remove(entry) if os.path.isfile(entry) else None
    proc = _spawn(path, str(tmp_path / "killed.log"))
    deadline = time.monotonic() + 300
    while not glob.glob(f"{root}/cache/activations/*.json") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    _kill(proc)
    assert glob.glob(f"{root}/cache/activations/*.json"), (tmp_path / "killed.log").read_text()
    assert builds.read_pointer(root, "latest") == published
    killed = builds.read_pointer(root, "current")
    assert killed != published and not builds.is_complete(root, killed)
    cached_before = len(glob.glob(f"{root}/cache/activations/*.json"))

    # the next run takes the expired lease only once it expires: shorten the wait by releasing it
    newest = max(glob.glob(f"{root}/lease/*.json"))
    body = json.loads(open(newest).read())
    body["expires"] = 0
    open(newest, "w").write(json.dumps(body))
    resumed = _spawn(path, str(tmp_path / "resumed.log"))
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()
    assert builds.read_pointer(root, "latest") == killed, "the killed build was resumed and published"
    stats = [json.loads(open(p).read()) for p in glob.glob(f"{root}/builds/{killed}/activations/part-*.json")]
    assert len(stats) == 12 and sum("cache_entry" in s for s in stats) == 12
    assert cached_before >= 1


def test_the_whole_flow_on_s3(s3_server, ray_session, prefect_server, tmp_path, capsys, caplog):
    from flows.rebuild import rebuild_flow

    base = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"
    world.synthesize(f"{base}/world", classes=3, per_class=8, size=32, seed=0)
    ckpt = make_checkpoint(tmp_path / "tiny.pt", num_classes=3)
    storage.write_bytes_atomic(f"{base}/tiny.pt", open(ckpt, "rb").read())
    cfg = _config(base, f"{base}/tiny.pt")
    result = rebuild_flow(cfg)
    assert result["published"] and builds.read_pointer(cfg.output, "latest") == result["build_id"]
    manifest_text = storage.read_bytes(storage.join(result["build"], builds.MANIFEST)).decode()
    counts = json.loads(manifest_text)["counts"]
    assert counts["images"] == 24 and counts["masks"] > 0
    again = rebuild_flow(cfg)
    assert again["stages"]["activations"]["computed_shards"] == 0 and again["stages"]["generalize"]["computed_blocks"] == 0
    from salient.dataset import SalientMasks

    masks = SalientMasks(cfg.output)
    assert masks.out == again["build"] and len(masks) == counts["masks"]
    seen = manifest_text + capsys.readouterr().out + caplog.text + config.to_yaml(cfg)
    assert s3_server.secret not in seen and s3_server.key not in seen
