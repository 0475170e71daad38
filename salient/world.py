"""The demo world: an ImageFolder JPEG dataset of shapes with spurious cues and ground-truth masks.

Each class has a core object (a filled shape). Two classes in three also have a spurious cue that
co-occurs with the class: a background texture, or a small separate object in a corner. Every image
comes with the exact pixel masks of its object and of its cue, so every stage of the discovery can
be checked against the truth.

The background textures all have one mean colour and differ only in fine structure: faint stripes,
checks or dots, or colour grain (per-pixel Gaussian noise of a strength drawn per image). Like a
real background (sand, water, foliage), a texture is told apart by detail that Gaussian noise
masks, and noise on any region looks like grain. A classifier that learned "grain means this class"
from the biased split therefore changes its answer when the background of another class is noised,
while a twin trained with cues independent of the label learned to ignore grain; the sensitivity
evaluation (docs/design.md §2) tells the two apart.

Splits (each an ImageFolder root under the world directory):

- ``train``: a cue class carries its own cue in a fraction ``rho`` of its images; cue-free classes
  never carry a cue.
- ``val``: every image of a cue class carries its own cue.
- ``swapped``: every image carries the cue of another cue-bearing class (the label is unchanged),
  so a model that relies on cues loses accuracy here.
- ``train_free``: a fraction ``rho`` of every class's images carry a cue whose class is independent
  of the label, to train a twin that cannot rely on cues.

The same arguments always give byte-identical files.
"""

from __future__ import annotations

import colorsys
import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from PIL import Image

from salient import storage
from salient.errors import InputError

# Bump when the same arguments would draw different images.
GENERATOR_VERSION = 2

SPLITS: tuple[str, ...] = ("train", "val", "swapped", "train_free")
CUE_KINDS: tuple[str, ...] = ("none", "background", "separate_object")
TABLES: tuple[str, ...] = ("world.json", "classes.csv", "groundtruth.parquet")

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "cross", "star", "ring",
    "diamond", "hexagon", "crescent", "arrow", "heart", "pentagon",
)
SHAPE_GLOSSES: dict[str, str] = {
    "circle": "a filled circle of any colour",
    "square": "a filled square of any colour",
    "triangle": "a filled equilateral triangle of any colour",
    "cross": "a filled plus-shaped cross of any colour, two bars of equal length",
    "star": "a filled five-pointed star of any colour",
    "ring": "a thick ring of any colour: a disc with a round hole in its middle",
    "diamond": "a filled rhombus of any colour, taller than it is wide",
    "hexagon": "a filled regular hexagon of any colour",
    "crescent": "a filled crescent of any colour, like a waxing moon",
    "arrow": "a filled arrow of any colour with a triangular head",
    "heart": "a filled heart of any colour",
    "pentagon": "a filled regular pentagon of any colour",
}

TEXTURE_PATTERNS: tuple[str, ...] = ("stripes", "grain", "checker", "dots")
# Every texture has this mean colour. A two-tone pattern's tones are 2 x TEXTURE_CONTRAST apart;
# grain is per-pixel, per-channel Gaussian noise whose standard deviation is drawn per image from
# GRAIN_STD. A pattern under the paper's noise (sigma 0.25) spreads by sqrt(0.25^2 + 0.1^2) = 0.27,
# inside grain's range: it looks like grain.
TEXTURE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
TEXTURE_CONTRAST = 0.1
GRAIN_STD = (0.05, 0.3)
CUE_OBJECT_COLOURS: tuple[tuple[float, float, float], ...] = (
    (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.5, 0.0), (0.6, 0.0, 1.0), (0.0, 0.7, 0.3), (1.0, 0.0, 0.4),
)

# Geometry, as fractions of the image side. Every shape lies inside the disc of its radius, and an
# object (centre within +-OBJECT_JITTER of the middle, radius <= 0.25) never meets a corner cue
# (centre within CUE_OBJECT_MARGIN..+CUE_JITTER of a corner, radius CUE_OBJECT_RADIUS).
OBJECT_DIAMETER = (0.35, 0.5)
OBJECT_JITTER = 0.08
CUE_OBJECT_RADIUS = 0.11
CUE_OBJECT_MARGIN = 0.115
CUE_JITTER = 0.025
TEXTURE_PERIODS = (0.0625, 0.09)

JPEG_QUALITY = 92
MAX_PER_CLASS = 99_999


