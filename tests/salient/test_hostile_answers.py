"""Hostile and broken answer CSVs (wrong encodings, byte-order marks, binary data, huge fields that
hide rows, stray quotes, NUL bytes, bare carriage returns), answer paths and files dropped for
ingest that are not answer CSVs (named pipes and folders too), and formula-looking cells in the
task CSVs given to spreadsheet users."""

import contextlib
import csv
import io
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from salient import discover, ingest, storage, tables
from salient.answers import MAX_FIELD_CHARS, Ledger, answer_files
from salient.errors import InputError
from salient.metadata import ClassInfo

HEADER = ["WorkerId", "Input.wordnet_id", "Input.class_index", "Input.feature_index", "Input.feature_rank",
          "Answer.main", "Answer.confidence", "Answer.reasons"]
CLASSES = {0: "n01440764", 1: "n01443537"}


def answer(worker: str, j: int = 7, main: str = "main_object", reason: str = "fins") -> list[str]:
    return [worker, "n01440764", "0", str(j), "1", main, "4", reason]


def csv_text(rows: list[list[str]]) -> str:
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\r\n").writerows([HEADER, *rows])
    return buf.getvalue()


def rejected(out: str) -> list[dict]:
    return storage.read_parquet(storage.join(out, ingest.REJECTED_TABLE)).to_pylist()


def labels(out: str) -> dict[tuple[int, int], dict]:
    rows = storage.read_parquet(storage.join(out, ingest.LABELS_TABLE)).to_pylist()
    return {(r["class_index"], r["feature_index"]): r for r in rows}


def test_wrong_encodings_are_rejected_whole_with_what_to_do(tmp_path):
    good_rows = [answer(f"w{i}") for i in range(5)]
    text = csv_text([answer("x", j=9, reason="café")])
    files = {
        "good.csv": csv_text(good_rows).encode("utf-8"),
        "bom.csv": csv_text([answer(f"b{i}", j=8) for i in range(5)]).encode("utf-8-sig"),
        "utf16.csv": text.encode("utf-16"),
        "utf16le.csv": text.encode("utf-16-le"),
        "utf32.csv": text.encode("utf-32"),
        "latin1.csv": text.encode("latin-1"),
        "picture.csv": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    }
    uris = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        uris.append(str(tmp_path / name))
    out = str(tmp_path / "out")
    summary = ingest.ingest(out, uris, CLASSES)

    got = {storage.basename(r["file"]): (r["line"], r["reason_kind"], r["reason"]) for r in rejected(out)}
    assert set(got) == {"utf16.csv", "utf16le.csv", "utf32.csv", "latin1.csv", "picture.csv"}
    assert all(line == 0 and kind == "unreadable_file" for line, kind, _ in got.values())
    assert all("save it as UTF-8 CSV" in why and "no row of this file was used" in why for _, _, why in got.values())
    assert got["utf16.csv"][2].startswith("the file is UTF-16 (it starts with a UTF-16 byte-order mark)")
    assert got["utf32.csv"][2].startswith("the file is UTF-32")
    assert got["utf16le.csv"][2].startswith("byte 1 (line 1) is a NUL byte")
    # "café" is on the second line; its é is one byte in Latin-1
    offset = text.encode("latin-1").index("é".encode("latin-1"))
    assert got["latin1.csv"][2].startswith(f"byte {offset} (line 2) is not UTF-8")
    assert "is a NUL byte: the file is binary" in got["picture.csv"][2]

    # the UTF-8 byte-order mark is accepted: its header's first column is WorkerId, not "\ufeffWorkerId"
    assert {k: v["n_answers"] for k, v in labels(out).items()} == {(0, 7): 5, (0, 8): 5}
    assert (summary["files"], summary["accepted"], summary["rejected"]) == (7, 10, 5)


