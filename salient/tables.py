"""The layout of a build directory, in one place: every table a build holds, which stage writes it
and the columns downstream users rely on, plus the paths of the per-item files and folders.

Every path here is relative to the build directory (``OUT/builds/<build_id>/``); join it to one
with :func:`salient.storage.join`. A table written once per item (an activation shard, a model at a
noise level) has a placeholder in its :attr:`Table.path`, filled by the function named beside it
(:func:`activation_shard`, :func:`predictions`). ``docs/outputs.md`` lists :data:`ALL`, row for
row (``tests/salient/test_tables.py`` holds the two together).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from salient.storage import safe_relpath


@dataclass(frozen=True)
class Table:
    """One file of a build.

    ``path`` is relative to the build directory (with a placeholder for per-item files);
    ``stage`` is the registry name of the stage that writes it (``study`` for the files of
    ``salient study``, ``run`` for the manifest ``salient run`` writes last); ``columns`` are the
    key columns downstream users rely on (the top-level keys for JSON, none for an array or a page).
    """

    path: str
    stage: str
    description: str
    columns: tuple[str, ...] = ()


_ANSWER_COLUMNS = (
    "class_index", "wnid", "feature_index", "feature_rank", "worker_id", "answer", "confidence", "reason", "file", "line",
)
_REJECTED_COLUMNS = ("file", "line", "reason", "reason_kind", "raw")

PLAN = Table(
    "plan.parquet", "activations", "one row per planned image, with its shard",
    ("relpath", "image_id", "label", "wnid", "bytes", "version", "shard"),
)
ACTIVATIONS = Table(
    "activations/part-NNNNN.parquet", "activations", "penultimate features and top-1 prediction of every image of a shard",
    ("relpath", "image_id", "label", "pred", "features", "orientation"),
)
CLASSES = Table(
    "classes.parquet", "aggregate", "one row per model class",
    ("class_index", "wnid", "name", "n_images", "n_predicted", "n_group", "reason"),
)
IMPORTANCE = Table(
    "importance.parquet", "aggregate", "feature importance per (class, neuron)",
    ("class_index", "feature_index", "importance", "mean_activation"),
)
PAIRS = Table(
    "pairs.parquet", "aggregate", "the most important features of each class: the (class, feature) pairs",
    ("class_index", "wnid", "feature_index", "feature_rank", "importance", "mean_activation", "n_group"),
)
TOPK_NEURON = Table(
    "topk/neuron.parquet", "aggregate", "the top images of every neuron over the whole dataset",
    ("feature_index", "rank", "image_id", "relpath", "label", "activation"),
)
TOPK_CLASS = Table(
    "topk/class.parquet", "aggregate", "the top images of D(c) for every pair",
    ("class_index", "wnid", "feature_index", "feature_rank", "rank", "image_id", "relpath", "label", "activation"),
)
TOPK_CANDIDATES = Table(
    "topk/candidates.parquet", "aggregate", "the top images of every pair within each candidate set",
    ("candidates", "class_index", "wnid", "feature_index", "feature_rank", "rank", "image_id", "relpath", "label", "activation"),
)
TASKS = Table(
    "discover/tasks.csv", "discover", "one crowd task per pair",
    ("class_index", "wnid", "class_name", "definition", "supercategory", "feature_index", "feature_rank",
     "images_url", "heatmaps_url", "attacks_url", "image_ids"),
)
ANSWERS = Table("annotations/answers.parquet", "ingest", "every accepted answer", _ANSWER_COLUMNS)
LABELS = Table(
    "annotations/labels.parquet", "ingest", "one label per pair from its answers",
    ("class_index", "wnid", "feature_index", "feature_rank", "votes_main_object", "votes_separate_object",
     "votes_background", "n_answers", "mean_confidence", "label", "kind", "in_build"),
)
REJECTED = Table("annotations/rejected.parquet", "ingest", "every answer row or file not counted", _REJECTED_COLUMNS)
MASK_INDEX = Table(
    "masks/index.parquet", "generalize", "one row per mask, row i describing mask i of the array",
    ("row", "class_index", "wnid", "feature_index", "feature_rank", "label", "kind", "image_id", "relpath",
     "image_label", "rank", "activation", "nam", "nam_h", "nam_w"),
)
MASKS = Table("masks/masks.zarr", "generalize", "the masks: Zarr v3, uint8 [n, H, W]")
IMPORT_REJECTED = Table(
    "masks/rejected.parquet", "import", "every listed mask, image or class of a release not imported (salient import reference)",
    ("wnid", "feature_index", "name", "relpath", "reason"),
)
STUDY_TASKS = Table(
    "study/tasks.csv", "study", "one generalisation-study task per pair (salient study export)",
    ("class_index", "wnid", "class_name", "definition", "supercategory", "feature_index", "feature_rank", "label",
     "a_images_url", "a_heatmaps_url", "b_images_url", "b_heatmaps_url", "a_ranks", "b_ranks", "a_image_ids", "b_image_ids"),
)
GENERALIZATION = Table(
    "annotations/generalization.parquet", "study", "one row per pair of the generalisation study (salient study ingest)",
    ("class_index", "wnid", "feature_index", "votes_same", "votes_different", "votes_a_unclear", "votes_b_unclear",
     "n_answers", "agreement", "mean_confidence"),
)
GENERALIZATION_ANSWERS = Table(
    "annotations/generalization_answers.parquet", "study", "every accepted study answer (salient study ingest)",
    tuple(c for c in _ANSWER_COLUMNS if c != "feature_rank"),
)
GENERALIZATION_REJECTED = Table(
    "annotations/generalization_rejected.parquet", "study", "every study row or file not counted (salient study ingest)",
    _REJECTED_COLUMNS,
)
PREDICTIONS = Table(
    "evaluation/predictions/<model>/sigma-<sigma>.parquet", "evaluate",
    "a model's clean and noisy top-1 predictions per masked image at one sigma",
    ("image_id", "condition", "class_index", "sigma", "trial", "pred"),
)
EVAL_PAIRS = Table(
    "evaluation/pairs.parquet", "evaluate", "one row per (model, sigma, pair)",
    ("model", "sigma", "class_index", "feature_index", "feature_rank", "label", "n_images", "clean_acc", "noisy_acc", "drop"),
)
EVAL_CLASSES = Table(
    "evaluation/classes.parquet", "evaluate", "one row per (model, sigma, class)",
    ("model", "sigma", "class_index", "n_images", "n_core_images", "n_spurious_images", "clean_acc",
     "clean_acc_core_images", "clean_acc_spurious_images", "core_acc", "spurious_acc", "core_drop", "spurious_drop"),
)
EVAL_SUMMARY = Table(
    "evaluation/summary.parquet", "evaluate", "one row per (model, sigma): means over classes",
    ("model", "sigma", "mean_clean_acc", "mean_core_acc", "mean_spurious_acc", "mean_core_drop", "mean_spurious_drop"),
)
REPORT = Table("report/index.html", "report", "the build report, for people")
MANIFEST = Table(
    "manifest.json", "run", "written last by salient run, marking the build complete",
    ("build_id", "completed", "inputs", "stages", "fingerprints", "counts", "seconds", "images_per_second",
     "software", "tables", "cache_entries"),
)

# In build order: each file after the files it is made from.
ALL: tuple[Table, ...] = (
    PLAN, ACTIVATIONS,
    CLASSES, IMPORTANCE, PAIRS, TOPK_NEURON, TOPK_CLASS, TOPK_CANDIDATES,
    TASKS,
    ANSWERS, LABELS, REJECTED,
    MASK_INDEX, MASKS, IMPORT_REJECTED,
    STUDY_TASKS, GENERALIZATION, GENERALIZATION_ANSWERS, GENERALIZATION_REJECTED,
    PREDICTIONS, EVAL_PAIRS, EVAL_CLASSES, EVAL_SUMMARY,
    REPORT,
    MANIFEST,
)

# ---- folders and the other files of a build ----------------------------------------------------

ACTIVATIONS_DIR = posixpath.dirname(ACTIVATIONS.path)
DISCOVER_DIR = posixpath.dirname(TASKS.path)
STUDY_DIR = posixpath.dirname(STUDY_TASKS.path)
MASKS_DIR = posixpath.dirname(MASK_INDEX.path)
MASK_BLOCKS = f"{MASKS_DIR}/blocks"  # one commit marker and the NAMs per Zarr shard of masks
EVALUATION_DIR = posixpath.dirname(EVAL_SUMMARY.path)
REPORT_DIR = posixpath.dirname(REPORT.path)
STAGE_MARKERS = "stages"  # the commit markers of whole-stage items
CACHE_REFS = "cache-entries.json"  # the cache entries the build uses
ASSETS = "assets.json"  # a pair's record under discover/ and study/, written after its pictures


def activation_shard(index: int) -> str:
    """``activations/part-NNNNN.parquet`` of shard ``index``."""
    return ACTIVATIONS.path.replace("NNNNN", f"{index:05d}")


def activation_marker(index: int) -> str:
    """``activations/part-NNNNN.json``: shard ``index``'s commit marker (its stats and failure list)."""
    return activation_shard(index).removesuffix(".parquet") + ".json"


