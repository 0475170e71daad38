"""Benchmarks: each reports ratios against a baseline measured in the same run (`make bench`).

A benchmark process gets the environment `salient` gives itself, before any benchmark imports torch."""

import os

from salient import resources
from salient.cli import LOCAL_ENV_DEFAULTS

for _key, _value in LOCAL_ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
resources.apply_worker_env()