def test_a_huge_field_cannot_smuggle_rows(tmp_path):
    fake = "\r\n".join(",".join(answer(f"fake{i}", main="background")) for i in range(5))
    padding = "x" * (MAX_FIELD_CHARS + 10)
    rows = [answer("w0"), answer("w1", reason=f"{padding}\r\n{fake}\r\n"), *(answer(f"w{i}") for i in range(2, 6))]
    path = tmp_path / "a.csv"
    path.write_text(csv_text(rows), encoding="utf-8", newline="")
    limit = csv.field_size_limit()
    out = str(tmp_path / "out")
    summary = ingest.ingest(out, [str(path)], CLASSES)

    assert csv.field_size_limit() == limit
    [bad] = rejected(out)
    assert (bad["line"], bad["reason_kind"]) == (3, "field_too_large")
    assert f"longer than {MAX_FIELD_CHARS:,} characters" in bad["reason"]
    answers = storage.read_parquet(storage.join(out, ingest.ANSWERS_TABLE)).to_pylist()
    assert sorted(a["worker_id"] for a in answers) == ["w0", "w2", "w3", "w4", "w5"], "rows inside the field were read as rows"
    # the five answers after the field keep their own line numbers: the field's text spans 7 lines
    assert [a["line"] for a in answers] == [2, 10, 11, 12, 13]
    assert labels(out)[(0, 7)]["label"] == "core" and summary["accepted"] == 5


def test_an_unterminated_huge_field_rejects_its_row_only(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text(csv_text([answer(f"w{i}") for i in range(5)]), encoding="utf-8", newline="")
    broken = tmp_path / "broken.csv"
    broken.write_text(csv_text([answer("v0")]) + 'v1,n01440764,0,7,1,main_object,4,"' + "y" * (MAX_FIELD_CHARS + 10) + "\r\n",
                      encoding="utf-8", newline="")
    out = str(tmp_path / "out")
    summary = ingest.ingest(out, [str(good), str(broken)], CLASSES)
    [bad] = rejected(out)
    assert (storage.basename(bad["file"]), bad["line"], bad["reason_kind"]) == ("broken.csv", 3, "unreadable_row")
    assert "unexpected end of data" in bad["reason"]
    assert summary["accepted"] == 6, "the five good answers and v0's, before the broken row"


@pytest.mark.parametrize("cell", [
    "=1+1", "+1", "-1", "@SUM(A1:A2)", "\t=1", "\r=1", "=HYPERLINK(\"http://x\",\"y\")",
    " =1+1", "  @x", "\n=1", " \n-cmd",
])
def test_formula_looking_cells_are_neutralised(cell):
    assert discover.csv_safe(cell) == "'" + cell


@pytest.mark.parametrize("cell", ["fish", "a=b", "n01440764", "", " fish", "'=already quoted", 3, -3, 2.5, None])
def test_other_cells_are_left_alone(cell):
    assert discover.csv_safe(cell) == cell


def test_tasks_csv_round_trips_hostile_metadata_as_text(tmp_path):
    hostile = ClassInfo(0, "n01440764", '=HYPERLINK("http://x","click")', '+1 and "quoted", with\nnewline', "@SUM(A1)")
    plain = ClassInfo(1, "n01443537", "goldfish", "a fish", "-fish")
    records = [
        {"class_index": c.class_index, "wnid": c.wnid, "feature_index": 3, "feature_rank": 1,
         "files": {s: f"{c.wnid}/feature_3/{s}.png" for s in discover.STRIPS}, "image_ids": [4, 2]}
        for c in (hostile, plain)
    ]
    out = str(tmp_path / "out")
    classes = pa.table({
        "class_index": pa.array([0, 1], pa.int32()), "wnid": [hostile.wnid, plain.wnid], "name": [hostile.name, plain.name],
        "definition": [hostile.definition, plain.definition], "supercategory": [hostile.supercategory, plain.supercategory],
    })
    storage.write_parquet(storage.join(out, tables.CLASSES.path), classes, "test")
    uri = discover.write_tasks(out, records, base_url=" =http://evil")
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(uri).decode("utf-8"), newline="")))
    assert [r["class_name"] for r in rows] == ["'" + hostile.name, "goldfish"]
    assert rows[0]["definition"] == "'" + hostile.definition
    assert [r["supercategory"] for r in rows] == ["'@SUM(A1)", "'-fish"]
    assert rows[0]["images_url"] == "' =http://evil/n01440764/feature_3/images.png"
    for r in rows:
        assert not any(v.lstrip(" \n").startswith(("=", "+", "-", "@", "\t", "\r")) for v in r.values())


