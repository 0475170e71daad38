"""`python -m benchmarks.gpu`, the one GPU check, as the suite can run it (on the CPU): every check is
there, the CUDA-only ones skipped with their reason, none failing, every rate measured, the results
written where --out says; and where a module it needs is missing, one line naming it with the
commands that bring it, exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_ONLY = {
    "stream_pil", "stream_torchvision", "odd_files_nvjpeg", "precision_fp16", "nam_masks", "condition_masks",
    "attack_memory", "compile_reduce-overhead",
}
ON_THE_CPU = {"odd_files_torchvision", "precision_fp32", "precision_bf16", "evaluate_noise", "attack_chunked", "compile_default"}
RATES = {
    "model_only_fp32", "decode_only_pil", "decode_only_torchvision", "activations_pil_fp32", "activations_torchvision_fp32",
    "generalize", "evaluate", "evaluate_two_models", "discover",
}


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((out / "gpu.json").read_text())
    checks = result["checks"]
    assert set(checks) == CUDA_ONLY | ON_THE_CPU
    failed = {name: c["figure"] for name, c in checks.items() if c["status"] not in ("PASS", "SKIP")}
    assert not failed, failed
    assert {name for name, c in checks.items() if c["status"] == "SKIP"} == CUDA_ONLY
    assert all("CUDA" in checks[name]["figure"] for name in CUDA_ONLY)
    lines = proc.stdout.splitlines()
    for name, c in checks.items():  # one line each, with its figure
        assert [line for line in lines if line.split()[:2] == [c["status"], name]] == [f"{c['status']:<5} {name:<28} {c['figure']}"]
    assert set(result["rates"]) == RATES
    assert not [name for name, r in result["rates"].items() if "error" in r], result["rates"]
    assert "| evaluate_noise | PASS |" in (out / "gpu.md").read_text()


def test_a_missing_module_is_named_with_the_commands_that_bring_it():
    blocked = "import runpy, sys; sys.modules['zarr'] = None; sys.argv = ['benchmarks.gpu']; runpy.run_module('benchmarks.gpu', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", blocked], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("benchmarks.gpu: module 'zarr' is missing")
    assert "make gpu-wheels" in line and "pip install --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl" in line
    assert "PYTHONPATH=/tmp/site:. python -m benchmarks.gpu" in line
    assert not proc.stdout
