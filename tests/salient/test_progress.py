"""A stage's log shows its progress (periodic lines with counts, rate and time left, and one at the
end), never a line per item: at 5,000 pairs a line per item is 5,000 lines."""

from __future__ import annotations

import logging

import pytest

from salient.stage import Item, Progress, Run, Stage, duration, execute, local_run


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (59.4, "59 s"), (61, "1 min 01 s"), (3599, "59 min 59 s"), (7440, "2 h 04 min")])
def test_durations_read_as_people_write_them(seconds, text):
    assert duration(seconds) == text


def test_progress_logs_a_line_per_interval_and_one_at_the_end(caplog):
    readings = iter(range(0, 1000, 10))  # each reading of the clock is 10 s after the last
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        with Progress(log, "discover", 100, "pairs", interval_s=25, clock=lambda: float(next(readings))) as advance:
            for _ in range(10):
                advance(10)
    lines = [r.getMessage() for r in caplog.records]
    # started at 0; advances read 10, 20, ..., 100: a line when 25 s have passed since the last (30, 60, 90)
    assert lines[:-1] == [
        "discover: 30 of 100 pairs (30%), 1.0 pairs/s, about 1 min 10 s left",
        "discover: 60 of 100 pairs (60%), 1.0 pairs/s, about 40 s left",
        "discover: 90 of 100 pairs (90%), 1.0 pairs/s, about 10 s left",
    ]
    assert lines[-1] == "discover: 100 pairs done in 1 min 50 s (0.9 pairs/s)"


class _Many(Stage):
    """A stage of 500 small items made in this process."""

    name = "many"
    help = "test"
    code_version = "many-1"
    unit = "things"

    def plan(self, run: Run) -> list[Item]:
        return [Item(self.key(run, i), f"many/{i}.json", (), i, f"thing {i}") for i in range(500)]

    def make(self, run: Run, item: Item) -> dict:
        return {"i": item.payload}


def test_a_stage_of_many_items_logs_its_progress_not_its_items(tmp_path, caplog):
    from salient import config

    cfg = config.load(None, [f"output={tmp_path}/out"])
    run = local_run(cfg)
    with caplog.at_level(logging.INFO, logger="salient.stage"):
        summary = execute(_Many(), run)
    assert summary == {"items": 500, "computed": 500}
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) <= 3, lines  # the plan's line, and the progress' last (one within 30 s)
    assert lines[-1].startswith("many: 500 things done in ")


def test_one_piece_of_work_ends_with_its_time_alone(caplog):
    readings = iter([0.0, 26.0, 26.0])
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        with Progress(log, "aggregate", 1, "items", clock=lambda: next(readings)) as advance:
            advance(1)
    assert [r.getMessage() for r in caplog.records] == ["aggregate: done in 26 s"]
