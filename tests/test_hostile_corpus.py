"""The hostile-input corpus (tests/hostile/).

- ``configs/``: each config says on its first line what to expect (``# expect: TEXT``); ``salient
  validate`` refuses every one with exit code 2 in at most five lines that hold TEXT, within five
  seconds, with no terminal control characters in the output.
- ``answers/``: answer CSVs; ``expected.json`` gives, per file, how many answers ingest counts and
  how many rows or files it rejects, by kind (hand-checked); no rejection reason holds a control
  character.
- ``requests/answer_bodies.json``: answer bodies the annotation app must refuse (replayed by
  tests/salient/test_app.py).

The README states the corpus size; a test keeps it true.
"""

import json
import re
from collections import Counter
import shutil
import signal
from pathlib import Path

import pytest
from PIL import Image

from salient import cli, ingest, storage

CORPUS = Path(__file__).parent / "hostile"
CONFIGS = sorted((CORPUS / "configs").glob("*.yaml"))
LIMIT_S = 5


def expectation(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: "), f"{path.name}: the first line must say what to expect"
    return first.removeprefix("# expect: ")


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """A folder with a small image dataset under ``data/``, where the configs are validated."""
    (tmp_path / "data" / "n0001").mkdir(parents=True)
    Image.new("RGB", (8, 8), (40, 80, 120)).save(tmp_path / "data" / "n0001" / "a.png")
    return tmp_path


def validate(path: Path, capsys) -> tuple[int, list[str]]:
    def too_slow(*_):
        raise TimeoutError(f"salient validate {path.name} ran past {LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(LIMIT_S)
    try:
        code = cli.main(["validate", str(path)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).splitlines()


def test_the_corpus_is_not_empty():
    assert len(CONFIGS) >= 20


@pytest.mark.parametrize("source", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_hostile_config_is_refused_quickly_on_a_few_clean_lines(source, workdir, capsys):
    path = workdir / source.name
    shutil.copy(source, path)
    code, lines = validate(path, capsys)
    text = "\n".join(lines)
    assert code == 2 and 1 <= len(lines) <= 5, text
    assert expectation(source) in text, text
    assert all(line.startswith("salient: config error: ") for line in lines), text
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", text), "terminal control characters in the output"


@pytest.mark.parametrize("kind", ["device", "oversize"])
def test_a_config_that_is_no_regular_file_or_too_large_is_refused(kind, workdir, capsys):
    path = Path("/dev/zero") if kind == "device" else workdir / "big.yaml"
    if kind == "oversize":
        path.write_text("# " + "x" * (2**20 + 10) + "\noutput: out\n")
    code, lines = validate(path, capsys)
    assert code == 2 and len(lines) == 1
    assert ("not a regular file" if kind == "device" else "it may have") in lines[0]


ANSWER_FILES = sorted((CORPUS / "answers").glob("*.csv"))
ANSWER_CLASSES = {0: "n01440764", 1: "n01443537"}


def test_every_hostile_answer_file_has_its_expected_outcome():
    assert sorted(json.loads((CORPUS / "answers" / "expected.json").read_text())) == [p.name for p in ANSWER_FILES]


@pytest.mark.parametrize("source", ANSWER_FILES, ids=[p.stem for p in ANSWER_FILES])
def test_every_hostile_answer_file_counts_what_it_should_and_lists_the_rest(source, tmp_path):
    expected = json.loads((CORPUS / "answers" / "expected.json").read_text())[source.name]
    out = str(tmp_path / "out")
    summary = ingest.ingest(out, [str(source)], ANSWER_CLASSES)
    rejected = storage.read_parquet(storage.join(out, ingest.REJECTED_TABLE)).to_pylist()
    assert summary["accepted"] == expected["accepted"]
    assert dict(Counter(r["reason_kind"] for r in rejected)) == expected["rejected"]
    assert all(r["reason"] and not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", r["reason"]) for r in rejected)


def test_the_readme_counts_the_corpus():
    bodies = json.loads((CORPUS / "requests" / "answer_bodies.json").read_text())["bodies"]
    configs = len(CONFIGS) + 2  # and the two the test above makes: /dev/zero and an oversize file
    counts = (configs, len(ANSWER_FILES), len(bodies))
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    said = re.search(r"(\d+) configs, (\d+) answer files, (\d+) answer\s+requests\) is replayed by the suite: all (\d+) kinds", readme)
    assert said, "the README states the corpus size"
    assert tuple(map(int, said.groups())) == (*counts, sum(counts))