@dataclass(frozen=True)
class ClassDesign:
    """One class of the world: its object, and the cue it co-occurs with (if any)."""

    class_index: int
    wnid: str
    shape: str
    cue_kind: str
    # Background cues: a texture of mean colour TEXTURE_MEAN; the two-tone patterns have a fixed
    # orientation and period, grain has neither.
    texture: str | None = None
    texture_angle: float | None = None
    texture_period: float | None = None
    # Separate-object cues: a small shape of a fixed colour in a corner.
    cue_shape: str | None = None
    cue_colour: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class ImageSpec:
    """Everything that determines one image: where it goes and which cue it carries."""

    seed: int
    split: str
    label: int
    index: int
    cue_class: int  # -1: no cue

    @property
    def relpath(self) -> str:
        wnid = wnid_of(self.label)
        return f"{wnid}/{wnid}_{self.index:05d}.JPEG"


class Rendering(NamedTuple):
    """An image (``uint8`` HxWx3) and the boolean masks of the pixels drawn as object and as cue."""

    rgb: np.ndarray
    object_mask: np.ndarray
    cue_mask: np.ndarray


def wnid_of(class_index: int) -> str:
    """The fake WordNet id of a class; ids sort in class order."""
    return f"n99{class_index:06d}"


def split_size(split: str, per_class: int) -> int:
    """Images per class in ``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return per_class if split in ("train", "train_free") else max(4, per_class // 4)


def validate(classes: int, per_class: int, size: int, rho: float, seed: int) -> None:
    """Raise ``InputError`` unless the arguments describe a world that can be made."""
    _validate_plan(classes, per_class, rho, seed)
    if size < 16:
        raise InputError(f"size={size}: use at least 16 pixels, or the cue objects vanish")


def _validate_plan(classes: int, per_class: int, rho: float, seed: int) -> None:
    if not 3 <= classes <= len(SHAPES):
        raise InputError(
            f"classes={classes}: use 3 to {len(SHAPES)} (one shape per class; the cue-swapped split "
            "needs at least two cue-bearing classes, and classes 1 and 2 are the first)"
        )
    if not 1 <= per_class <= MAX_PER_CLASS:
        raise InputError(f"per_class={per_class}: use 1 to {MAX_PER_CLASS} train images per class")
    if not 0.0 <= rho <= 1.0:
        raise InputError(f"rho={rho}: it is a probability, use a value in [0, 1]")
    if seed < 0:
        raise InputError(f"seed={seed}: use a non-negative integer")


def design(classes: int) -> tuple[ClassDesign, ...]:
    """The classes of a world with ``classes`` classes.

    Class ``i`` has shape ``SHAPES[i]`` and cue kind ``CUE_KINDS[i % 3]``, so any world with three
    or more classes has every kind.
    """
    if not 1 <= classes <= len(SHAPES):
        raise ValueError(f"classes={classes}: use 1 to {len(SHAPES)}")
    out = []
    n_background = n_separate = 0
    for i in range(classes):
        kind = CUE_KINDS[i % 3]
        extra: dict[str, object] = {}
        if kind == "background":
            k = n_background
            n_background += 1
            pattern = TEXTURE_PATTERNS[k % len(TEXTURE_PATTERNS)]
            extra = {"texture": pattern}
            if pattern != "grain":
                extra["texture_angle"] = float((20 + 55 * k) % 180)
                extra["texture_period"] = TEXTURE_PERIODS[(k // len(TEXTURE_PATTERNS)) % len(TEXTURE_PERIODS)]
        elif kind == "separate_object":
            k = n_separate
            n_separate += 1
            # Shapes no object of this world uses come first, so cue objects look unlike every class.
            extra = {
                "cue_shape": SHAPES[(classes + k) % len(SHAPES)],
                "cue_colour": CUE_OBJECT_COLOURS[k % len(CUE_OBJECT_COLOURS)],
            }
        out.append(ClassDesign(i, wnid_of(i), SHAPES[i], kind, **extra))  # type: ignore[arg-type]
    return tuple(out)


# What a random stream is for, so that no two streams of a world share their entropy.
_DRAWING, _CUE_ASSIGNMENT = 0, 1


def _rng(seed: int, purpose: int, split: str, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, purpose, SPLITS.index(split), label, index]))


def plan(classes: int, per_class: int, rho: float, seed: int) -> list[ImageSpec]:
    """Every image of the world, split by split, each in ImageFolder order.

    Cue fractions are exact per class: ``round(rho * n)`` of a class's ``n`` images carry a cue in
    ``train`` and ``train_free``. Cue classes are spread evenly: in ``train_free`` over all
    cue-bearing classes, in ``swapped`` over the cue-bearing classes other than the label.
    """
    _validate_plan(classes, per_class, rho, seed)
    designs = design(classes)
    cue_classes = [d.class_index for d in designs if d.cue_kind != "none"]
    specs: list[ImageSpec] = []
    for split in SPLITS:
        n = split_size(split, per_class)
        for label in range(classes):
            rng = _rng(seed, _CUE_ASSIGNMENT, split, label, 0)
            own_cue = label if designs[label].cue_kind != "none" else -1
            if split == "train":
                with_cue = set(rng.permutation(n)[: round(rho * n)].tolist())
                cues = [own_cue if i in with_cue else -1 for i in range(n)]
            elif split == "val":
                cues = [own_cue] * n
            elif split == "swapped":
                cues = _spread([c for c in cue_classes if c != label], n, rng)
            else:
                order = rng.permutation(n)
                n_cue = round(rho * n)
                drawn = _spread(cue_classes, n_cue, rng)
                cues = [-1] * n
                for i, cue in zip(order[:n_cue].tolist(), drawn):
                    cues[i] = cue
            specs.extend(ImageSpec(seed, split, label, i, cue) for i, cue in enumerate(cues))
    return specs


def _spread(choices: Sequence[int], n: int, rng: np.random.Generator) -> list[int]:
    """``n`` draws from ``choices``: rounds of every choice once, each round in a random order."""
    rounds = -(-n // len(choices))
    return [choices[i] for _ in range(rounds) for i in rng.permutation(len(choices)).tolist()][:n]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points ``(u, v)`` (shape frame: unit radius, v up) lie inside ``shape``."""
    r2 = u * u + v * v
    if shape == "circle":
        inside = r2 <= 1.0
    elif shape == "square":
        inside = (np.abs(u) <= 0.7) & (np.abs(v) <= 0.7)
    elif shape == "triangle":
        inside = _in_polygon(u, v, _regular(3, 1.0))
    elif shape == "cross":
        inside = ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.92)) | ((np.abs(u) <= 0.92) & (np.abs(v) <= 0.3))
    elif shape == "star":
        outer, inner = _regular(5, 1.0), _regular(5, 0.42, offset=36.0)
        inside = _in_polygon(u, v, [p for pair in zip(outer, inner) for p in pair])
    elif shape == "ring":
        inside = (r2 <= 1.0) & (r2 >= 0.55**2)
    elif shape == "diamond":
        inside = np.abs(u) / 0.62 + np.abs(v) <= 1.0
    elif shape == "hexagon":
        inside = _in_polygon(u, v, _regular(6, 1.0))
    elif shape == "crescent":
        inside = (r2 <= 1.0) & ((u + 0.45) ** 2 + v * v > 0.8**2)
    elif shape == "arrow":
        inside = _in_polygon(
            u, v, [(-0.95, 0.22), (0.1, 0.22), (0.1, 0.7), (0.98, 0.0), (0.1, -0.7), (0.1, -0.22), (-0.95, -0.22)]
        )
    elif shape == "heart":
        x, y = u * 1.15, v * 1.15 + 0.12
        inside = (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    elif shape == "pentagon":
        inside = _in_polygon(u, v, _regular(5, 1.0))
    else:
        raise ValueError(f"unknown shape {shape!r}: use one of {', '.join(SHAPES)}")
    return inside & (r2 <= 1.0)


def _regular(n: int, radius: float, offset: float = 0.0) -> list[tuple[float, float]]:
    angles = [math.radians(90.0 + offset + 360.0 * k / n) for k in range(n)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _in_polygon(u: np.ndarray, v: np.ndarray, vertices: Sequence[tuple[float, float]]) -> np.ndarray:
    inside = np.zeros(u.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(vertices, [*vertices[1:], vertices[0]]):
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        inside ^= crosses & (u < x1 + (x2 - x1) * (v - y1) / (y2 - y1))
    return inside


def _place(shape: str, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """The pixels (by their centres) inside ``shape`` placed at ``(cx, cy)`` px, rotated ``angle`` rad."""
    coords = np.arange(size, dtype=np.float64) + 0.5
    dx = (coords[None, :] - cx) / radius
    dy = (cy - coords[:, None]) / radius
    c, s = math.cos(angle), math.sin(angle)
    return _shape_mask(shape, c * dx + s * dy, -s * dx + c * dy)


def _texture(cue: ClassDesign, size: int, phase: np.ndarray, grain: np.ndarray) -> np.ndarray:
    """A background texture's offset from :data:`TEXTURE_MEAN` (``size x size x 3``).

    A two-tone pattern's offset averages to zero over the image (its tones are -/+ the contrast
    for stripes and checks, whose tones cover half the image each); grain's is zero in expectation.
    """
    if cue.texture == "grain":
        return grain
    second = _pattern(str(cue.texture), float(cue.texture_angle), float(cue.texture_period) * size, size, phase)
    offset = 2.0 * TEXTURE_CONTRAST * (second - second.mean())
    return np.broadcast_to(offset[:, :, None], (size, size, 3))


def _pattern(pattern: str, angle: float, period: float, size: int, phase: np.ndarray) -> np.ndarray:
    """Which pixels of a two-tone pattern take its second tone (``period`` in pixels)."""
    coords = np.arange(size, dtype=np.float64) + 0.5
    x, y = coords[None, :], coords[:, None]
    a = math.radians(angle)
    along = (x * math.cos(a) + y * math.sin(a)) / period + phase[0]
    across = (-x * math.sin(a) + y * math.cos(a)) / period + phase[1]
    if pattern == "stripes":
        return np.broadcast_to(along % 1.0 < 0.5, (size, size))
    if pattern == "checker":
        return (np.floor(2 * along) + np.floor(2 * across)) % 2 == 1
    return ((along % 1.0 - 0.5) ** 2 + (across % 1.0 - 0.5) ** 2) <= 0.3**2


def render_image(
    spec: ImageSpec,
    designs: Sequence[ClassDesign],
    size: int,
    draw_object: bool = True,
    draw_cue: bool = True,
) -> Rendering:
    """The lossless image of ``spec`` and its masks.

    ``draw_object`` / ``draw_cue`` leave the object or the cue out of the picture (everything else
    stays the same); the masks always describe the full image.
    """
    rng = _rng(spec.seed, _DRAWING, spec.split, spec.label, spec.index)
    # Every random draw happens whatever is drawn, so all variants share their other pixels.
    obj_colour = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.65, 1.0), rng.uniform(0.8, 1.0)))
    obj_radius = rng.uniform(*OBJECT_DIAMETER) * size / 2
    obj_cx, obj_cy = (0.5 + rng.uniform(-OBJECT_JITTER, OBJECT_JITTER, 2)) * size
    obj_angle = rng.uniform(-math.pi, math.pi)
    bg_colour = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.3), rng.uniform(0.35, 0.6)))
    ramp_angle, ramp_strength = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.12)
    noise = rng.normal(0.0, 0.02, (size, size, 3))
    phase = rng.random(2)
    corner = rng.integers(4)
    cue_offset = (CUE_OBJECT_MARGIN + rng.uniform(0, CUE_JITTER, 2)) * size
    cue_angle = rng.uniform(-math.pi, math.pi)
    grain = rng.uniform(*GRAIN_STD) * rng.normal(0.0, 1.0, (size, size, 3))

    coords = (np.arange(size, dtype=np.float64) + 0.5) / size - 0.5
    ramp = math.cos(ramp_angle) * coords[None, :] + math.sin(ramp_angle) * coords[:, None]
    image = bg_colour[None, None, :] + ramp_strength * ramp[:, :, None] + noise

    object_mask = _place(designs[spec.label].shape, size, obj_cx, obj_cy, obj_radius, obj_angle)
    cue_mask = np.zeros((size, size), dtype=bool)
    if spec.cue_class >= 0:
        cue = designs[spec.cue_class]
        if cue.cue_kind == "background":
            cue_mask = ~object_mask
            if draw_cue:
                image = np.asarray(TEXTURE_MEAN) + _texture(cue, size, phase, grain)
        else:
            cx = cue_offset[0] if corner % 2 == 0 else size - cue_offset[0]
            cy = cue_offset[1] if corner < 2 else size - cue_offset[1]
            cue_mask = _place(str(cue.cue_shape), size, cx, cy, CUE_OBJECT_RADIUS * size, cue_angle) & ~object_mask
            if draw_cue:
                image = np.where(cue_mask[:, :, None], np.array(cue.cue_colour), image)
    if draw_object:
        image = np.where(object_mask[:, :, None], obj_colour, image)
    rgb = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return Rendering(rgb, object_mask, cue_mask)


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


