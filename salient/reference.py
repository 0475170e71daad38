"""The layout of the original Salient ImageNet release, read and written (docs/outputs.md
"Reference export").

A release folder holds ``wordnet_dict.py`` (a Python dict literal, class index -> wnid),
``<wnid>/image_names_map.csv`` (one column per feature index, headed by it, listing image names
without extension in rank order) and ``<wnid>/feature_<j>/<name>.JPEG`` (the mask, a greyscale
JPEG at the crop size). Its loader opens the image as ``<images>/train/<wnid>/<name>.JPEG`` and
applies ``Resize(resize)``/``CenterCrop(crop)`` to the image and again to the (already cropped)
mask: :func:`loader_alignment` reproduces the latter.
"""

from __future__ import annotations

import ast
import csv
import io
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
from PIL import Image

from salient import builds, images, ingest, masks, storage, tables
from salient.config import Config
from salient.dataset import SalientMasks
from salient.errors import InputError
from salient.images import DECODE_ERRORS

WORDNET_DICT = "wordnet_dict.py"
NAMES_MAP = "image_names_map.csv"
LEFT_OUT = "left_out.csv"
EXTENSION = ".JPEG"
JPEG_QUALITY = 95
WRITE_THREADS = 16

OTHER_CLASS = "filed under another class folder"
NOT_LOADABLE = f"not <wnid>/<name>{EXTENSION}, the only path the loader opens"
NOT_A_STRING = f"a name pandas reads from {NAMES_MAP} as a number or as missing, so the loader cannot open it"
# The strings pandas.read_csv reads as missing by default.
PANDAS_NA = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})


def mask_path(wnid: str, feature: int, name: str) -> str:
    """``<wnid>/feature_<j>/<name>.JPEG``: where the release keeps a mask."""
    return f"{wnid}/feature_{feature}/{name}{EXTENSION}"


def loadable_name(relpath: str, wnid: str) -> tuple[str | None, str | None]:
    """(the name the loader opens ``relpath`` by as an image of ``wnid``, None) or (None, why it cannot)."""
    folder, base = posixpath.split(relpath)
    if folder != wnid:
        return None, OTHER_CLASS
    name, ext = posixpath.splitext(base)
    if ext != EXTENSION or not name:
        return None, NOT_LOADABLE
    if name in PANDAS_NA or _is_number(name):
        return None, NOT_A_STRING
    return name, None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _csv(rows: list[list[str]]) -> bytes:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue().encode()


def export_reference(root: str, dest: str) -> dict:
    """Write the masks of a build under ``dest`` in the release's layout, so that its loader opens
    them: ``wordnet_dict.py``, ``<wnid>/image_names_map.csv`` and ``<wnid>/feature_<j>/<name>.JPEG``.

    Only masks of images the loader can open as ``train/<wnid>/<name>.JPEG`` are exported (with a
    name pandas reads back as that string); a column shorter than others of its class repeats its
    last name, so that the loader reads no empty cell. The others are listed in ``left_out.csv`` (wnid, feature_index, relpath, reason) and counted in the
    summary. ``root`` is an output root (its ``latest`` build is exported) or a build directory.
    """
    m = SalientMasks(root)
    cols = m.index.select(["class_index", "wnid", "feature_index", "rank", "relpath"]).to_pylist()
    wnids = {r["class_index"]: r["wnid"] for r in cols}
    classes_uri = storage.join(m.build, tables.CLASSES.path)
    if storage.exists(classes_uri):
        known = storage.read_parquet(classes_uri, ["class_index", "wnid"]).to_pydict()
        wnids.update(zip(known["class_index"], known["wnid"]))
    by_class: dict[str, dict[int, list[tuple[int, str, int]]]] = {}
    left_out: list[list[str]] = []
    for i, r in enumerate(cols):
        name, why = loadable_name(r["relpath"], r["wnid"])
        if why is not None:
            left_out.append([r["wnid"], str(r["feature_index"]), r["relpath"], why])
            continue
        by_class.setdefault(r["wnid"], {}).setdefault(r["feature_index"], []).append((r["rank"], name, i))
    target: dict[int, str] = {}  # mask row -> where its JPEG goes
    maps: dict[str, dict[int, list[str]]] = {}
    for wnid, features in by_class.items():
        storage.safe_relpath(wnid)
        names = maps[wnid] = {}
        for j, items in sorted(features.items()):
            names[j] = []
            for _, name, i in sorted(items):
                target[i] = storage.join(dest, mask_path(wnid, j, name))
                names[j].append(name)
    _write_masks(m, target)
    for wnid, names in maps.items():
        depth = max(len(v) for v in names.values())
        # The loader reads every cell of a column and an empty one as NaN: a shorter column repeats
        # its last name, which gives that image the same feature's mask again (a no-op in its maximum).
        rows = [[str(j) for j in names]] + [[v[min(k, len(v) - 1)] for v in names.values()] for k in range(depth)]
        storage.write_bytes_atomic(storage.join(dest, wnid, NAMES_MAP), _csv(rows))
    written = len(target)
    literal = "{\n" + "".join(f"    {c}: {wnids[c]!r},\n" for c in sorted(wnids)) + "}\n"
    storage.write_bytes_atomic(storage.join(dest, WORDNET_DICT), literal.encode())
    if left_out:
        storage.write_bytes_atomic(storage.join(dest, LEFT_OUT), _csv([["wnid", "feature_index", "relpath", "reason"], *left_out]))
    else:
        storage.remove(storage.join(dest, LEFT_OUT))
    return {
        "classes": len(by_class), "masks": written, "left_out": len(left_out),
        "left_out_reasons": dict(Counter(r[3] for r in left_out)), "dest": dest,
    }


