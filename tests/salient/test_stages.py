"""The stage registry and runtime: whole-section cache keys, the one cache path, and the layering."""

import ast
import os
import re
import shutil
from collections import Counter

import pytest

from salient import config, stages, storage
from salient.errors import ConfigError
from salient.stage import Stage, execute, local_run
from salient.stages.activations import Activations

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _with(cfg: config.Config, *overrides: str) -> config.Config:
    return config.load(None, [f"{k}={v}" for k, v in _flat(cfg.model_dump(mode="json", exclude_none=True))] + list(overrides))


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        elif not (isinstance(v, list) and not v):
            yield f"{prefix}{k}", v


def test_precision_compilation_and_decoder_change_every_model_stage_key_and_how_work_is_spread_changes_none(activation_world):
    cfg, _ = activation_world
    model_stages = [s for s in stages.STAGES if "compute" in s.sections]
    assert {s.name for s in model_stages} >= {"activations", "discover", "generalize", "evaluate"}

    def keys(c: config.Config) -> dict[str, str]:
        run = local_run(c)
        return {s.name: s.key(run) for s in stages.STAGES}

    base = keys(cfg)
    spread = keys(_with(
        cfg, "compute.workers=3", "compute.batch_size=7", "compute.gpus_per_worker=0", "compute.cpus_per_worker=1",
        "compute.decode_threads=2", "compute.ray_address=127.0.0.1:6379", "compute.ray_connect_timeout_s=5",
        "compute.scale_up_timeout_s=10", "evaluate.images_per_block=3",
    ))
    assert spread == base, "where and how fast work runs changes no key"
    for changed in ("compute.precision=bf16", "compute.compile=default", "preprocess.decoder=torchvision"):
        other = keys(_with(cfg, changed))
        assert all(other[s.name] != base[s.name] for s in model_stages), changed
    assert keys(_with(cfg, "preprocess.max_pixels=10000"))["activations"] != base["activations"], "the whole preprocess section counts"
    assert keys(_with(cfg, "aggregate.top_k_neuron=7"))["aggregate"] != base["aggregate"]
    assert keys(_with(cfg, "activations.dtype=float16"))["activations"] != base["activations"], "the stored type counts"
    assert keys(_with(cfg, "generalize.candidates=prediction"))["generalize"] != base["generalize"]


def test_a_checkpoint_counts_by_its_content_not_its_path(activation_world, tmp_path):
    cfg, _ = activation_world
    copy = tmp_path / "copy.pt"
    shutil.copyfile(cfg.model.checkpoint, copy)
    key = Activations().key(local_run(cfg))
    assert Activations().key(local_run(_with(cfg, f"model.checkpoint={copy}"))) == key
    with open(copy, "ab") as fh:
        fh.write(b"\0")
    assert Activations().key(local_run(_with(cfg, f"model.checkpoint={copy}"))) != key


def test_precision_recomputes_activations_and_what_follows_and_workers_recompute_nothing(activation_world):
    cfg, _ = activation_world
    act, agg = stages.BY_NAME["activations"], stages.BY_NAME["aggregate"]
    run = local_run(cfg, [act, agg])
    first = execute(act, run)
    assert first["computed_shards"] == first["shards"] == 6
    execute(agg, run)

    busier = _with(cfg, "compute.workers=2", "compute.batch_size=3")
    run = local_run(busier, [act, agg])
    assert execute(act, run)["computed_shards"] == 0
    marker = storage.join(run.build, "stages/aggregate.json")
    before = storage.read_json(marker)
    execute(agg, run)
    assert storage.read_json(marker) == before, "aggregation is not made again"

    bf16 = _with(cfg, "compute.precision=bf16")
    run = local_run(bf16, [act, agg])
    again = execute(act, run)
    assert again["computed_shards"] == 6, "bf16 features are not the fp32 ones"
    execute(agg, run)
    assert storage.read_json(marker)["fingerprint"] != before["fingerprint"], "aggregation follows the new shards"


def test_a_stage_from_the_cache_is_the_same_as_one_made(activation_world):
    """A second output root's build made from a copied cache holds the same tables, without computing."""
    cfg, _ = activation_world
    act, agg = stages.BY_NAME["activations"], stages.BY_NAME["aggregate"]
    run = local_run(cfg, [act, agg])
    execute(act, run)
    execute(agg, run)
    other = _with(cfg, f"output={cfg.output}-2")
    shutil.copytree(storage.join(cfg.output, "cache"), storage.join(other.output, "cache"))
    run2 = local_run(other, [act, agg])
    assert execute(act, run2)["computed_shards"] == 0
    execute(agg, run2)
    for table in ("pairs.parquet", "topk/class.parquet", "activations/part-00003.parquet"):
        assert storage.read_parquet(storage.join(run.build, table)).equals(storage.read_parquet(storage.join(run2.build, table)))


