"""The report flow: a page people can look at, from the build's tables and pictures."""

from __future__ import annotations

from prefect import flow

from salient import builds
from salient import config as cfgmod
from tasks.report import write_report


@flow(name="salient-report")
def report_flow(config: cfgmod.Config) -> dict:
    """report/index.html next to its PNGs."""
    cfgmod.check_stages(config, ["report"])
    with builds.holding(config.output, "salient report"):
        return write_report(config, builds.open_current(config.output))
