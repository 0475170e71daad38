"""The clean build every fault test compares with."""

import pytest

from salient import world
from tests.faults import Reference, build_tables, fault_config
from tests.helpers import make_checkpoint


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, ray_session, prefect_server) -> Reference:
    """The clean build every fault test compares with, made once per session."""
    from flows.rebuild import rebuild_flow

    base = tmp_path_factory.mktemp("faults-reference")
    world_dir = str(base / "world")
    world.synthesize(world_dir, classes=3, per_class=8, size=32, seed=0)
    ckpt = make_checkpoint(base / "tiny.pt", num_classes=3)
    result = rebuild_flow(fault_config(world_dir, ckpt, str(base / "out")))
    tables = build_tables(str(base / "out"), result["build"])
    assert tables["masks/index.parquet"], "the clean build has masks"
    return Reference(world_dir, ckpt, str(base / "out"), result["build"], tables)
