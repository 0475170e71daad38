"""The demo's report of the evaluation, and (heavy) the claim it makes on the shipped world: the
biased model's core accuracy falls clearly more than the debiased model's at the paper's sigma."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from salient import cli, demo, evaluate

WORLD_META = {"classes": [
    {"class_index": 0, "shape": "circle", "cue_kind": "none"},
    {"class_index": 1, "shape": "square", "cue_kind": "background"},
    {"class_index": 2, "shape": "triangle", "cue_kind": "separate_object"},
]}


def _write(build, table: str, rows: list[dict]) -> None:
    path = build / table
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_sensitivity_table_lists_each_class_with_a_spurious_pair_per_model_and_sigma(tmp_path, capsys):
    def row(model, sigma, c, core, clean, n):
        return {"model": model, "sigma": sigma, "class_index": c, "n_spurious_images": n,
                "clean_acc_spurious_images": clean, "core_acc": core}

    _write(tmp_path, evaluate.CLASSES_TABLE, [
        # Class 0 has no spurious pair: its core accuracy is null and it is left out.
        row("debiased", 0.25, 0, None, None, 0), row("biased", 0.25, 0, None, None, 0),
        row("debiased", 0.25, 1, 0.75, 1.0, 4), row("debiased", 1.0, 1, 0.5, 1.0, 4),
        row("biased", 0.25, 1, 0.25, 1.0, 4), row("biased", 1.0, 1, 0.0, 1.0, 4),
        row("biased", 0.25, 2, 0.5, 0.5, 2), row("biased", 1.0, 2, 0.0, 0.5, 2),
        row("debiased", 0.25, 2, 1.0, 1.0, 2), row("debiased", 1.0, 2, 0.5, 1.0, 2),
    ])
    _write(tmp_path, evaluate.SUMMARY_TABLE, [
        {"model": "biased", "sigma": 0.25, "mean_core_drop": 0.375},
        {"model": "biased", "sigma": 1.0, "mean_core_drop": 0.75},
        {"model": "debiased", "sigma": 0.25, "mean_core_drop": 0.125},
        {"model": "debiased", "sigma": 1.0, "mean_core_drop": 0.5},
    ])
    drops = demo.print_sensitivity(str(tmp_path), WORLD_META)
    assert drops == {"biased": {0.25: 0.375, 1.0: 0.75}, "debiased": {0.25: 0.125, 1.0: 0.5}}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("core accuracy per class at sigma 0.25 / 1 ")
    header = lines[1].split()
    assert header[-2:] == ["biased", "debiased"]  # the biased model first, whatever the row order
    body = [line.split() for line in lines[2:4]]
    assert body[0] == ["1", "square", "background", "4", "0.250", "0.000", "(1.000)", "0.750", "0.500", "(1.000)"]
    assert body[1] == ["2", "triangle", "separate_object", "2", "0.500", "0.000", "(0.500)", "1.000", "0.500", "(1.000)"]
    assert "sigma 0.25: biased 0.375, debiased 0.125; sigma 1: biased 0.750, debiased 0.500" in lines[4]


@pytest.mark.heavy
def test_on_the_demo_world_noise_on_spurious_masks_hurts_the_biased_model_clearly_more(tmp_path, ray_session, prefect_server):
    result = demo.run(str(tmp_path / "demo"), stages=[cli._run_demo_rebuild])
    assert result["stages"] == [0]
    accuracy = result["accuracy"]
    # The world's premise: the biased model follows the cue, the debiased one does not.
    assert accuracy["biased"]["val"] - accuracy["biased"]["swapped"] > 0.4
    assert accuracy["debiased"]["val"] - accuracy["debiased"]["swapped"] < 0.1
    drops = result["sensitivity"]
    assert drops["biased"][0.25] > drops["debiased"][0.25] + 0.2, drops
    assert drops["biased"][0.25] > 0.25 and drops["debiased"][0.25] < 0.1, drops
