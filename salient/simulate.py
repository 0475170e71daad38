"""A simulated annotator for synthetic worlds: answers each discovery task the way a worker would,
from where the NAM's mass falls on the ground-truth masks of the pair's top images.

A worker looks at the heatmaps of the shown images and names the region most of the red falls on:
the object (``main_object``), a background cue or the plain background (``background``), or a
separate object (``separate_object``). With probability ``simulated_noise`` a worker answers at
random instead. Answers are written in the paper's CSV schema under ``annotations/incoming/``, so
they go through the same ingestion as people's.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import torch

from salient import groundtruth, nam, storage, tables
from salient.config import AnnotationsConfig, PreprocessConfig
from salient.dataset import require_nams
from salient.discover import pair_dir
from salient.errors import InputError
from salient.answers import ANSWER_COLUMNS, ANSWERS, INCOMING

SIMULATED_FILE = "simulated.csv"


def perceived(record: dict, truths: dict[str, groundtruth.ImageTruth], crop: int) -> tuple[dict[str, float], str]:
    """Mean shares of the red region's mass (object, cue, rest) over a pair's shown images, and the
    kind of cue they show."""
    low = torch.tensor(record["nams"], dtype=torch.float32).view(-1, record["nam_h"], record["nam_w"])
    masks = nam.upsample(low, crop).clamp(0, 1).numpy()
    radius = groundtruth.cell_radius(crop, record["nam_w"])
    shares = [groundtruth.mass_fractions(m, groundtruth.regions(truths[r], radius)) for m, r in zip(masks, record["relpaths"])]
    mean = {k: float(np.mean([s[k] for s in shares])) for k in ("object", "cue", "rest")}
    kinds = [truths[r].cue_kind for r in record["relpaths"] if truths[r].cue_kind != "none"]
    return mean, (max(set(kinds), key=kinds.count) if kinds else "none")


def true_answer(shares: dict[str, float], cue_kind: str) -> tuple[str, float]:
    """The answer a careful worker gives, and the share of the mass behind it."""
    scores = {
        "main_object": shares["object"],
        "separate_object": shares["cue"] if cue_kind == "separate_object" else 0.0,
        "background": shares["rest"] + (shares["cue"] if cue_kind != "separate_object" else 0.0),
    }
    answer = max(ANSWERS, key=lambda a: scores[a])
    return answer, scores[answer]


def simulate(
    build: str, root: str, groundtruth_uri: str, split: str, preprocess: PreprocessConfig, cfg: AnnotationsConfig,
    answers_root: str | None = None,
) -> dict:
    """Answer every pair discovered in the build directory ``build`` with ``cfg.simulated_workers``
    workers, into ``annotations/incoming/`` of the output root ``answers_root`` (default ``build``);
    ``root`` is the dataset root. Returns a summary."""
    pairs = storage.read_parquet(storage.join(build, tables.PAIRS.path)).to_pylist()
    records = []
    for p in pairs:
        uri = storage.join(pair_dir(build, p["wnid"], p["feature_index"]), tables.ASSETS)
        if not storage.exists(uri):
            raise InputError(f"pair ({p['class_index']}, {p['feature_index']}) has no discovery assets; run `salient discover CONFIG` first")
        record = storage.read_json(uri)
        if record.get("nams"):
            records.append(record)
    truths = groundtruth.load(groundtruth_uri, split, [r for rec in records for r in rec["relpaths"]], preprocess.resize, preprocess.crop)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(ANSWER_COLUMNS)
    answers = 0
    for rec in records:
        shares, cue_kind = perceived(rec, truths, preprocess.crop)
        truth, share = true_answer(shares, cue_kind)
        for w in range(cfg.simulated_workers):
            rng = np.random.default_rng([cfg.seed, rec["class_index"], rec["feature_index"], w])
            noisy = rng.random() < cfg.simulated_noise
            answer = str(rng.choice(ANSWERS)) if noisy else truth
            confidence = int(np.clip(round(1 + 4 * share + rng.normal(0, 0.5)), 1, 5))
            region = {"main_object": "the object", "separate_object": "a separate object", "background": "the background"}[answer]
            reason = f"the red region is mostly on {region}" + ("" if noisy else f" ({share:.0%} of the heat)")
            writer.writerow([f"sim-{w:02d}", rec["wnid"], rec["class_index"], rec["feature_index"], rec["feature_rank"], answer, f"{confidence:.1f}", reason])
            answers += 1
    uri = storage.join(answers_root or build, INCOMING, SIMULATED_FILE)
    storage.write_bytes_atomic(uri, buf.getvalue().encode("utf-8"))
    return {"uri": uri, "pairs": len(records), "answers": answers, "workers": cfg.simulated_workers}


def generalization_check(build: str, groundtruth_uri: str, split: str, crop: int, n: int = 5) -> list[dict]:
    """Per pair with masks: the answer a careful worker gives on ranks 1..n and on the last n ranks
    kept (the paper's Section 3.4 check, with the world's truth instead of people), from the masks
    of the build directory ``build``."""
    index = storage.read_parquet(storage.join(build, tables.MASK_INDEX.path)).sort_by(
        [("class_index", "ascending"), ("feature_index", "ascending"), ("rank", "ascending")]
    )
    require_nams(index, f"{build}: the generalisation check")
    pairs: dict[tuple[int, int], list[dict]] = {}
    for row in index.to_pylist():
        pairs.setdefault((row["class_index"], row["feature_index"]), []).append(row)
    truths = groundtruth.load(groundtruth_uri, split, index.column("relpath").to_pylist(), crop, crop) if index.num_rows else {}
    results = []
    for (c, j), rows in pairs.items():
        if len(rows) < 2:
            continue
        k = min(n, len(rows) // 2)
        sides = {}
        for name, part in (("top", rows[:k]), ("last", rows[-k:])):
            record = {"nams": [r["nam"] for r in part], "nam_h": part[0]["nam_h"], "nam_w": part[0]["nam_w"], "relpaths": [r["relpath"] for r in part]}
            shares, kind = perceived(record, truths, crop)
            sides[name] = (true_answer(shares, kind)[0], shares, [r["rank"] for r in part])
        results.append({
            "class_index": c, "feature_index": j, "label": rows[0]["label"],
            "top_answer": sides["top"][0], "last_answer": sides["last"][0],
            "top_object": sides["top"][1]["object"], "last_object": sides["last"][1]["object"],
            "last_ranks": sides["last"][2], "same": sides["top"][0] == sides["last"][0],
        })
    return results