def predictions(model: str, sigma: float) -> str:
    """``evaluation/predictions/<model>/sigma-<sigma>.parquet`` of one evaluated model at one sigma."""
    return PREDICTIONS.path.replace("<model>", safe_relpath(model)).replace("<sigma>", f"{sigma:g}")


def predictions_marker(model: str, sigma: float) -> str:
    """The commit marker of :func:`predictions`."""
    return predictions(model, sigma).removesuffix(".parquet") + ".json"


def discover_pair(wnid: str, feature: int) -> str:
    """``discover/<wnid>/feature_<j>``: the folder of one pair's strips and ``assets.json``."""
    return f"{DISCOVER_DIR}/{safe_relpath(wnid)}/feature_{feature}"


def study_pair(wnid: str, feature: int) -> str:
    """``study/<wnid>/feature_<j>``: the folder of one pair's study strips and ``assets.json``."""
    return f"{STUDY_DIR}/{safe_relpath(wnid)}/feature_{feature}"


def mask_block_marker(index: int) -> str:
    """``masks/blocks/block-NNNNN.json``: the commit marker of mask block ``index``."""
    return f"{MASK_BLOCKS}/block-{index:05d}.json"


def mask_block_nams(index: int) -> str:
    """``masks/blocks/block-NNNNN.parquet``: the low-resolution NAMs of mask block ``index``."""
    return f"{MASK_BLOCKS}/block-{index:05d}.parquet"