def test_every_file_dropped_for_ingest_is_read_or_listed(tmp_path):
    root = tmp_path / "out"
    incoming = root / "annotations" / "incoming"
    (incoming / "batch2").mkdir(parents=True)
    (incoming / "UPPER.CSV").write_text(csv_text([answer(f"u{i}") for i in range(3)]), newline="")
    (incoming / "mixed.Csv").write_text(csv_text([answer(f"m{i}") for i in range(2)]), newline="")
    (incoming / "batch2" / "nested.csv").write_text(csv_text([answer("n0")]), newline="")
    (incoming / "answers.xlsx").write_bytes(b"PK\x03\x04")
    (incoming / "notes.txt").write_text("see the sheet")
    (incoming / ".hidden.csv").write_text(csv_text([answer("h0")]), newline="")
    (incoming / f".UPPER.CSV.tmp-{'0' * 32}").write_text("half of a file being written")  # an atomic write in progress
    files = answer_files(str(root))
    assert [storage.basename(f) for f in files] == ["UPPER.CSV", "mixed.Csv"]

    out = str(tmp_path / "build")
    summary = ingest.ingest(out, files, CLASSES, answers_root=str(root))
    assert summary["accepted"] == 5 and labels(out)[(0, 7)]["label"] == "core"
    listed = {r["file"].removeprefix(str(incoming) + "/"): r for r in rejected(out)}
    assert set(listed) == {"batch2/nested.csv", "answers.xlsx", "notes.txt", ".hidden.csv"}
    assert {(r["line"], r["reason_kind"]) for r in listed.values()} == {(0, "not_an_answer_file")}
    assert "subfolder" in listed["batch2/nested.csv"]["reason"] and ".csv" in listed["notes.txt"]["reason"]
    assert "hidden" in listed[".hidden.csv"]["reason"]


def test_only_files_that_are_not_read_name_them_in_the_error(tmp_path):
    from salient.answers import INCOMING, check_inputs

    incoming = tmp_path / "annotations" / "incoming"
    incoming.mkdir(parents=True)
    (incoming / "answers.xlsx").write_bytes(b"PK")
    with pytest.raises(InputError, match=r"no answer files to ingest: .*found only files that are not read: answers\.xlsx"):
        check_inputs(str(tmp_path), [], None, INCOMING, "put CSV files")


@pytest.mark.parametrize("stray", [
    'w2,n01440764,0,7,1,main_object,4,"fins\r\n',  # a quote that is never closed
    'w2,n01440764,0,7,1,main_object,4,"fins"x\r\n',  # text after a closing quote
])
def test_a_stray_quote_rejects_only_the_rows_it_makes_unreadable(tmp_path, stray):
    before = csv_text([answer("w0"), answer("w1")])
    after = "".join(",".join(answer(f"w{i}")) + "\r\n" for i in (3, 4, 5))
    path = tmp_path / "answers.csv"
    path.write_text(before + stray + after, encoding="utf-8", newline="")
    out = str(tmp_path / "out")
    summary = ingest.ingest(out, [str(path)], CLASSES)
    [bad] = rejected(out)
    assert (bad["line"], bad["reason_kind"]) == (4, "unreadable_row")
    assert "line 4 was not used" in bad["reason"] and bad["raw"].startswith('"w2,')
    accepted = storage.read_parquet(storage.join(out, ingest.ANSWERS_TABLE)).to_pylist()
    assert [(a["worker_id"], a["line"]) for a in accepted] == [("w0", 2), ("w1", 3), ("w3", 5), ("w4", 6), ("w5", 7)]
    assert summary["accepted"] == 5 and labels(out)[(0, 7)]["n_answers"] == 5


