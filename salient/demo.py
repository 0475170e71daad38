"""The embedded demo: a synthetic world with ground truth, a biased and a debiased classifier,
and the pipeline's stages run on it. Whatever is already there with the same inputs is reused."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyarrow as pa
import yaml

from salient import aggregate, storage, train, world

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
    }


def run(
    out: str,
    classes: int = 6,
    per_class: int = 100,
    size: int = 64,
    seed: int = 0,
    stages: Sequence[Callable[[str], dict]] = (),
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
    pairs_uri = storage.join(out, "build", aggregate.PAIRS_TABLE)
    if storage.exists(pairs_uri):
        print_top_features(storage.read_parquet(pairs_uri), meta)
    return result


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
