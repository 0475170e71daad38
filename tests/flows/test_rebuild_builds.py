"""The rebuild as users run it: versioned builds, reuse across builds, a killed build, two rebuilds
at once, and the whole flow on S3."""

import glob
import json
import os
import sys
import time
import uuid

import pytest

from salient import builds, cli, config, storage, world
from salient.errors import Busy
from tests.browser import broken_images, browser  # noqa: F401 -- session fixture: headless Chromium
from tests.faults import kill_group, spawn_run
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


def _answer(root: str, name: str, pair: dict) -> None:
    """One more worker's answer for ``pair``, dropped where late answers arrive."""
    row = ["late-worker", pair["wnid"], pair["class_index"], pair["feature_index"], pair["feature_rank"], "background", "4", "the backdrop"]
    header = "WorkerId,Input.wordnet_id,Input.class_index,Input.feature_index,Input.feature_rank,Answer.main,Answer.confidence,Answer.reasons\n"
    storage.write_bytes_atomic(storage.join(builds.incoming(root), name), (header + ",".join(map(str, row)) + "\n").encode())


def test_rebuilds_reuse_everything_then_only_what_changed(pipeline, ray_session, prefect_server, browser, capsys):  # noqa: F811
    from flows.rebuild import rebuild_flow

    cfg, path = pipeline
    cfg.annotations.min_answers = 6  # the 5 simulated answers per pair are not enough: every pair is pending
    root = cfg.output
    t0 = time.perf_counter()
    first = rebuild_flow(cfg)
    t_first = time.perf_counter() - t0
    assert first["published"] and builds.read_pointer(root, "latest") == first["build_id"]
    manifest = storage.read_json(storage.join(first["build"], builds.MANIFEST))
    counts = manifest["counts"]
    assert (counts["images"], counts["pairs"], counts["pending_pairs"], counts["masks"]) == (24, 6, 6, 0)
    assert set(manifest["seconds"]) == set(first["stages"]) and manifest["software"]["salient"]
    assert {"pairs.parquet", "annotations/labels.parquet", "masks/index.parquet"} <= set(manifest["tables"])
    assert os.path.exists(os.path.join(first["build"], "discover", "tasks.csv")), "pending pairs keep their tasks"
    for table in ("pairs.parquet", "annotations/labels.parquet", "masks/index.parquet"):
        assert storage.parquet_metadata(storage.join(first["build"], table))["build_id"] == first["build_id"]

    t0 = time.perf_counter()
    second = rebuild_flow(cfg)
    t_second = time.perf_counter() - t0
    print(f"rebuild with nothing changed: {t_second:.1f}s vs {t_first:.1f}s first ({t_second / t_first:.2f})", file=sys.stderr)
    assert second["build_id"] != first["build_id"] and builds.read_pointer(root, "latest") == second["build_id"]
    stages = second["stages"]
    assert stages["activations"]["computed_shards"] == 0
    assert (stages["discover"]["made"], stages["discover"]["reused"]) == (0, 6)
    assert stages["generalize"]["inferred_masks"] == 0
    for table in ("pairs.parquet", "annotations/labels.parquet"):
        a, b = (storage.read_parquet(storage.join(r["build"], table)) for r in (first, second))
        assert a.equals(b)
    assert storage.read_json(storage.join(first["build"], builds.MANIFEST)) == manifest, "published builds stay as they were"
    for table in ("masks/index.parquet", "evaluation/summary.parquet", "evaluation/pairs.parquet"):
        inodes = {os.stat(storage.join(r["build"], table)).st_ino for r in (first, second)}
        assert len(inodes) == 1, f"{table}: the file kept in the cache, linked into the new build, not made again"

    # a sixth answer arrives for one pair, then for another: only the new pair's images go through the model
    pairs = storage.read_parquet(storage.join(second["build"], "pairs.parquet")).to_pylist()
    _answer(root, "late-1.csv", pairs[0])
    third = rebuild_flow(cfg)
    gen = third["stages"]["generalize"]
    assert (gen["masks"], gen["inferred_masks"]) == (4, 4) and third["stages"]["ingest"]["insufficient"] == 5
    assert third["stages"]["activations"]["computed_shards"] == 0 and third["stages"]["discover"]["made"] == 0
    _answer(root, "late-2.csv", pairs[3])
    fourth = rebuild_flow(cfg)
    gen = fourth["stages"]["generalize"]
    assert (gen["masks"], gen["inferred_masks"]) == (8, 4)
    assert fourth["stages"]["evaluate"]["reused"] == 0

    # the report of the last build, opened in a real browser: every picture of the index and of the class pages loads
    load = "window.scrollTo(0, document.body.scrollHeight); return Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)));"
    browser.get("file://" + fourth["stages"]["report"]["report"])
    browser.execute_script(load)  # pictures load lazily, when near
    assert browser.execute_script("return document.images.length;") == 1 and broken_images(browser) == [], "the chart"
    pages = browser.execute_script("return Array.from(document.querySelectorAll('#classes tbody a')).map(a => a.href);")
    shown = 0
    for page in dict.fromkeys(pages):
        browser.get(page)
        browser.execute_script(load)
        assert broken_images(browser) == []
        shown += browser.execute_script("return document.images.length;")
    assert shown == 6 * 3 + 2, "3 strips a pair, 2 mask strips"

    # one more image in class 1: only that class's shard is computed again
    wnid = world.wnid_of(1)
    src = sorted(glob.glob(f"{cfg.dataset.root}/{wnid}/*.JPEG"))[0]
    with open(src, "rb") as fh, open(f"{cfg.dataset.root}/{wnid}/{wnid}_99999.JPEG", "wb") as out:
        out.write(fh.read())
    fifth = rebuild_flow(cfg, ["activations"])
    assert fifth["stages"]["activations"]["computed_shards"] == 1 and fifth["stages"]["activations"]["images"] == 25

    # a new checkpoint: every shard again
    cfg.model.checkpoint = make_checkpoint(os.path.join(os.path.dirname(root), "other.pt"), num_classes=3, seed=1)
    sixth = rebuild_flow(cfg, ["activations"])
    assert sixth["stages"]["activations"]["computed_shards"] == sixth["stages"]["activations"]["shards"] == 3

    capsys.readouterr()
    assert cli.main(["builds", root]) == 0
    listing = capsys.readouterr().out
    assert f"{fourth['build_id']}  complete" in listing and "latest" in listing and "unfinished" in listing
    assert cli.main(["gc", root, "--keep", "1"]) == 0
    assert builds.read_pointer(root, "latest") == fourth["build_id"]
    assert not os.path.exists(first["build"]) and os.path.exists(fourth["build"])
    assert sorted(os.listdir(builds.incoming(root))) == ["late-1.csv", "late-2.csv", "simulated.csv"], "gc never touches answers"