@contextlib.contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: opening a named pipe for reading waits for a writer."""
    def too_slow(*_):
        raise TimeoutError(f"ran past {seconds} s: a named pipe was opened")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_an_answer_path_that_is_no_regular_file_is_refused_on_one_line(tmp_path, kind):
    path = tmp_path / "answers.csv"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
        (path / "a.csv").write_text(csv_text([answer("w0")]), newline="")
    else:
        path = Path("/dev/zero")
    good = tmp_path / "good.csv"
    good.write_text(csv_text([answer("w0")]), newline="")
    what = {"fifo": "a named pipe (FIFO)", "folder": "a folder", "device": "a character device"}[kind]
    out = str(tmp_path / "out")
    with within(5), pytest.raises(InputError) as caught:
        ingest.ingest(out, [str(good), str(path)], CLASSES)
    message = str(caught.value)
    assert "\n" not in message and f"{path} is {what}" in message and "give CSV files" in message
    assert not (tmp_path / "out" / "annotations").exists()


def test_a_file_swapped_for_a_pipe_after_the_check_is_listed_not_read(tmp_path):
    pipe = tmp_path / "answers.csv"
    os.mkfifo(pipe)
    ledger = Ledger(CLASSES)
    with within(5):
        ledger.read(str(pipe))
    [entry] = ledger.rejected
    assert (entry.file, entry.line, entry.reason_kind) == (str(pipe), 0, "not_an_answer_file")
    assert "named pipe (FIFO), not a regular file" in entry.reason and ledger.accepted == []


def test_pipes_links_and_empty_folders_in_incoming_are_listed_never_opened(tmp_path):
    root = tmp_path / "out"
    incoming = root / "annotations" / "incoming"
    (incoming / "empty").mkdir(parents=True)
    (incoming / "batch" / "deeper").mkdir(parents=True)  # holds only an empty folder
    os.mkfifo(incoming / "pipe.csv")
    os.mkfifo(incoming / "batch" / "pipe.csv")
    (incoming / "good.csv").write_text(csv_text([answer(f"w{i}") for i in range(5)]), newline="")
    (incoming / "link.csv").symlink_to(incoming / "good.csv")
    with within(5):
        files = answer_files(str(root))
        assert [storage.basename(f) for f in files] == ["good.csv"]
        out = str(tmp_path / "build")
        summary = ingest.ingest(out, files, CLASSES, answers_root=str(root))
    assert summary["accepted"] == 5
    listed = {r["file"].removeprefix(str(incoming) + "/"): r for r in rejected(out)}
    assert set(listed) == {"empty", "batch/deeper", "pipe.csv", "batch/pipe.csv", "link.csv"}
    assert {(r["line"], r["reason_kind"]) for r in listed.values()} == {(0, "not_an_answer_file")}
    assert "named pipe (FIFO)" in listed["pipe.csv"]["reason"] and "empty folder" in listed["empty"]["reason"]
    assert "symbolic link" in listed["link.csv"]["reason"]


def test_only_a_pipe_in_incoming_names_it_in_the_error(tmp_path):
    incoming = tmp_path / "annotations" / "incoming"
    incoming.mkdir(parents=True)
    os.mkfifo(incoming / "answers.csv")
    with within(5), pytest.raises(InputError, match=r"found only files that are not read: answers\.csv"):
        ingest.ingest(str(tmp_path / "build"), answer_files(str(tmp_path)), CLASSES, answers_root=str(tmp_path))


def test_a_nul_byte_rejects_its_row_and_in_the_header_the_file(tmp_path):
    rows = csv_text([answer("w0"), answer("w1", reason="a\x00b"), answer("w2"), ["w3", "n01440764", "0", "7", "1", "main_object", "4", "fins", "x\x00"]])
    (tmp_path / "row.csv").write_text(rows, encoding="utf-8", newline="")
    (tmp_path / "header.csv").write_text(csv_text([answer("w4")]).replace("WorkerId", "Worker\x00Id", 1), newline="")
    out = str(tmp_path / "out")
    summary = ingest.ingest(out, [str(tmp_path / "row.csv"), str(tmp_path / "header.csv")], CLASSES)
    got = sorted((storage.basename(r["file"]), r["line"], r["reason_kind"]) for r in rejected(out))
    assert got == [("header.csv", 0, "unreadable_file"), ("row.csv", 3, "control_character"), ("row.csv", 5, "control_character")]
    assert summary["accepted"] == 2, "w0 and w2"


def test_a_bare_carriage_return_rejects_its_record_and_never_truncates_a_reason(tmp_path):
    text = csv_text([answer("w0"), answer("w1", reason="fin"), answer("w2")]).replace(",fin\r\n", ",fin\rs and scales\r\n")
    path = tmp_path / "answers.csv"
    path.write_text(text, encoding="utf-8", newline="")
    out = str(tmp_path / "out")
    ingest.ingest(out, [str(path)], CLASSES)
    [bad] = rejected(out)
    assert (bad["line"], bad["reason_kind"]) == (3, "bare_carriage_return")
    assert "carriage return (CR)" in bad["reason"] and "line 3 was not used" in bad["reason"]
    accepted = storage.read_parquet(storage.join(out, ingest.ANSWERS_TABLE)).to_pylist()
    assert [(a["worker_id"], a["reason"], a["line"]) for a in accepted] == [("w0", "fins", 2), ("w2", "fins", 4)]