def _write_masks(m: SalientMasks, target: dict[int, str]) -> None:
    """Write mask row ``i`` as a JPEG at ``target[i]`` for every row of ``target``: the array read
    a shard object at a time, the pictures encoded and written on a pool of threads."""

    def write(uri: str, mask: np.ndarray) -> None:
        buf = io.BytesIO()
        Image.fromarray(mask).save(buf, format="JPEG", quality=JPEG_QUALITY)
        storage.write_bytes_atomic(uri, buf.getvalue())

    rows = sorted(target)
    with ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="export") as pool:
        k = 0
        while k < len(rows):
            lo = rows[k] - rows[k] % m.shard_rows
            hi = min(lo + m.shard_rows, len(m))
            block = m.rows(lo, hi)
            wanted = []
            while k < len(rows) and rows[k] < hi:
                wanted.append(rows[k])
                k += 1
            list(pool.map(lambda i: write(target[i], block[i - lo]), wanted))


def loader_alignment(masks: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """``masks`` (uint8 ``[n, H, W]``) as the release's loader uses them: ``Resize(resize)`` (PIL
    bilinear) then ``CenterCrop(crop)`` of each, uint8 ``[n, crop, crop]``."""
    out = np.empty((len(masks), crop, crop), np.uint8)
    for i, mask in enumerate(masks):  # the images' own preprocessing, as the loader applies it to both
        out[i] = images.preprocess_uint8(Image.fromarray(mask), resize, crop)[0].numpy()
    return out


def read_wordnet_dict(release: str) -> dict[int, str]:
    """class index -> wnid from the release's ``wordnet_dict.py``, read as a literal (never run)."""
    uri = storage.join(release, WORDNET_DICT)
    if not storage.exists(uri):
        raise InputError(f"{uri} is missing: RELEASE must be the folder that holds {WORDNET_DICT} and one folder per wnid")
    try:
        value = ast.literal_eval(storage.read_bytes(uri).decode("utf-8"))
    except (ValueError, SyntaxError, UnicodeDecodeError) as e:
        raise InputError(f"{uri} is not a Python dict literal of class index -> wnid: {e}") from None
    if not isinstance(value, dict) or not all(isinstance(k, int) and isinstance(v, str) for k, v in value.items()):
        raise InputError(f"{uri} is not a dict of class index (int) -> wnid (str)")
    return value


def _release_rows(release: str, wnids: dict[int, str], known: dict[int, str] | None, dataset_root: str, crop: int):
    """(rows, masks, rejected): every listed mask the import can use, with its pixels, and every one it cannot."""
    folders = {posixpath.dirname(p) for p in storage.list_files(release) if posixpath.basename(p) == NAMES_MAP}
    by_wnid = {w: c for c, w in wnids.items()}
    rows: list[dict] = []
    pixels: list[np.ndarray] = []
    rejected: list[dict] = []

    def reject(wnid: str, feature: int | None, name: str | None, reason: str) -> None:
        rejected.append({"wnid": wnid, "feature_index": feature, "name": name, "relpath": None if name is None else f"{wnid}/{name}{EXTENSION}", "reason": reason})

    listed: list[tuple[int, str, int, int, str]] = []
    for wnid in sorted(folders):
        c = by_wnid.get(wnid)
        if c is None or (known is not None and known.get(c) != wnid):
            reject(wnid, None, None, f"unknown wnid: not in {WORDNET_DICT}" if c is None else "unknown wnid: not the class metadata's wnid of its class index")
            continue
        table = list(csv.reader(io.StringIO(storage.read_bytes(storage.join(release, wnid, NAMES_MAP)).decode("utf-8"))))
        header, body = (table[0], table[1:]) if table else ([], [])
        for col, head in enumerate(header):
            try:
                j = int(head)
            except ValueError:
                reject(wnid, None, None, f"column {head!r} of {NAMES_MAP} is not a feature index")
                continue
            names = list(dict.fromkeys(r[col] for r in body if col < len(r) and r[col]))  # an export repeats a short column's last name
            listed += [(c, wnid, j, rank, name) for rank, name in enumerate(names, start=1)]

    def load(item: tuple[int, str, int, int, str]) -> tuple[np.ndarray | None, str | None]:
        c, wnid, j, _, name = item
        if not storage.exists(storage.under(dataset_root, f"{wnid}/{name}{EXTENSION}")):
            return None, "image missing under dataset.root"
        try:
            mask = np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.join(release, mask_path(wnid, j, name))))).convert("L"))
        except FileNotFoundError:
            return None, "mask file missing"
        except DECODE_ERRORS as e:
            return None, f"unreadable mask: {type(e).__name__}"
        if mask.shape != (crop, crop):
            return None, f"mask is {mask.shape[1]}x{mask.shape[0]}, not preprocess.crop {crop}x{crop}"
        return mask, None

    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="import") as pool:
        loaded = list(pool.map(load, listed))
    for (c, wnid, j, rank, name), (mask, why) in zip(listed, loaded):
        if why is not None:
            reject(wnid, j, name, why)
            continue
        rows.append({"class_index": c, "wnid": wnid, "feature_index": j, "rank": rank, "relpath": f"{wnid}/{name}{EXTENSION}"})
        pixels.append(mask)
    return rows, pixels, rejected