def test_killed_build_leaves_latest_and_concurrent_rebuilds_cannot_both_publish(tmp_path, prefect_server):
    world.synthesize(str(tmp_path / "world"), classes=3, per_class=8, size=32, seed=0)
    cfg = _config(str(tmp_path), make_checkpoint(tmp_path / "tiny.pt", num_classes=3), shard_size=2, evaluate=False)
    path = _write_config(cfg, str(tmp_path / "salient.yaml"))
    root = cfg.output

    # two rebuilds started together: one publishes, the other stops with a clear message
    a, b = spawn_run(path, str(tmp_path / "a.log")), spawn_run(path, str(tmp_path / "b.log"))
    codes = sorted([a.wait(timeout=600), b.wait(timeout=600)])
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert codes == [0, Busy.exit_code], logs
    assert "another rebuild holds" in logs and logs.count("published as latest") == 1
    published = builds.read_pointer(root, "latest")
    assert len(builds.list_builds(root)) == 1

    # a rebuild killed once its first shard is in: latest stays on the complete build
    os.remove(os.path.join(root, "current"))  # a fresh build, so the shards are taken from the cache or computed
    for entry in glob.glob(f"{root}/cache/activations/*"):
        os.remove(entry) if os.path.isfile(entry) else None
    proc = spawn_run(path, str(tmp_path / "killed.log"))
    deadline = time.monotonic() + 300
    while not glob.glob(f"{root}/cache/activations/*.json") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    kill_group(proc)
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
    resumed = spawn_run(path, str(tmp_path / "resumed.log"))
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()
    assert builds.read_pointer(root, "latest") == killed, "the killed build was resumed and published"
    stats = [json.loads(open(p).read()) for p in glob.glob(f"{root}/builds/{killed}/activations/part-*.json")]
    used = builds.cache_entries(builds.Layout(root, killed))
    assert len(stats) == 12 and sum(e.startswith("activations/") for e in used) == 12, "every shard is kept in the cache"
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
    assert masks.build == again["build"] and len(masks) == counts["masks"]
    seen = manifest_text + capsys.readouterr().out + caplog.text + config.to_yaml(cfg)
    assert s3_server.secret not in seen and s3_server.key not in seen
