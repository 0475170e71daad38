"""The answers API on its own: finding answer files, the ledger's records, its tables and its
extension point. Row checks and hostile files are tested through the ingest stage
(test_ingest.py, test_hostile_answers.py)."""

import csv
import dataclasses
import hashlib
import io
import json

import pytest

from salient import answers
from salient.errors import InputError

HEADER = list(answers.ANSWER_COLUMNS)
CLASSES = {0: "n01440764", 1: "n01443537"}


def write_csv(path, rows, header=HEADER):
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    path.write_text(buf.getvalue(), encoding="utf-8")
    return str(path)


def row(worker, answer="main_object", j="7", wnid="n01440764"):
    return [worker, wnid, "0", j, "1", answer, "4", f"by {worker}"]


def test_answer_files_order(tmp_path):
    out = tmp_path / "out"
    incoming = out / "annotations" / "incoming"
    (incoming / "sub").mkdir(parents=True)
    for name in ["b.csv", "a.csv", "notes.txt", ".partial.csv", "sub/c.csv", "c.csv"]:
        (incoming / name).write_text("x")
    extra = [str(tmp_path / "z.csv"), str(incoming / "c.csv"), str(tmp_path / "z.csv")]
    assert answers.answer_files(str(out), extra) == [
        str(tmp_path / "z.csv"), str(incoming / "c.csv"), str(incoming / "a.csv"), str(incoming / "b.csv"),
    ]
    assert answers.answer_files(str(tmp_path / "nothing"), ["x.csv"]) == ["x.csv"]


def test_ledger_keeps_each_workers_first_answer_and_says_why_not_the_others(tmp_path):
    first = write_csv(tmp_path / "first.csv", [row("w0", "background"), row("w1")])
    second = write_csv(tmp_path / "second.csv", [row("w0", "separate_object"), row("w2", "unsure")])
    ledger = answers.Ledger(CLASSES)
    ledger.read(first)
    ledger.read(second)

    assert ledger.accepted == [
        answers.Answer(0, "n01440764", 7, 1, "w0", "background", 4.0, "by w0", first, 2),
        answers.Answer(0, "n01440764", 7, 1, "w1", "main_object", 4.0, "by w1", first, 3),
    ]
    duplicate, unknown = ledger.rejected
    assert (duplicate.file, duplicate.line, duplicate.reason_kind) == (second, 2, "duplicate_answer")
    assert f"{first}:2" in duplicate.reason
    assert json.loads(duplicate.raw) == dict(zip(HEADER, row("w0", "separate_object")))
    assert (unknown.line, unknown.reason_kind) == (3, "unknown_answer")
    assert ledger.rows == 4
    assert ledger.rejected_by_reason() == {"duplicate_answer": 1, "unknown_answer": 1}
    assert ledger.digests == [
        (uri, hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
        for uri, name in [(first, "first.csv"), (second, "second.csv")]
    ]
    assert ledger.wnids == CLASSES


def test_without_classes_a_class_keeps_its_first_wnid(tmp_path):
    ledger = answers.Ledger()
    ledger.read(write_csv(tmp_path / "a.csv", [row("w0", wnid="n1"), row("w1", wnid=""), row("w2", wnid="n2")]))
    assert [a.wnid for a in ledger.accepted] == ["n1", "n1"]
    assert [r.reason_kind for r in ledger.rejected] == ["wnid_mismatch"]
    assert ledger.wnids == {0: "n1"}


def test_tables_follow_the_schemas(tmp_path):
    ledger = answers.Ledger(CLASSES)
    assert ledger.accepted_table().schema == answers.ANSWERS_SCHEMA and ledger.accepted_table().num_rows == 0
    assert ledger.rejected_table().schema == answers.REJECTED_SCHEMA and ledger.rejected_table().num_rows == 0
    ledger.read(write_csv(tmp_path / "a.csv", [row("w0"), row("", "background")]))
    assert ledger.accepted_table().to_pylist() == [dataclasses.asdict(a) for a in ledger.accepted]
    assert ledger.rejected_table().to_pylist() == [dataclasses.asdict(r) for r in ledger.rejected]
    fewer = answers.ANSWERS_SCHEMA.remove(answers.ANSWERS_SCHEMA.get_field_index("feature_rank"))
    assert ledger.accepted_table(fewer).column_names == fewer.names


def test_a_subclass_checks_answers_of_another_kind(tmp_path):
    class YesNo(answers.Ledger):
        columns = ("WorkerId", "Input.class_index", "Input.feature_index", "Answer.main", "Answer.confidence")

        def validate(self, cells, file, line):
            if cells.get("Answer.main") not in ("yes", "no"):
                raise answers.Rejected("unknown_answer", "Answer.main is not yes or no")
            return dataclasses.replace(super().validate({**cells, "Answer.main": "main_object"}, file, line), answer=cells["Answer.main"])

    ledger = YesNo()
    ledger.read(write_csv(tmp_path / "a.csv", [row("w0", "yes"), row("w1", "main_object")]))
    ledger.read(write_csv(tmp_path / "b.csv", [["w0", "0", "7"]], ["WorkerId", "Input.class_index", "Input.feature_index"]))
    assert [a.answer for a in ledger.accepted] == ["yes"]
    assert [r.reason_kind for r in ledger.rejected] == ["unknown_answer", "missing_columns"]
    assert ledger.rejected[1].reason.endswith("expected the columns " + ", ".join(YesNo.columns))


def test_check_inputs_names_what_is_wrong(tmp_path):
    path = write_csv(tmp_path / "a.csv", [row("w0")])
    out = str(tmp_path / "out")
    answers.check_inputs(out, [path], CLASSES, answers.INCOMING, "give files")
    for args, message in [
        (("", [path], None), "root is empty"),
        ((out, [], None), "give files under"),
        ((out, [path, path], None), "more than once"),
        ((out, [str(tmp_path / "missing.csv")], None), "not found"),
        ((out, [path], {}), "classes is empty"),
    ]:
        with pytest.raises(InputError, match=message):
            answers.check_inputs(*args, answers.INCOMING, "give files")


@pytest.mark.parametrize("given", ["alice", "ALICE", "Alice", "\uff21\uff2c\uff29\uff23\uff25"])
def test_one_worker_however_their_id_is_cased_or_which_width(given):
    assert answers.worker_identity(given) == "alice"


@pytest.mark.parametrize("given", ["\u0430lice", "jos\u00e9", "w\u200b1"])
def test_worker_ids_outside_ascii_are_refused_with_what_they_are(given):
    with pytest.raises(answers.Rejected) as caught:
        answers.worker_identity(given)
    assert caught.value.kind == "non_ascii_worker_id" and repr(given) in caught.value.reason


def test_the_ledger_keeps_the_worker_identity(tmp_path):
    ledger = answers.Ledger(CLASSES)
    ledger.read(write_csv(tmp_path / "a.csv", [row("Bob", j="7"), row("BOB", j="8"), row("bob", j="7")]))
    assert [(a.worker_id, a.feature_index) for a in ledger.accepted] == [("bob", 7), ("bob", 8)]
    [again] = ledger.rejected
    assert again.reason_kind == "duplicate_answer" and "'bob' already answered class 0 feature 7" in again.reason
