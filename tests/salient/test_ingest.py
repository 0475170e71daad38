import csv
import io
import json
import os

import numpy as np
import pytest

from salient import answers, ingest, storage
from salient.errors import InputError
from salient.metadata import read_class_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "..", "shared", "data")
REAL_ANSWERS = os.path.join(DATA, "mturk_discover_spurious_features.csv")
REAL_CLASSES = os.path.join(DATA, "imagenet_class_metadata.csv")

HEADER = ["WorkerId", "Input.wordnet_id", "Input.class_index", "Input.feature_index", "Input.feature_rank",
          "Answer.main", "Answer.confidence", "Answer.reasons"]
CLASSES = {0: "n01440764", 1: "n01443537"}


def row(worker="w1", wnid="n01440764", c="0", j="7", rank="1", answer="main_object", conf="4.0", reason="fins"):
    return [worker, wnid, c, j, rank, answer, conf, reason]


def five_answers(c="0", j="7", wnid="n01440764"):
    """Five valid answers to one pair: 4 main_object, 1 background."""
    answers = ["main_object"] * 4 + ["background"]
    return [row(worker=f"w{i}", c=c, j=j, wnid=wnid, answer=a) for i, a in enumerate(answers)]


def write_csv(path, rows, header=HEADER, encoding="utf-8"):
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    path.write_bytes(buf.getvalue().encode(encoding))
    return str(path)


def table(out, name):
    return storage.read_parquet(storage.join(out, "annotations", name)).to_pylist()


def labels_by_pair(out):
    return {(r["class_index"], r["feature_index"]): r for r in table(out, "labels.parquet")}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("real"))
    classes = {c.class_index: c.wnid for c in read_class_metadata(REAL_CLASSES)}
    return out, classes, ingest.ingest(out, [REAL_ANSWERS], classes)


def test_real_answers_give_the_papers_figures(real):
    out, _, summary = real
    assert summary["files"] == 1
    assert summary["rows"] == summary["accepted"] == 25000
    assert summary["rejected"] == 0 and table(out, "rejected.parquet") == []
    assert summary["pairs"] == 5000
    assert (summary["spurious"], summary["core"], summary["insufficient"]) == (630, 4370, 0)
    assert summary["kinds"] == {"background": 231, "separate_object": 296, "ambiguous": 103}
    assert summary["classes_with_spurious"] == 357
    assert summary["pairs_not_in_build"] is None
    labels = table(out, "labels.parquet")
    assert [(r["class_index"], r["feature_index"]) for r in labels] == sorted((r["class_index"], r["feature_index"]) for r in labels)
    assert {r["feature_rank"] for r in labels} == {1, 2, 3, 4, 5}
    assert all(r["in_build"] is None for r in labels)
    first = table(out, "answers.parquet")[0]
    assert first == {
        "class_index": 0, "wnid": "n01440764", "feature_index": 59, "feature_rank": 1, "worker_id": "52",
        "answer": "main_object", "confidence": 4.0, "reason": "focus is on body of tench",
        "file": REAL_ANSWERS, "line": 2,
    }
    meta = storage.parquet_metadata(storage.join(out, "annotations", "labels.parquet"))
    assert meta["fingerprint"] == summary["fingerprint"] and meta["schema_version"]