def import_reference(release: str, cfg: Config, answers: list[str]) -> dict:
    """Publish a build under ``cfg.output`` from a release in the original layout and the answers
    ``answers`` (CSV in the paper's schema): ``classes.parquet``, the answers' tables, and the masks
    of every pair labelled core or spurious as ``masks/index.parquet`` + ``masks/masks.zarr``.

    Masks are kept as released. What the release does not hold is left empty in the index:
    ``activation`` and ``nam`` are null (``nam_h = nam_w = 0``), ``rank`` is the position in
    ``image_names_map.csv``. Listed images missing under ``dataset.root``, unreadable masks and
    unknown wnids go to ``masks/rejected.parquet`` with their reason.
    """
    assert cfg.dataset is not None and cfg.output is not None
    wnids = read_wordnet_dict(release)
    info = {}
    if cfg.dataset.class_metadata:
        from salient.metadata import read_class_metadata

        info = {c.class_index: c for c in read_class_metadata(cfg.dataset.class_metadata)}
    known = {c: i.wnid for c, i in info.items()} or None
    crop = cfg.preprocess.crop
    found, pixels, rejected = _release_rows(release, wnids, known, cfg.dataset.root, crop)

    layout = builds.Layout(cfg.output, builds.new_build_id())
    build = layout.build
    classes = known or wnids
    s = ingest.ingest(
        build, answers, classes, {(r["class_index"], r["feature_index"]) for r in found}, cfg.annotations.min_answers, cfg.output,
    )
    labels = storage.read_parquet(storage.join(build, tables.LABELS.path)).to_pylist()
    label_of = {(r["class_index"], r["feature_index"]): r for r in labels if r["label"] in ("core", "spurious")}

    images = sorted({r["relpath"] for r in found})
    image_id = {rel: i for i, rel in enumerate(images)}
    keep = sorted(
        (k for k, r in enumerate(found) if (r["class_index"], r["feature_index"]) in label_of),
        key=lambda k: (image_id[found[k]["relpath"]], found[k]["class_index"], found[k]["feature_index"]),
    )
    index = []
    for row, k in enumerate(keep):
        r = found[k]
        pair = label_of[(r["class_index"], r["feature_index"])]
        index.append({
            "row": row, "class_index": r["class_index"], "wnid": r["wnid"], "feature_index": r["feature_index"],
            "feature_rank": pair["feature_rank"], "label": pair["label"], "kind": pair["kind"],
            "image_id": image_id[r["relpath"]], "relpath": r["relpath"], "image_label": r["class_index"],
            "rank": r["rank"], "activation": None,
        })
    index_table = pa.Table.from_pylist(index, schema=pa.schema([
        ("row", pa.int64()), ("class_index", pa.int64()), ("wnid", pa.string()), ("feature_index", pa.int64()),
        ("feature_rank", pa.int64()), ("label", pa.string()), ("kind", pa.string()), ("image_id", pa.int64()),
        ("relpath", pa.string()), ("image_label", pa.int64()), ("rank", pa.int64()), ("activation", pa.float32()),
    ]))
    fp = storage.fingerprint("import-reference", s["fingerprint"], index_table.to_pydict())
    array_masks = np.stack([pixels[k] for k in keep]) if keep else np.zeros((0, crop, crop), np.uint8)
    masks.prepare(build, cfg.dataset.root, index_table, crop, cfg.generalize, fp)
    arr = masks.open_array(build, mode="r+")
    per_shard = cfg.generalize.masks_per_shard
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="import-write") as pool:
        for start in range(0, len(keep), per_shard):
            masks.write_shard(build, arr, start, array_masks[start : start + per_shard], pool)
    n = index_table.num_rows
    index_table = index_table.append_column("nam", pa.nulls(n, pa.list_(pa.float16())))
    index_table = index_table.append_column("nam_h", pa.array(np.zeros(n), pa.int32()))
    index_table = index_table.append_column("nam_w", pa.array(np.zeros(n), pa.int32()))
    storage.write_parquet(storage.join(build, tables.MASK_INDEX.path), index_table, fp)

    per_class = Counter(c for c, _ in {(r["class_index"], r["relpath"]) for r in found})
    storage.write_parquet(storage.join(build, tables.CLASSES.path), pa.table({
        "class_index": pa.array(sorted(classes), pa.int32()),
        "wnid": pa.array([classes[c] for c in sorted(classes)], pa.string()),
        "name": pa.array([info[c].name if c in info else None for c in sorted(classes)], pa.string()),
        "n_images": pa.array([per_class.get(c, 0) for c in sorted(classes)], pa.int64()),
        "n_predicted": pa.nulls(len(classes), pa.int64()),
        "n_group": pa.nulls(len(classes), pa.int64()),
        "reason": pa.nulls(len(classes), pa.string()),
    }), fp)
    storage.write_parquet(storage.join(build, tables.IMPORT_REJECTED.path), pa.Table.from_pylist(rejected, schema=pa.schema([
        ("wnid", pa.string()), ("feature_index", pa.int64()), ("name", pa.string()), ("relpath", pa.string()), ("reason", pa.string()),
    ])), fp)
    summary = {
        "build": build, "masks": n, "images": len({r["relpath"] for r in index}), "listed": len(found) + sum(r["name"] is not None for r in rejected),
        "rejected": len(rejected), "rejected_by_reason": dict(Counter(r["reason"] for r in rejected)),
        "pairs": len({(r["class_index"], r["feature_index"]) for r in found}), "core": s["core"], "spurious": s["spurious"],
        "answers": s["accepted"], "answers_rejected": s["rejected"],
    }
    builds.write_manifest(layout, {"inputs": {"release": release, "answers": list(answers)}, "counts": summary, "imported": True})
    builds.publish(cfg.output, layout.build_id)
    builds.write_pointer(cfg.output, "current", layout.build_id)
    return summary
