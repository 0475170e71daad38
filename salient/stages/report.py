"""The report stage: ``report/index.html``, a page people can look at, from the build's tables
and pictures. It is rewritten on every run (it shows the build's own facts); it has no items."""

from __future__ import annotations

from salient import report, storage, tables
from salient.stage import Item, Run, Stage


class Report(Stage):
    name = "report"
    help = f"{tables.REPORT.path}: pairs, pictures, evaluation and build facts"
    code_version = "report-1"
    retries = 0

    def commit(self, run: Run, results: list[tuple[Item, dict, str]]) -> dict:
        uri = report.write_report(run.build)
        run.log.info("report written to %s", uri)
        return {"report": uri}

    def describe(self, s: dict) -> str:
        return f"report: {storage.normalize_uri(s['report'])}"
