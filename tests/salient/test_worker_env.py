"""Worker processes get the environment their decode threads need (OpenMP threads that sleep rather
than spin), unless it is set already."""

import json
import os
import subprocess
import sys

from salient import resources

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The real entry point, then what the process sees: its OpenMP setting, and whether torch (which
# reads it once, when loaded) was loaded before.
PROBE = """
import json, os, sys
from salient import cli
cli.main(['validate', '/nonexistent/config.yaml'])
print(json.dumps({'omp': os.environ.get('OMP_WAIT_POLICY'), 'torch_loaded': 'torch' in sys.modules}))
"""


def _seen_by_the_cli(extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in resources.WORKER_ENV_DEFAULTS} | extra
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_cli_sets_passive_openmp_before_torch_is_loaded():
    assert _seen_by_the_cli({}) == {"omp": "PASSIVE", "torch_loaded": False}


def test_a_value_the_user_set_is_kept():
    assert _seen_by_the_cli({"OMP_WAIT_POLICY": "ACTIVE"})["omp"] == "ACTIVE"


def test_ray_workers_are_given_the_same_environment(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert resources.worker_env() == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert resources.worker_env() == {"OMP_WAIT_POLICY": "ACTIVE"}