def _png_mask(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(buf, "PNG")
    return buf.getvalue()


def _claim(out: str) -> None:
    """Make ``out`` ready for a world: empty, or holding a previous world whose files are replaced."""
    fs, path = storage.url_to_fs(out)
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise InputError(f"world output {out!r} is a file; give a directory")
    if fs.ls(path, detail=False) and not fs.exists(storage.join(path, "world.json")):
        raise InputError(f"world output {out!r} is not empty and holds no world.json; give an empty or new directory")
    for name in SPLITS + TABLES:
        storage.remove(storage.join(out, name), recursive=True)


def synthesize(
    out: str, classes: int = 6, per_class: int = 100, size: int = 64, rho: float = 0.9, seed: int = 0
) -> dict:
    """Write a world under ``out`` (any fsspec URI) and return a summary of it.

    Writes ``<split>/<wnid>/<wnid>_<NNNNN>.JPEG`` for every split in :data:`SPLITS`,
    ``groundtruth.parquet`` (one row per image: ``relpath, split, label, wnid, has_cue, cue_kind,
    cue_class``, and ``object_mask`` / ``cue_mask`` as 0/255 PNGs), ``classes.csv`` (in the columns
    of ``imagenet_class_metadata.csv``) and ``world.json`` (the parameters and the class design).
    ``out`` must be new, empty, or an earlier world (whose files are replaced). ``world.json`` is
    written first and ``groundtruth.parquet`` last: a world is complete once the latter exists.
    """
    validate(classes, per_class, size, rho, seed)
    _claim(out)
    params = {"classes": classes, "per_class": per_class, "size": size, "rho": rho, "seed": seed}
    fp = storage.fingerprint("world", GENERATOR_VERSION, params)
    designs = design(classes)
    counts = {split: split_size(split, per_class) * classes for split in SPLITS}
    storage.write_json(
        storage.join(out, "world.json"),
        {
            "generator_version": GENERATOR_VERSION,
            "fingerprint": fp,
            "params": params,
            "images": counts,
            "classes": [asdict(d) for d in designs],
        },
    )

    rows: dict[str, list] = {k: [] for k in ("relpath", "split", "label", "wnid", "has_cue", "cue_kind", "cue_class")}
    rows["object_mask"], rows["cue_mask"] = [], []
    with_cue = dict.fromkeys(SPLITS, 0)
    for spec in plan(classes, per_class, rho, seed):
        rendering = render_image(spec, designs, size)
        storage.write_bytes_atomic(storage.join(out, spec.split, spec.relpath), _jpeg(rendering.rgb))
        has_cue = spec.cue_class >= 0
        with_cue[spec.split] += has_cue
        rows["relpath"].append(spec.relpath)
        rows["split"].append(spec.split)
        rows["label"].append(spec.label)
        rows["wnid"].append(wnid_of(spec.label))
        rows["has_cue"].append(has_cue)
        rows["cue_kind"].append(designs[spec.cue_class].cue_kind if has_cue else "none")
        rows["cue_class"].append(spec.cue_class)
        rows["object_mask"].append(_png_mask(rendering.object_mask))
        rows["cue_mask"].append(_png_mask(rendering.cue_mask))

    _write_classes_csv(storage.join(out, "classes.csv"), designs, per_class)
    schema = pa.schema(
        [
            ("relpath", pa.string()), ("split", pa.string()), ("label", pa.int64()), ("wnid", pa.string()),
            ("has_cue", pa.bool_()), ("cue_kind", pa.string()), ("cue_class", pa.int64()),
            ("object_mask", pa.binary()), ("cue_mask", pa.binary()),
        ]
    )
    storage.write_parquet(storage.join(out, "groundtruth.parquet"), pa.Table.from_pydict(rows, schema), fp)
    return {
        "out": out,
        "fingerprint": fp,
        "params": params,
        "images": counts,
        "with_cue": with_cue,
        "cue_kinds": {d.wnid: d.cue_kind for d in designs},
    }


def _write_classes_csv(uri: str, designs: Sequence[ClassDesign], per_class: int) -> None:
    n_samples = min(5, split_size("val", per_class))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class_index", "synset", "wordnet_id", "gloss", "wikilinks", "supercategory", "val_sample_paths"])
    for d in designs:
        samples = [f"{d.wnid}_{i:05d}.JPEG" for i in range(n_samples)]
        writer.writerow([d.class_index, d.shape, d.wnid, SHAPE_GLOSSES[d.shape], "[]", "shapes", repr(samples)])
    storage.write_bytes_atomic(uri, buf.getvalue().encode())
