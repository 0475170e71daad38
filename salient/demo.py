"""The embedded demo: a synthetic world with ground truth, a biased and a debiased classifier,
and the pipeline's stages run on it. Whatever is already there with the same inputs is reused."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyarrow as pa
import yaml

from salient import builds, groundtruth, models, report, simulate, storage, tables, train, world

MODELS = (("biased", False), ("debiased", True))


def _world(out: str, params: dict) -> dict:
    """The world under ``out``, synthesized unless a complete one with these parameters is there."""
    meta_uri = storage.join(out, "world.json")
    if storage.exists(storage.join(out, "groundtruth.parquet")) and storage.exists(meta_uri):
        meta = storage.read_json(meta_uri)
        if meta["params"] == params and meta.get("generator_version") == world.GENERATOR_VERSION:
            print(f"world: reusing {out}")
            return meta
    summary = world.synthesize(out, **params)
    print(f"world: wrote {sum(summary['images'].values())} images to {out}")
    return storage.read_json(meta_uri)


def _model(world_dir: str, world_fp: str, ckpt: str, rho_free: bool, seed: int) -> None:
    """Train the demo model into ``ckpt`` unless one trained on this world with this seed is there."""
    meta_uri = ckpt.removesuffix(".pt") + ".json"
    key = {"world": world_fp, "rho_free": rho_free, "seed": seed, "epochs": train.DEMO_EPOCHS}
    if storage.exists(ckpt) and storage.exists(meta_uri) and storage.read_json(meta_uri) == key:
        print(f"model: reusing {ckpt}")
        return
    result = train.train_demo(world_dir, ckpt, rho_free=rho_free, seed=seed)
    storage.write_json(meta_uri, key)
    print(f"model: trained {ckpt} in {result['seconds']:.0f}s")


def demo_config(out: str, size: int) -> dict:
    """The Salient config of the demo build, as a plain dict (written to ``<out>/salient.yaml``)."""
    return {
        "dataset": {
            "root": storage.join(out, "world", "train"),
            "class_metadata": storage.join(out, "world", "classes.csv"),
            "groundtruth": storage.join(out, "world", "groundtruth.parquet"),
        },
        "model": {"checkpoint": storage.join(out, "models", "biased.pt"), "arch": "tiny_resnet", "format": "robustness"},
        "preprocess": {"resize": size, "crop": size},
        "output": storage.join(out, "build"),
        "compute": {"shard_size": 200, "batch_size": 64},
        "evaluate": {
            "models": [
                {"name": name, "arch": "tiny_resnet", "format": "robustness", "checkpoint": storage.join(out, "models", f"{name}.pt")}
                for name, _ in MODELS
            ],
            "sigmas": [0.25, 0.5, 1.0],
        },
    }


def run(
    out: str,
    classes: int = 6,
    per_class: int = 100,
    size: int = 64,
    seed: int = 0,
    stages: Sequence[Callable[[str], object]] = (),
) -> dict:
    """Build (or reuse) the world and both models, print their accuracy table, write the demo
    config, run each of ``stages`` on it (called with the config's path), and describe the result."""
    out = storage.normalize_uri(out)
    world_dir = storage.join(out, "world")
    meta = _world(world_dir, {"classes": classes, "per_class": per_class, "size": size, "rho": 0.9, "seed": seed})
    for name, rho_free in MODELS:
        _model(world_dir, meta["fingerprint"], storage.join(out, "models", f"{name}.pt"), rho_free, seed)

    table = {
        name: {split: train.accuracy(storage.join(out, "models", f"{name}.pt"), storage.join(world_dir, split)) for split in ("val", "swapped")}
        for name, _ in MODELS
    }
    print("\nmodel      trained on            val acc   cue-swapped acc   drop")
    for name, rho_free in MODELS:
        val, swapped = table[name]["val"], table[name]["swapped"]
        source = "train_free (no cue)" if rho_free else f"train (cue rho={meta['params']['rho']})"
        print(f"{name:<10} {source:<21} {val:7.3f}   {swapped:15.3f}   {val - swapped:+.3f}")
    print()

    config_path = storage.join(out, "salient.yaml")
    storage.write_bytes_atomic(config_path, yaml.safe_dump(demo_config(out, size), sort_keys=False).encode())
    result: dict = {"accuracy": table, "config": config_path, "stages": [stage(config_path) for stage in stages]}
    root = storage.join(out, "build")
    if builds.read_pointer(root, "latest") is None:
        return result
    build = builds.resolve(root)
    pairs_uri = storage.join(build, tables.PAIRS.path)
    if storage.exists(pairs_uri):
        print_top_features(storage.read_parquet(pairs_uri), meta)
    labels_uri = storage.join(build, tables.LABELS.path)
    if storage.exists(labels_uri):
        result["discovery"] = score_discovery(out, build, size, meta)
    if storage.exists(storage.join(build, tables.MASK_INDEX.path)):
        result["generalization"] = print_generalization(out, build, size, meta)
    if storage.exists(storage.join(build, tables.EVAL_CLASSES.path)):
        result["sensitivity"] = print_sensitivity(build, meta)
    page = storage.join(build, tables.REPORT.path)
    if storage.exists(page):
        print(f"report: {page}")
    return result


def print_sensitivity(build: str, world_meta: dict) -> dict[str, dict[float, float | None]]:
    """Per class with a spurious pair: each model's core accuracy (noise on the class's spurious
    masks) at every sigma and the clean accuracy of the same images, then the mean drop per model
    and sigma (from ``evaluation/summary.parquet``), which is also returned."""
    rows = [r for r in storage.read_parquet(storage.join(build, tables.EVAL_CLASSES.path)).to_pylist() if r["core_acc"] is not None]
    order = [name for name, _ in MODELS]
    names = sorted({r["model"] for r in rows}, key=lambda m: (order.index(m) if m in order else len(order), m))
    sigmas = sorted({r["sigma"] for r in rows})
    by_key = {(r["model"], r["class_index"], r["sigma"]): r for r in rows}
    design = {d["class_index"]: d for d in world_meta["classes"]}
    width = 8 * len(sigmas) + 9
    print(f"core accuracy per class at sigma {' / '.join(f'{s:g}' for s in sigmas)} (clean accuracy of the same images)")
    print("class  shape       cue               images  " + "".join(f"  {name:<{width - 2}}" for name in names).rstrip())
    for c in sorted({r["class_index"] for r in rows}):
        line = ""
        for name in names:
            mine = [by_key.get((name, c, s)) for s in sigmas]
            clean = next((r["clean_acc_spurious_images"] for r in mine if r), None)
            cells = " ".join(f"{report.fmt(r['core_acc'] if r else None):>7}" for r in mine)
            line += f"{cells} ({report.fmt(clean)})".ljust(width)
        n = next(r["n_spurious_images"] for r in rows if r["class_index"] == c)
        print(f"{c:<6} {design[c]['shape']:<11} {design[c]['cue_kind']:<17} {n:<7} {line.rstrip()}")
    summary = storage.read_parquet(storage.join(build, tables.EVAL_SUMMARY.path)).to_pylist()
    drops = {name: {r["sigma"]: r["mean_core_drop"] for r in summary if r["model"] == name} for name in names}
    print("mean core-accuracy drop (clean - core) over these classes: " + "; ".join(
        f"sigma {s:g}: " + ", ".join(f"{name} {report.fmt(drops[name].get(s))}" for name in names) for s in sigmas
    ) + "\n")
    return drops


def print_generalization(out: str, build: str, size: int, world_meta: dict) -> float:
    """The paper's Section 3.4 check with the world's truth: does a worker give the same answer on
    ranks 1-5 as on the last 5 ranks kept? Prints per pair and returns the agreement rate."""
    checks = simulate.generalization_check(
        build, storage.join(out, "world", groundtruth.TABLE), "train", size
    )
    design = {d["class_index"]: d for d in world_meta["classes"]}
    print("class  shape       feature  label      ranks 1-5 (object share)     last ranks kept (object share)")
    for r in checks:
        last = f"{r['last_ranks'][0]}-{r['last_ranks'][-1]}"
        print(
            f"{r['class_index']:<6} {design[r['class_index']]['shape']:<11} {r['feature_index']:<8} {r['label']:<10} "
            f"{r['top_answer']:<16} ({r['top_object']:.2f})     {last:>6}: {r['last_answer']:<16} ({r['last_object']:.2f})"
            + ("" if r["same"] else "   <- differs")
        )
    same = sum(r["same"] for r in checks)
    rate = same / len(checks) if checks else float("nan")
    print(f"\ngeneralisation: the same answer on ranks 1-5 and on the last 5 kept for {same} of {len(checks)} pairs ({rate:.0%})\n")
    return rate


def score_discovery(out: str, build: str, size: int, world_meta: dict) -> dict:
    """Labels from the (simulated) annotators in the build directory ``build`` against the truth of
    every pair, and discovery per class against the world's design; printed, and returned as figures."""
    labels = [r for r in storage.read_parquet(storage.join(build, tables.LABELS.path)).to_pylist() if r["in_build"]]
    model = models.load(storage.join(out, "models", "biased.pt"), "tiny_resnet")
    root = storage.join(out, "world", "train")
    truths = groundtruth.load(storage.join(out, "world", groundtruth.TABLE), "train", None, size, size)
    truth = groundtruth.pair_truth(model, root, truths, [(r["class_index"], r["feature_index"]) for r in labels], size, size)
    design = {d["class_index"]: d for d in world_meta["classes"]}

    print("class  shape       cue               feature  votes m/s/b  label (kind)                truth: object/cue/rest mass -> label")
    agree = 0
    for r in labels:
        t = truth[(r["class_index"], r["feature_index"])]
        same = r["label"] == t["label"]
        agree += same
        d = design[r["class_index"]]
        votes = f"{r['votes_main_object']}/{r['votes_separate_object']}/{r['votes_background']}"
        print(
            f"{r['class_index']:<6} {d['shape']:<11} {d['cue_kind']:<17} {r['feature_index']:<8} {votes:<12} "
            f"{r['label'] + ' (' + str(r['kind']) + ')':<27} {t['object']:.2f}/{t['cue']:.2f}/{t['rest']:.2f} -> {t['label']} ({t['kind']})"
            + ("" if same else "   <- disagrees")
        )
    agreement = agree / len(labels) if labels else float("nan")

    flagged = {c: {r["kind"] for r in labels if r["class_index"] == c and r["label"] == "spurious"} for c in design}
    cue_classes = [c for c, d in design.items() if d["cue_kind"] != "none"]
    positives = [c for c, kinds in flagged.items() if kinds]
    hits = [c for c in cue_classes if design[c]["cue_kind"] in flagged[c]]
    precision = len(hits) / len(positives) if positives else float("nan")
    recall = len(hits) / len(cue_classes) if cue_classes else float("nan")
    print(f"\nlabels agree with the truth on {agree} of {len(labels)} pairs ({agreement:.0%})")
    print("per class: " + "; ".join(
        f"{design[c]['shape']} ({design[c]['cue_kind']}): {', '.join(sorted(flagged[c])) or 'no spurious pair'}" for c in sorted(design)
    ))
    print(
        f"discovery per class against the world's design: precision {precision:.2f} "
        f"({len(hits)} of {len(positives)} flagged classes), recall {recall:.2f} ({len(hits)} of {len(cue_classes)} cue classes)\n"
    )
    return {"pairs": len(labels), "agreement": agreement, "precision": precision, "recall": recall}


def print_top_features(pairs: pa.Table, world_meta: dict) -> None:
    """Per demo class: its shape, its cue, and its top features by importance."""
    by_class: dict[int, list[str]] = {}
    for row in pairs.sort_by([("class_index", "ascending"), ("feature_rank", "ascending")]).to_pylist():
        by_class.setdefault(row["class_index"], []).append(f"{row['feature_index']} ({row['importance']:.2f})")
    print("\nclass  shape       cue               top features by importance (feature (importance))")
    for design in world_meta["classes"]:
        c = design["class_index"]
        features = ", ".join(by_class.get(c, [])) or "none: no image predicted as this class"
        print(f"{c:<6} {design['shape']:<11} {design['cue_kind']:<17} {features}")
    print()
