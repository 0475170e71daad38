import csv
import io
import json
import random

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from salient import study, storage
from salient.errors import InputError
from salient.metadata import ClassInfo

RESIZE = CROP = 8  # images are 8 wide and 10 high: no resize, the crop keeps rows 1..8
GAP = 2
WNIDS = ["n00000001", "n00000002", "n00000003"]
# (class_index, feature_index, feature_rank, label, kind, number of ranks)
PAIRS = [(0, 3, 1, "core", "core", 7), (1, 5, 2, "spurious", "background", 7), (2, 0, 1, "core", "core", 1)]
BASE_MAP = np.array([[1.0, 0.5], [0.25, 0.0]])


def nam_of(c, rank):
    """A 2x2 map per (class, rank), exact in float16."""
    return np.rot90(BASE_MAP, k=(c + rank) % 4)


def make_world(tmp_path, pairs=PAIRS):
    root, out = tmp_path / "root", tmp_path / "out"
    rng = np.random.default_rng(0)
    rows = []
    for c, j, feature_rank, label, kind, k in pairs:
        (root / WNIDS[c]).mkdir(parents=True, exist_ok=True)
        for rank in range(1, k + 1):
            rel = f"{WNIDS[c]}/{WNIDS[c]}_{rank}.JPEG"
            yy, xx = np.mgrid[0:10, 0:8]
            base = rng.uniform(40, 200, 3)
            img = np.clip(base + 6 * yy[..., None] - 5 * xx[..., None], 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / rel, format="JPEG", quality=95)
            rows.append({
                "row": 0, "class_index": c, "wnid": WNIDS[c], "feature_index": j, "feature_rank": feature_rank,
                "label": label, "kind": kind, "image_id": 100 * c + rank, "relpath": rel, "image_label": c,
                "rank": rank, "activation": float(10 - rank), "nam": nam_of(c, rank).ravel().tolist(),
                "nam_h": 2, "nam_w": 2,
            })
    random.Random(1).shuffle(rows)  # the index is ordered by image, not by rank
    for i, r in enumerate(rows):
        r["row"] = i
    schema = pa.schema([
        ("row", pa.int64()), ("class_index", pa.int32()), ("wnid", pa.string()), ("feature_index", pa.int32()),
        ("feature_rank", pa.int32()), ("label", pa.string()), ("kind", pa.string()), ("image_id", pa.int64()),
        ("relpath", pa.string()), ("image_label", pa.int32()), ("rank", pa.int32()), ("activation", pa.float32()),
        ("nam", pa.list_(pa.float16(), 4)), ("nam_h", pa.int32()), ("nam_w", pa.int32()),
    ])
    storage.write_parquet(storage.join(str(out), "masks/index.parquet"), pa.Table.from_pylist(rows, schema=schema), "fp")
    return str(root), str(out)


def read_tasks(out):
    return list(csv.DictReader(io.StringIO(storage.read_bytes(storage.join(out, "study/tasks.csv")).decode())))


def png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def tiles(strip, n):
    assert strip.shape == (CROP, n * (CROP + GAP) - GAP, 3)
    return [strip[:, i * (CROP + GAP) : i * (CROP + GAP) + CROP] for i in range(n)]


# --- independent reference for a heatmap tile -------------------------------------------------------


