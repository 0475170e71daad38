"""Ground truth of a synthetic world: where the object and the cue are, in the model's crop
coordinates, and where a NAM's mass falls among them."""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from salient import storage
from salient.errors import InputError
from salient.models import SalientModel

TABLE = "groundtruth.parquet"


def find(root: str, explicit: str | None = None, levels: int = 3) -> tuple[str, str]:
    """(groundtruth URI, split) for a dataset root: ``explicit``, else the first ``groundtruth.parquet``
    beside or above the root. The split is the root's first path component below that folder."""
    root = root.rstrip("/")
    parent, split = posixpath.dirname(root), posixpath.basename(root)
    if explicit is not None:
        return explicit, split
    for _ in range(levels):
        uri = storage.join(parent, TABLE)
        if storage.exists(uri):
            return uri, split
        split = f"{posixpath.basename(parent)}/{split}"
        parent = posixpath.dirname(parent)
    raise InputError(
        f"no {TABLE} beside or above dataset.root = {root!r}; set dataset.groundtruth "
        "(a synthetic world written by `salient synth` has one)"
    )


@dataclass(frozen=True)
class ImageTruth:
    object_mask: np.ndarray  # [crop, crop] float in [0, 1]
    cue_mask: np.ndarray  # [crop, crop] float in [0, 1]
    cue_kind: str  # background | separate_object | none
    label: int


def crop_mask(png: bytes, resize: int, crop: int) -> np.ndarray:
    """A 0/255 mask through the same Resize + CenterCrop as the images, as coverage in [0, 1]."""
    with Image.open(io.BytesIO(png)) as im:
        m = TF.pil_to_tensor(im.convert("L")).float() / 255.0
    m = TF.resize(m, resize, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(m, [crop, crop])[0].clamp(0, 1).numpy()


def load(uri: str, split: str, relpaths: list[str] | None, resize: int, crop: int) -> dict[str, ImageTruth]:
    """Ground truth of the given images of ``split`` (all of them when ``relpaths`` is None), by relpath."""
    table = storage.read_parquet(uri)
    table = table.filter(pc.equal(table.column("split"), split))
    if relpaths is not None:
        table = table.filter(pc.is_in(table.column("relpath"), value_set=pa.array(sorted(set(relpaths)))))
    out = {}
    for row in table.to_pylist():
        out[row["relpath"]] = ImageTruth(
            crop_mask(row["object_mask"], resize, crop), crop_mask(row["cue_mask"], resize, crop), row["cue_kind"], row["label"]
        )
    missing = sorted(set(relpaths or ()) - set(out))
    if missing:
        raise InputError(f"{len(missing)} images have no ground truth in {uri} (split {split!r}), e.g. {missing[0]}")
    return out


# A person reads a heatmap by its red region: the part of the NAM at least half its maximum.
HOT = 0.5


def regions(truth: ImageTruth, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(object, cue, rest) masks that partition the crop. The object and a separate-object cue are
    grown by ``radius`` pixels, the NAM's own resolution limit (half a map cell), so that red just
    around a small object is read as that object, as a person would; the object wins overlaps."""

    def grow(m: np.ndarray) -> np.ndarray:
        if radius <= 0:
            return m
        t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
        return F.max_pool2d(t, 2 * radius + 1, stride=1, padding=radius)[0, 0].numpy()

    obj = grow(truth.object_mask)
    cue = grow(truth.cue_mask) if truth.cue_kind == "separate_object" else truth.cue_mask
    cue = cue * (1 - obj)
    return obj, cue, np.clip(1 - obj - cue, 0, 1)


def mass_fractions(mask: np.ndarray, parts: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, float]:
    """Shares of the red region's mass (the soft mask where it is at least :data:`HOT`) on the
    object, the cue and the rest of the image."""
    hot = np.where(mask >= HOT, mask, 0.0)
    total = float(hot.sum())
    if total <= 0:
        return {"object": 0.0, "cue": 0.0, "rest": 1.0}
    obj, cue, rest = (float((hot * p).sum()) / total for p in parts)
    return {"object": obj, "cue": cue, "rest": rest}


def cell_radius(crop: int, nam_w: int) -> int:
    """Half a NAM cell, in crop pixels."""
    return int(round(crop / nam_w / 2))


def pair_truth(
    model: SalientModel, root: str, truths: dict[str, ImageTruth], pairs: list[tuple[int, int]], resize: int, crop: int, batch_size: int = 64
) -> dict[tuple[int, int], dict]:
    """Where each pair's red region falls over all images labelled with its class, and the label that implies.

    ``label`` is ``spurious`` when less than half the red mass is on the object; ``kind`` is then the
    class's cue kind when the cue holds more of the mass than the rest of the background, else
    ``background``; ``core`` otherwise.
    """
    from salient import images, nam

    fs, base = storage.url_to_fs(root)
    by_class: dict[int, list[int]] = {}
    for c, j in pairs:
        by_class.setdefault(c, []).append(j)
    out: dict[tuple[int, int], dict] = {}
    for c, feats in by_class.items():
        rels = sorted(r for r, t in truths.items() if t.label == c)
        sums = {j: {"object": 0.0, "cue": 0.0, "rest": 0.0} for j in feats}
        kinds = [truths[r].cue_kind for r in rels if truths[r].cue_kind != "none"]
        for start in range(0, len(rels), batch_size):
            chunk = rels[start : start + batch_size]
            x = torch.stack([images.load_image(fs.cat_file(f"{base.rstrip('/')}/{storage.safe_relpath(r)}"), resize, crop) for r in chunk])
            with torch.inference_mode():
                maps = model(x).maps
            radius = cell_radius(crop, maps.shape[-1])
            for j in feats:
                _, masks = nam.nams(maps, [j] * len(chunk), crop)
                for r, m in zip(chunk, masks.numpy()):
                    for k, v in mass_fractions(m, regions(truths[r], radius)).items():
                        sums[j][k] += v
        cue_kind = max(set(kinds), key=kinds.count) if kinds else "none"
        for j in feats:
            share = {k: v / max(1, len(rels)) for k, v in sums[j].items()}
            spurious = share["object"] < 0.5
            kind = (cue_kind if share["cue"] > share["rest"] and cue_kind != "none" else "background") if spurious else "core"
            out[(c, j)] = {**share, "label": "spurious" if spurious else "core", "kind": kind, "images": len(rels)}
    return out
