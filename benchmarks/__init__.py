"""Benchmarks: each reports ratios against a baseline measured in the same run (`make bench`).

A benchmark process gets the environment `salient` gives itself, before any benchmark imports torch.
On a machine without this project's dependencies (a bare GPU machine) nothing is applied here, and
`benchmarks.gpu` names what is missing and how to bring it."""

try:
    from salient.cli import apply_env_defaults
except ModuleNotFoundError:
    pass
else:
    apply_env_defaults()