def bilinear_half_pixel(low, size):
    h, w = low.shape
    out = np.zeros((size, size))
    for y in range(size):
        sy = min(max((y + 0.5) * h / size - 0.5, 0.0), h - 1)
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for x in range(size):
            sx = min(max((x + 0.5) * w / size - 0.5, 0.0), w - 1)
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = low[y0, x0] * (1 - fx) + low[y0, x1] * fx
            bottom = low[y1, x0] * (1 - fx) + low[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bottom * fy
    return out


# matplotlib's jet anchors (x, value) per channel, as in matplotlib._cm._jet_data
JET_ANCHORS = {
    "r": [(0, 0), (0.35, 0), (0.66, 1), (0.89, 1), (1, 0.5)],
    "g": [(0, 0), (0.125, 0), (0.375, 1), (0.64, 1), (0.91, 0), (1, 0)],
    "b": [(0, 0.5), (0.11, 1), (0.34, 1), (0.65, 0), (1, 0)],
}


def jet_by_hand(v):
    out = []
    for ch in "rgb":
        xs, ys = zip(*JET_ANCHORS[ch])
        k = max(i for i in range(len(xs) - 1) if xs[i] <= v) if v < 1 else len(xs) - 2
        t = (v - xs[k]) / (xs[k + 1] - xs[k])
        out.append(ys[k] + t * (ys[k + 1] - ys[k]))
    return out


def test_jet_by_hand_hits_the_anchor_values():
    assert jet_by_hand(0.0) == [0, 0, 0.5]
    assert jet_by_hand(1.0) == [0.5, 0, 0]
    assert jet_by_hand(0.5) == pytest.approx([0.15 / 0.31, 1, 1 - 0.16 / 0.31])


# --- export --------------------------------------------------------------------------------------------


def test_sides_never_share_an_image():
    assert study.sides(65, 5) == (5, 5)  # ranks 1..5 against 61..65, as in the paper
    assert study.sides(10, 5) == (5, 5)
    assert study.sides(7, 5) == (5, 2)
    assert study.sides(3, 5) == (2, 1)
    assert study.sides(2, 5) == (1, 1)
    for n in range(2, 20):
        a, b = study.sides(n, 5)
        assert 1 <= b <= a <= 5 and a + b <= n
    with pytest.raises(ValueError, match="at least 2 images"):
        study.sides(1, 5)
    with pytest.raises(ValueError, match="images_per_side"):
        study.sides(10, 0)


def test_export_writes_strips_and_tasks(tmp_path):
    root, out = make_world(tmp_path)
    meta = [ClassInfo(0, WNIDS[0], "=tench", "a fish", "fish"), ClassInfo(1, WNIDS[1], "goldfish", "", "fish")]
    summary = study.export_study(out, root, RESIZE, CROP, metadata=meta)
    assert summary == {"pairs": 2, "skipped": 1, "made": 2, "tasks": storage.join(out, "study/tasks.csv")}
    for c, j in [(0, 3), (1, 5)]:
        folder = tmp_path / "out" / "study" / WNIDS[c] / f"feature_{j}"
        for side, n in (("a", 5), ("b", 2)):
            tiles(png(folder / f"{side}_images.png"), n)
            tiles(png(folder / f"{side}_heatmaps.png"), n)
    assert not (tmp_path / "out" / "study" / WNIDS[2]).exists()

    tasks = read_tasks(out)
    assert list(tasks[0]) == list(study.TASK_COLUMNS)
    assert [(t["class_index"], t["feature_index"], t["feature_rank"], t["label"]) for t in tasks] == [
        ("0", "3", "1", "core"), ("1", "5", "2", "spurious"),
    ]
    t = tasks[0]
    assert (t["class_name"], t["definition"], t["supercategory"]) == ("'=tench", "a fish", "fish")  # no formula
    assert (t["a_ranks"], t["b_ranks"]) == ("1;2;3;4;5", "6;7")
    assert (t["a_image_ids"], t["b_image_ids"]) == ("1;2;3;4;5", "6;7")
    assert not set(t["a_ranks"].split(";")) & set(t["b_ranks"].split(";"))
    assert t["a_images_url"] == f"{WNIDS[0]}/feature_3/a_images.png"
    assert t["b_heatmaps_url"] == f"{WNIDS[0]}/feature_3/b_heatmaps.png"
    assert (tasks[1]["class_name"], tasks[1]["b_ranks"]) == ("goldfish", "6;7")

    study.export_study(out, root, RESIZE, CROP, base_url="https://cdn.example/study/")
    tasks = read_tasks(out)
    assert tasks[0]["a_heatmaps_url"] == f"https://cdn.example/study/{WNIDS[0]}/feature_3/a_heatmaps.png"
    assert tasks[0]["class_name"] == ""


def test_tiles_match_an_independent_computation(tmp_path):
    root, out = make_world(tmp_path)
    study.export_study(out, root, RESIZE, CROP)
    folder = tmp_path / "out" / "study" / WNIDS[1] / "feature_5"
    for side, ranks in (("a", range(1, 6)), ("b", (6, 7))):
        images, heatmaps = (tiles(png(folder / f"{side}_{k}.png"), len(ranks)) for k in ("images", "heatmaps"))
        for i, rank in enumerate(ranks):
            decoded = np.asarray(Image.open(f"{root}/{WNIDS[1]}/{WNIDS[1]}_{rank}.JPEG").convert("RGB"))
            crop = decoded[1:9]  # centre crop of 10 rows to 8
            np.testing.assert_array_equal(images[i], crop)
            mask = bilinear_half_pixel(nam_of(1, rank), CROP)
            colour = np.array([[jet_by_hand(v) for v in line] for line in mask])
            raw = colour + crop / 255.0
            expected = np.rint(raw / raw.max() * 255)
            assert np.abs(heatmaps[i].astype(int) - expected).max() <= 1


def test_fewer_images_per_side(tmp_path):
    root, out = make_world(tmp_path)
    study.export_study(out, root, RESIZE, CROP, images_per_side=3)
    assert [(t["a_ranks"], t["b_ranks"]) for t in read_tasks(out)] == [("1;2;3", "5;6;7")] * 2
    tiles(png(tmp_path / "out" / "study" / WNIDS[0] / "feature_3" / "b_images.png"), 3)


def test_rerun_remakes_only_changed_pairs(tmp_path):
    root, out = make_world(tmp_path)
    assert study.export_study(out, root, RESIZE, CROP)["made"] == 2
    assert study.export_study(out, root, RESIZE, CROP)["made"] == 0
    uri = storage.join(out, "masks/index.parquet")
    table = storage.read_parquet(uri)
    nams = [
        [0.0, 0.0, 0.0, 1.0] if (c, r) == (1, 7) else n
        for c, r, n in zip(table["class_index"].to_pylist(), table["rank"].to_pylist(), table["nam"].to_pylist())
    ]
    table = table.set_column(table.schema.get_field_index("nam"), "nam", pa.array(nams, table.schema.field("nam").type))
    storage.write_parquet(uri, table, "fp2")
    assert study.export_study(out, root, RESIZE, CROP)["made"] == 1


def test_export_errors(tmp_path):
    with pytest.raises(InputError, match="run `salient generalize CONFIG` first"):
        study.export_study(str(tmp_path / "nothing"), str(tmp_path), RESIZE, CROP)
    root, out = make_world(tmp_path)
    with pytest.raises(ValueError, match="images_per_side"):
        study.export_study(out, root, RESIZE, CROP, images_per_side=0)
    (tmp_path / "root" / WNIDS[0] / f"{WNIDS[0]}_2.JPEG").write_bytes(b"")
    with pytest.raises(InputError, match=f"cannot read image .*{WNIDS[0]}_2.JPEG"):
        study.export_study(out, root, RESIZE, CROP)


# --- ingest --------------------------------------------------------------------------------------------

HEADER = ["WorkerId", "Input.wordnet_id", "Input.class_index", "Input.feature_index",
          "Answer.main", "Answer.confidence", "Answer.reasons", "HITId"]
CLASSES = {0: WNIDS[0], 1: WNIDS[1], 2: WNIDS[2]}


def answer(worker, c, j, main, conf="4", reason="same fins", wnid=None):
    return [worker, CLASSES[c] if wnid is None else wnid, str(c), str(j), main, conf, reason, "hit"]


GOOD = [
    # pair (0, 3): 3 same, 1 different, 1 A_unclear -> 3/4
    answer("w1", 0, 3, "same", "5"), answer("w2", 0, 3, "same", "4"), answer("w3", 0, 3, "same", "3"),
    answer("w4", 0, 3, "different", "2"), answer("w5", 0, 3, "A_unclear", "1"),
    # pair (1, 5): 1 same, 1 different, 1 B_unclear -> 1/2
    answer("w1", 1, 5, "same", "4.5"), answer("w2", 1, 5, "different", "3"), answer("w3", 1, 5, "B_unclear", "2"),
    # pair (2, 0): only unclear answers -> no agreement
    answer("w1", 2, 0, "A_unclear", "1"), answer("w2", 2, 0, "B_unclear", "5"),
]


def write_csv(path, rows, header=HEADER):
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    path.write_bytes(buf.getvalue().encode())
    return str(path)


def pairs_table(out):
    return {(r["class_index"], r["feature_index"]): r
            for r in storage.read_parquet(storage.join(out, study.GENERALIZATION_TABLE)).to_pylist()}


def test_ingest_figures_by_hand(tmp_path):
    out = str(tmp_path / "out")
    summary = study.ingest_study(out, [write_csv(tmp_path / "a.csv", GOOD)], CLASSES)
    assert (summary["rows"], summary["answers"], summary["rejected"], summary["pairs"]) == (10, 10, 0, 3)
    assert summary["votes"] == {"same": 4, "different": 2, "A_unclear": 2, "B_unclear": 2}
    assert summary["overall_agreement"] == pytest.approx(4 / 6)
    pairs = pairs_table(out)
    assert pairs[0, 3] == {
        "class_index": 0, "wnid": WNIDS[0], "feature_index": 3, "votes_same": 3, "votes_different": 1,
        "votes_a_unclear": 1, "votes_b_unclear": 0, "n_answers": 5, "agreement": 0.75, "mean_confidence": 3.0,
    }
    second = pairs[1, 5]
    assert (second["agreement"], second["votes_b_unclear"], second["mean_confidence"]) == (0.5, 1, pytest.approx(9.5 / 3))
    assert pairs[2, 0]["agreement"] is None and pairs[2, 0]["n_answers"] == 2
    answers = storage.read_parquet(storage.join(out, study.GENERALIZATION_ANSWERS_TABLE)).to_pylist()
    assert answers[0] == {
        "class_index": 0, "wnid": WNIDS[0], "feature_index": 3, "worker_id": "w1", "answer": "same",
        "confidence": 5.0, "reason": "same fins", "file": str(tmp_path / "a.csv"), "line": 2,
    }
    meta = storage.parquet_metadata(storage.join(out, study.GENERALIZATION_TABLE))
    assert meta["fingerprint"] == summary["fingerprint"] and float(meta["overall_agreement"]) == pytest.approx(4 / 6)


def test_each_rejection_reason(tmp_path):
    out = str(tmp_path / "out")
    bad = [
        answer("w9", 0, 3, "main_object"),                            # unknown_answer (a discovery answer)
        ["w9", WNIDS[0], "", "3", "same", "4", "", "hit"],            # missing_id
        ["w9", WNIDS[0], "0", "3.5", "same", "4", "", "hit"],         # non_integer_id
        ["w9", "n09999999", "7", "3", "same", "4", "", "hit"],        # class_out_of_range
        answer("w9", 1, 5, "same", wnid=WNIDS[0]),                    # wnid_mismatch
        answer("w9", 1, 5, "same", conf="sure"),                      # non_numeric_confidence
        answer("w9", 1, 5, "same", conf="6"),                         # confidence_out_of_range
        answer("w1", 0, 3, "different"),                              # duplicate_answer: w1's first counts
        answer("", 0, 3, "same"),                                     # missing_worker
    ]
    files = [
        write_csv(tmp_path / "a.csv", GOOD + bad),
        write_csv(tmp_path / "b.csv", [answer("w1", 0, 3, "same")], header=HEADER[:4]),  # missing_columns
        str(tmp_path / "c.csv"),
    ]
    (tmp_path / "c.csv").write_bytes(b"WorkerId\n\xff\xfe\n")  # unreadable_file
    summary = study.ingest_study(out, files, CLASSES)
    rejected = storage.read_parquet(storage.join(out, study.GENERALIZATION_REJECTED_TABLE)).to_pylist()
    kinds = ["unknown_answer", "missing_id", "non_integer_id", "class_out_of_range", "wnid_mismatch",
             "non_numeric_confidence", "confidence_out_of_range", "duplicate_answer", "missing_worker"]
    assert [(r["file"], r["line"], r["reason_kind"]) for r in rejected] == [
        *((files[0], 12 + i, k) for i, k in enumerate(kinds)),
        (files[1], 1, "missing_columns"), (files[2], 0, "unreadable_file"),
    ]
    assert "same, different, A_unclear, B_unclear" in rejected[0]["reason"]
    assert json.loads(rejected[0]["raw"])["Answer.main"] == "main_object"
    assert summary["rejected"] == 11 and summary["answers"] == 10
    assert summary["overall_agreement"] == pytest.approx(4 / 6)  # bad rows never count
    assert pairs_table(out)[0, 3]["votes_different"] == 1


def test_ingest_is_invariant_to_row_order(tmp_path):
    first = study.ingest_study(str(tmp_path / "o1"), [write_csv(tmp_path / "a.csv", GOOD)], CLASSES)
    shuffled = GOOD[:]
    random.Random(3).shuffle(shuffled)
    second = study.ingest_study(str(tmp_path / "o2"), [write_csv(tmp_path / "b.csv", shuffled)], CLASSES)
    assert pairs_table(str(tmp_path / "o1")) == pairs_table(str(tmp_path / "o2"))
    assert first["overall_agreement"] == second["overall_agreement"] and first["votes"] == second["votes"]


def test_without_classes_the_wnid_comes_from_the_answers(tmp_path):
    rows = [answer("w1", 0, 3, "same"), answer("w2", 0, 3, "different", wnid=WNIDS[1])]
    summary = study.ingest_study(str(tmp_path / "out"), [write_csv(tmp_path / "a.csv", rows)])
    assert summary["rejected_by_reason"] == {"wnid_mismatch": 1}
    assert pairs_table(str(tmp_path / "out"))[0, 3]["wnid"] == WNIDS[0]


def test_answer_files_and_ingest_errors(tmp_path):
    out = str(tmp_path / "out")
    incoming = tmp_path / "out" / "annotations" / "study_incoming"
    incoming.mkdir(parents=True)
    for name in ("b.csv", "a.csv", "notes.txt", ".hidden.csv"):
        (incoming / name).write_text("x")
    extra = str(tmp_path / "z.csv")
    assert study.study_answer_files(out, [extra, str(incoming / "b.csv")]) == [
        extra, str(incoming / "b.csv"), storage.join(out, study.STUDY_INCOMING, "a.csv"),
    ]
    empty = str(tmp_path / "empty")
    assert study.study_answer_files(empty) == []
    with pytest.raises(InputError, match="study_incoming"):
        study.ingest_study(empty, study.study_answer_files(empty))
    with pytest.raises(InputError, match="not found"):
        study.ingest_study(out, [extra])
    with pytest.raises(InputError, match="more than once"):
        study.ingest_study(out, [str(incoming / "a.csv")] * 2)
    with pytest.raises(InputError, match="classes is empty"):
        study.ingest_study(out, [str(incoming / "a.csv")], {})
