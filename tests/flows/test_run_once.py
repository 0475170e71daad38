"""Once per run: one pre-flight that reads the checkpoint once, one Ray session, one flow run; and
errors by kind: a user's mistake is one line with its exit code, a bug says so and where its
traceback is."""

import os
import re
from collections import Counter

import pytest

from salient import cli, config, models, storage
from salient.errors import InputError
from tests.helpers import tiny_pipeline


@pytest.fixture
def pipeline_config(tmp_path) -> str:
    path = str(tmp_path / "salient.yaml")
    storage.write_bytes_atomic(path, config.to_yaml(tiny_pipeline(tmp_path)).encode())
    return path


def test_a_run_reads_the_checkpoint_once_and_starts_ray_once(pipeline_config, ray_session, prefect_server, monkeypatch, capsys):
    import flows.rebuild
    import tasks.ray_pool

    counts: Counter = Counter()
    read, digest, session, flow = models.checkpoint_bytes, storage.sha256, tasks.ray_pool.ray_cluster, flows.rebuild.rebuild_flow

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(models, "checkpoint_bytes", counting("checkpoint read", read))
    monkeypatch.setattr(storage, "sha256", lambda uri, *a: counting(f"sha256 {os.path.basename(uri)}", digest)(uri, *a))
    monkeypatch.setattr(tasks.ray_pool, "ray_cluster", counting("ray session", session))
    monkeypatch.setattr(flows.rebuild, "rebuild_flow", counting("flow run", flow))

    assert cli.main(["run", pipeline_config]) == 0
    assert counts == {"checkpoint read": 1, "ray session": 1, "flow run": 1}, "one read hashes and loads it; every stage shares one Ray"

    counts.clear()
    assert cli.main(["run", pipeline_config]) == 0
    out = capsys.readouterr().out
    assert "discover: 6 pairs (0 made, 6 reused)" in out and "(0 computed)" in out
    assert counts["checkpoint read"] == 1 and counts["flow run"] == 1 and counts["ray session"] <= 1
    assert not any(k.startswith("sha256 tiny.pt") for k in counts), "the pre-flight's digest is passed on"


def test_a_bug_inside_a_stage_says_so_and_where_its_traceback_is(pipeline_config, prefect_server, monkeypatch, capsys):
    from salient import report

    def broken(build: str, title: str = "") -> str:
        return {}["missing"]

    monkeypatch.setattr(report, "read_inputs", broken)
    assert cli.main(["report", pipeline_config]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "internal error, a bug in Salient" in err and "KeyError: 'missing'" in err and "config error" not in err
    path = re.search(r"the traceback is in (\S+);", err).group(1)
    trace = open(path).read()
    assert "Traceback" in trace and "def broken" not in trace and "in broken" in trace
    os.remove(path)

    def refused(build: str, title: str = "") -> str:
        raise InputError("the build has no pairs; run `salient aggregate CONFIG` first")

    monkeypatch.setattr(report, "read_inputs", refused)
    assert cli.main(["report", pipeline_config]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "salient: error: the build has no pairs; run `salient aggregate CONFIG` first"