def mask_shard_object(index: int) -> str:
    """The Zarr shard object that mask block ``index`` writes (absent when all its masks are zero)."""
    return f"{MASKS.path}/c/{index}/0/0"


def evaluation_chart(model: str) -> str:
    """``evaluation/<model>.png``: one model's accuracies per sigma, per-pair drops and per-class
    core against spurious accuracy."""
    return f"{EVALUATION_DIR}/{safe_relpath(model)}.png"


def report_class_page(class_index: int) -> str:
    """``report/classes/NNNNN.html``: the report's page of one class, named by its index (wnids
    are not safe file names)."""
    return f"{REPORT_DIR}/classes/{class_index:05d}.html"


def report_class_marker(class_index: int) -> str:
    """``report/classes/NNNNN.json``: the commit marker of :func:`report_class_page`."""
    return report_class_page(class_index).removesuffix(".html") + ".json"


def report_masks(class_index: int, feature: int) -> str:
    """``report/masks/NNNNN/feature_<j>.png``: the strip of one pair's masks that the report shows."""
    return f"{REPORT_DIR}/masks/{class_index:05d}/feature_{feature}.png"


def report_masks_marker(class_index: int) -> str:
    """``report/masks/NNNNN.json``: the commit marker of a class's mask strips."""
    return f"{REPORT_DIR}/masks/{class_index:05d}.json"


def stage_marker(stage: str) -> str:
    """``stages/<stage>.json``: the commit marker of a stage made as one whole item."""
    return f"{STAGE_MARKERS}/{stage}.json"
