"""Prefect task of the report stage."""

from __future__ import annotations

from prefect import get_run_logger, task

from salient import builds, report
from salient.config import Config


@task(name="report")
def write_report(config: Config, layout: builds.Layout) -> dict:
    """report/index.html with the build's pictures, tables and facts."""
    uri = report.write_report(layout.build)
    get_run_logger().info("report written to %s", uri)
    return {"report": uri}