def test_shuffled_rows_give_the_same_labels(real, tmp_path):
    out, classes, _ = real
    with open(REAL_ANSWERS, newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    path = write_csv(tmp_path / "shuffled.csv", shuffled, header)
    ingest.ingest(str(tmp_path / "out"), [path], classes)
    assert table(str(tmp_path / "out"), "labels.parquet") == table(out, "labels.parquet")


@pytest.mark.parametrize(
    "bad, kind",
    [
        (row(worker="w9", answer="Background"), "unknown_answer"),
        (row(worker="w9", answer=""), "unknown_answer"),
        (row(worker=""), "missing_worker"),
        (row(worker="w9", c=""), "missing_id"),
        (row(worker="w9", j=""), "missing_id"),
        (row(worker="w9", c="abc"), "non_integer_id"),
        (row(worker="w9", j="1.5"), "non_integer_id"),
        (row(worker="w9", j="-1"), "non_integer_id"),
        (row(worker="w9", rank="first"), "non_integer_id"),
        (row(worker="w9", c="5", wnid=""), "class_out_of_range"),
        (row(worker="w9", wnid="n01443537"), "wnid_mismatch"),
        (row(worker="w9", conf="high"), "non_numeric_confidence"),
        (row(worker="w9", conf=""), "non_numeric_confidence"),
        (row(worker="w9", conf="nan"), "non_numeric_confidence"),
        (row(worker="w9", conf="0"), "confidence_out_of_range"),
        (row(worker="w9", conf="5.5"), "confidence_out_of_range"),
        (row(worker="w0", answer="background"), "duplicate_answer"),
    ],
)
def test_each_bad_row_is_rejected_and_not_counted(tmp_path, bad, kind):
    rows = five_answers()
    rows.insert(2, bad)
    path = write_csv(tmp_path / "a.csv", rows)
    out = str(tmp_path / "out")
    summary = ingest.ingest(out, [path], CLASSES)
    [rejected] = table(out, "rejected.parquet")
    assert (rejected["reason_kind"], rejected["file"], rejected["line"]) == (kind, path, 4)
    assert json.loads(rejected["raw"]) == dict(zip(HEADER, bad))
    assert rejected["reason"]
    assert summary["rejected_by_reason"] == {kind: 1}
    assert (summary["rows"], summary["accepted"], summary["rejected"]) == (6, 5, 1)
    pair = labels_by_pair(out)[(0, 7)]
    assert (pair["votes_main_object"], pair["votes_separate_object"], pair["votes_background"]) == (4, 0, 1)
    assert pair["n_answers"] == 5 and pair["mean_confidence"] == 4.0


def test_tolerated_spellings_are_accepted(tmp_path):
    rows = [
        row(worker="w0", c="0.0", j="7"), row(worker="w1", j="7.0", answer=" background "),
        row(worker="w2", rank="", wnid=""), row(worker="w3", conf=" 5 "), row(worker="w4", conf="1"),
    ]
    out = str(tmp_path / "out")
    summary = ingest.ingest(out, [write_csv(tmp_path / "a.csv", rows)], CLASSES)
    assert summary["rejected"] == 0 and summary["accepted"] == 5
    answers = table(out, "answers.parquet")
    assert {(a["class_index"], a["feature_index"], a["wnid"]) for a in answers} == {(0, 7, "n01440764")}
    assert [a["feature_rank"] for a in answers] == [1, 1, None, 1, 1]
    assert labels_by_pair(out)[(0, 7)]["votes_background"] == 1


def test_duplicates_keep_the_first_answer_in_file_then_line_order(tmp_path):
    first = write_csv(tmp_path / "b.csv", [row(worker="w0", answer="background")])
    second = write_csv(tmp_path / "a.csv", [row(worker="w0", answer="separate_object"), *five_answers()[1:]])
    out = str(tmp_path / "out")
    ingest.ingest(out, [first, second], CLASSES)
    [rejected] = table(out, "rejected.parquet")
    assert (rejected["reason_kind"], rejected["file"], rejected["line"]) == ("duplicate_answer", second, 2)
    pair = labels_by_pair(out)[(0, 7)]
    assert (pair["votes_main_object"], pair["votes_separate_object"], pair["votes_background"]) == (3, 0, 2)


def test_line_numbers_follow_multiline_fields(tmp_path):
    rows = five_answers()
    rows[0][7] = "first line\nsecond line\nthird"
    rows.append(row(worker="w9", answer="unsure"))
    path = write_csv(tmp_path / "a.csv", rows)
    out = str(tmp_path / "out")
    ingest.ingest(out, [path], CLASSES)
    assert [a["line"] for a in table(out, "answers.parquet")] == [2, 5, 6, 7, 8]
    assert table(out, "answers.parquet")[0]["reason"] == "first line\nsecond line\nthird"
    assert [r["line"] for r in table(out, "rejected.parquet")] == [9]


def test_bad_files_are_rejected_whole_and_the_others_ingest(tmp_path):
    good = write_csv(tmp_path / "good.csv", five_answers())
    no_answer = write_csv(tmp_path / "cols.csv", [r[:5] for r in five_answers(j="8")], HEADER[:5])
    latin = write_csv(tmp_path / "latin.csv", [row(worker="w0", j="9", reason="café")], encoding="latin-1")
    bad_quotes = tmp_path / "quotes.csv"
    bad_quotes.write_text(",".join(HEADER) + '\nw0,n01440764,0,10,1,main_object,4,"fins"x\n')
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    files = [good, no_answer, latin, str(bad_quotes), str(empty)]
    out = str(tmp_path / "out")
    summary = ingest.ingest(out, files, CLASSES)
    got = [(r["file"], r["line"], r["reason_kind"]) for r in table(out, "rejected.parquet")]
    assert got == [
        (no_answer, 1, "missing_columns"),
        (latin, 0, "unreadable_file"),
        (str(bad_quotes), 2, "unreadable_row"),
        (str(empty), 1, "missing_columns"),
    ]
    assert "Answer.main" in table(out, "rejected.parquet")[0]["reason"]
    assert set(labels_by_pair(out)) == {(0, 7)}
    assert (summary["files"], summary["accepted"], summary["pairs"]) == (5, 5, 1)


def test_an_oversized_field_rejects_only_its_row(tmp_path):
    rows = five_answers()
    rows.insert(1, row(worker="w9", reason="x" * (answers.MAX_FIELD_CHARS + 1)))
    path = write_csv(tmp_path / "a.csv", rows)
    out = str(tmp_path / "out")
    limit = csv.field_size_limit()
    summary = ingest.ingest(out, [path], CLASSES)
    assert csv.field_size_limit() == limit
    [rejected] = table(out, "rejected.parquet")
    assert (rejected["reason_kind"], rejected["line"]) == ("field_too_large", 3)
    assert summary["accepted"] == 5 and labels_by_pair(out)[(0, 7)]["n_answers"] == 5


def votes_rows(c, j, main=0, separate=0, background=0):
    answers = ["main_object"] * main + ["separate_object"] * separate + ["background"] * background
    return [row(worker=f"w{i}", c=str(c), j=str(j), wnid="", answer=a, conf=str(1 + i % 5)) for i, a in enumerate(answers)]


# (main_object, separate_object, background) -> (label, kind), by the paper's rule
RULE_CASES = {
    (2, 0, 3): ("spurious", "background"),
    (2, 1, 2): ("spurious", "ambiguous"),
    (3, 0, 2): ("core", "core"),
    (0, 0, 4): ("insufficient", None),
    (2, 3, 0): ("spurious", "separate_object"),
    (5, 0, 0): ("core", "core"),
    (2, 2, 1): ("spurious", "ambiguous"),
    (0, 2, 3): ("spurious", "background"),
    (0, 4, 1): ("spurious", "separate_object"),
    (0, 3, 3): ("spurious", "background"),
    (4, 1, 1): ("core", "core"),
    (4, 0, 3): ("spurious", "background"),
    (1, 1, 1): ("insufficient", None),
}


def test_rule_on_vote_patterns(tmp_path):
    rows = []
    for j, votes in enumerate(RULE_CASES):
        rows += votes_rows(0, j, *votes)
    out = str(tmp_path / "out")
    summary = ingest.ingest(out, [write_csv(tmp_path / "a.csv", rows)])
    labels = labels_by_pair(out)
    for j, (votes, expected) in enumerate(RULE_CASES.items()):
        got = labels[(0, j)]
        assert (got["label"], got["kind"]) == expected, votes
        assert (got["votes_main_object"], got["votes_separate_object"], got["votes_background"]) == votes
        assert got["n_answers"] == sum(votes)
    assert (summary["spurious"], summary["core"], summary["insufficient"]) == (8, 3, 2)
    assert summary["kinds"] == {"background": 4, "separate_object": 2, "ambiguous": 2}
    assert summary["classes_with_spurious"] == 1
    assert labels[(0, 0)]["mean_confidence"] == pytest.approx(3.0)


def test_min_answers_sets_the_insufficient_threshold(tmp_path):
    path = write_csv(tmp_path / "a.csv", votes_rows(0, 0, separate=3) + votes_rows(0, 1, main=2))
    out = str(tmp_path / "out")
    ingest.ingest(out, [path], min_answers=3)
    labels = labels_by_pair(out)
    assert (labels[(0, 0)]["label"], labels[(0, 0)]["kind"]) == ("spurious", "separate_object")
    assert (labels[(0, 1)]["label"], labels[(0, 1)]["kind"]) == ("insufficient", None)
    fp3 = storage.parquet_metadata(storage.join(out, "annotations", "labels.parquet"))["fingerprint"]
    ingest.ingest(out, [path], min_answers=5)
    assert labels_by_pair(out)[(0, 0)]["label"] == "insufficient"
    assert storage.parquet_metadata(storage.join(out, "annotations", "labels.parquet"))["fingerprint"] != fp3


def test_without_classes_the_first_wnid_of_a_class_is_the_reference(tmp_path):
    rows = five_answers(c="3", wnid="n00000003") + [row(worker="w9", c="3", j="8", wnid="n99")]
    out = str(tmp_path / "out")
    ingest.ingest(out, [write_csv(tmp_path / "a.csv", rows)])
    [rejected] = table(out, "rejected.parquet")
    assert (rejected["reason_kind"], rejected["line"]) == ("wnid_mismatch", 7)
    assert labels_by_pair(out)[(3, 7)]["wnid"] == "n00000003"


def test_memory_build_pairs_and_bom(tmp_path):
    out = "memory://ingest-test/out"
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\r\n").writerows([HEADER, *five_answers(), *five_answers(j="9")[:2]])
    storage.write_bytes_atomic(storage.join(out, answers.INCOMING, "batch.csv"), buf.getvalue().encode("utf-8-sig"))
    files = answers.answer_files(out)
    assert files == [f"{out}/annotations/incoming/batch.csv"]
    summary = ingest.ingest(out, files, CLASSES, build_pairs=[(0, 9), (1, 3)])
    assert summary["rejected"] == 0 and summary["accepted"] == 7
    assert summary["pairs_not_in_build"] == 1 and summary["pairs_without_answers"] == 1
    labels = labels_by_pair(out)
    assert {k: (r["label"], r["in_build"], r["n_answers"]) for k, r in labels.items()} == {
        (0, 7): ("core", False, 5),
        (0, 9): ("insufficient", True, 2),
        (1, 3): ("insufficient", True, 0),
    }
    assert labels[(1, 3)]["wnid"] == "n01443537" and labels[(1, 3)]["mean_confidence"] is None


def test_unusable_arguments_fail_early(tmp_path):
    path = write_csv(tmp_path / "a.csv", five_answers())
    out = str(tmp_path / "out")
    with pytest.raises(InputError, match="no answer files"):
        ingest.ingest(out, [])
    with pytest.raises(InputError, match="not found"):
        ingest.ingest(out, [path, str(tmp_path / "missing.csv")])
    with pytest.raises(InputError, match="more than once"):
        ingest.ingest(out, [path, path])
    with pytest.raises(ValueError, match="min_answers"):
        ingest.ingest(out, [path], min_answers=0)
    assert not os.path.exists(os.path.join(out, "annotations"))