def test_registry_names_each_stage_once_and_refuses_unknown_ones(activation_world):
    cfg, _ = activation_world
    assert stages.NAMES == ("activations", "aggregate", "discover", "simulate", "ingest", "generalize", "evaluate", "report")
    assert [s.name for s in stages.select(cfg, ["report", "activations"])] == ["activations", "report"], "registry order"
    with pytest.raises(ConfigError, match="unknown; use some of activations, aggregate"):
        stages.select(cfg, ["activation"])
    assert "evaluate" not in [s.name for s in stages.select(cfg)], "no models configured"


def _docs_stage() -> type[Stage]:
    """The example stage of docs/stages.md, as its code block has it."""
    text = open(os.path.join(ROOT, "docs", "stages.md")).read()
    (code,) = re.findall(r"```python\n(# salient/stages/census.py\n.*?)```", text, re.S)
    namespace: dict = {}
    exec(compile(code, "docs/stages.md", "exec"), namespace)
    return namespace["Census"]


def test_the_stage_added_in_the_docs_is_one_module_and_one_registry_line(activation_world, monkeypatch):
    """docs/stages.md's example, registered with one line: the command line, the pre-flight and the
    rebuild's stage list take it from the registry, and a second run takes it from the build."""
    from salient import cli

    census = _docs_stage()()
    monkeypatch.setattr(stages, "STAGES", (*stages.STAGES, census))
    monkeypatch.setattr(stages, "BY_NAME", {s.name: s for s in stages.STAGES})
    monkeypatch.setattr(stages, "NAMES", tuple(stages.BY_NAME))
    assert cli.build_parser().parse_args(["census", "x.yaml"]).func is not None
    cfg, rels = activation_world
    assert [s.name for s in stages.select(cfg)][-1] == "census"
    run = local_run(cfg, stages.select(cfg, ["activations", "census"]))
    execute(stages.BY_NAME["activations"], run)
    first = execute(census, run)
    table = storage.read_parquet(storage.join(run.build, "census.parquet")).to_pydict()
    assert first["classes"] == 3 and sorted(table["images"]) == sorted(Counter(r.split("/")[0] for r in rels).values())
    assert execute(census, run) == first, "the second run reads the committed result"


def test_a_broken_registry_fails_when_checked(monkeypatch):
    class Broken(Stage):
        name = "broken"

    monkeypatch.setattr(stages, "STAGES", (*stages.STAGES, Broken()))
    monkeypatch.setattr(stages, "BY_NAME", {s.name: s for s in stages.STAGES})
    with pytest.raises(TypeError, match="does not set help, code_version"):
        stages._check_registry()


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_library_imports_no_orchestration():
    """Only the command line may reach Prefect, Ray, flows and tasks (lazily, inside its commands)."""
    offenders = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "salient")):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and path != os.path.join(ROOT, "salient", "cli.py"):
                found = _imports(path) & {"prefect", "ray", "flows", "tasks", "prefect_ray"}
                if found:
                    offenders[os.path.relpath(path, ROOT)] = sorted(found)
    assert offenders == {}
    cli_top = {n.module.split(".")[0] for n in ast.parse(open(os.path.join(ROOT, "salient", "cli.py")).read()).body if isinstance(n, ast.ImportFrom)}
    assert not cli_top & {"prefect", "ray", "flows", "tasks"}, "the command line imports orchestration only inside commands"


def test_no_module_uses_another_modules_private_names():
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "salient")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            tree = ast.parse(open(path).read())
            modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("salient") for a in n.names}
            modules |= {a.asname or a.name.split(".")[-1] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name.startswith("salient")}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("salient"):
                    offenders += [f"{path}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules and node.attr.startswith("_") and not node.attr.startswith("__"):
                    offenders.append(f"{path}: {node.value.id}.{node.attr}")
    assert offenders == []


def test_stage_commands_take_their_options_from_the_stage(tmp_path):
    """`salient ingest CONFIG --answers A --answers B` puts A and B before the config's answer
    files; the command line and the manifest name no stage (each stage says what they need)."""
    from salient import cli

    cfg = config.load(None, ["output=/tmp/out", "annotations.answers=[/data/c.csv]"])
    path = tmp_path / "salient.yaml"
    path.write_text(config.to_yaml(cfg))
    args = cli.build_parser().parse_args(["ingest", str(path), "--answers", "a.csv", "--answers", "b.csv"])
    applied = stages.BY_NAME["ingest"].with_arguments(config.load(str(path), []), args)
    assert applied.annotations.answers == ["a.csv", "b.csv", "/data/c.csv"]
    args = cli.build_parser().parse_args(["ingest", str(path)])
    assert stages.BY_NAME["ingest"].with_arguments(config.load(str(path), []), args).annotations.answers == ["/data/c.csv"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generalize", str(path), "--answers", "a.csv"])
    assert stages.BY_NAME["discover"].counts({"pairs": 5}) == {}
    for source in ("salient/cli.py", "flows/rebuild.py"):
        text = open(os.path.join(ROOT, source)).read()
        named = [n for n in stages.NAMES if re.search(rf"(==|!=|in|BY_NAME\[|results\[|summary\[)\s*[\"']{n}[\"']", text)]
        assert named == [], (source, named)
    assert cli.build_parser().parse_args(["annotate", "simulate", str(path)]).builds
