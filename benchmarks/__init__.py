"""Benchmarks: each reports ratios against a baseline measured in the same run (`make bench`).

A benchmark process gets the environment `salient` gives itself, before any benchmark imports torch."""

from salient.cli import apply_env_defaults

apply_env_defaults()
