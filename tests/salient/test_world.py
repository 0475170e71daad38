import collections
import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from salient import metadata, storage, world

TINY = {"classes": 3, "per_class": 8, "size": 32, "rho": 0.75, "seed": 0}
METADATA_COLUMNS = ["class_index", "synset", "wordnet_id", "gloss", "wikilinks", "supercategory", "val_sample_paths"]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def _groundtruth(out: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, "groundtruth.parquet")))).to_pylist()


def _png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
        arr = np.asarray(im)
    assert set(np.unique(arr)) <= {0, 255}
    return arr == 255


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world") / "w"
    return out, world.synthesize(str(out), **TINY)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tiny, tmp_path):
    out, _ = tiny
    world.synthesize(str(tmp_path / "again"), **TINY)
    world.synthesize(str(tmp_path / "other"), **{**TINY, "seed": 1})
    first, again, other = _hashes(out), _hashes(tmp_path / "again"), _hashes(tmp_path / "other")
    assert first == again
    assert sorted(first) == sorted(other)
    jpegs = [k for k in first if k.endswith(".JPEG")]
    assert all(first[k] != other[k] for k in jpegs)
    assert first["groundtruth.parquet"] != other["groundtruth.parquet"]


def test_layout_tables_and_summary(tiny):
    out, summary = tiny
    counts = {"train": 24, "val": 12, "swapped": 12, "train_free": 24}
    assert summary["images"] == counts
    rows = _groundtruth(str(out))
    assert len(rows) == sum(counts.values())
    for split, n in counts.items():
        files = sorted(str(p.relative_to(out / split)) for p in (out / split).rglob("*.JPEG"))
        listed = [r["relpath"] for r in rows if r["split"] == split]
        assert files == listed and len(files) == n
    assert rows[0]["relpath"] == "n99000000/n99000000_00000.JPEG"
    assert all(r["wnid"] == world.wnid_of(r["label"]) and r["relpath"].startswith(r["wnid"] + "/") for r in rows)
    assert storage.parquet_metadata(str(out / "groundtruth.parquet"))["fingerprint"] == summary["fingerprint"]

    info = json.loads((out / "world.json").read_text())
    assert info["params"] == TINY and info["images"] == counts
    assert [c["cue_kind"] for c in info["classes"]] == ["none", "background", "separate_object"]

    with open(out / "classes.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == METADATA_COLUMNS
    assert [r["synset"] for r in table] == ["circle", "square", "triangle"]
    assert table[0]["gloss"] == "a filled circle of any colour"
    assert eval(table[0]["val_sample_paths"])[0] == "n99000000_00000.JPEG"  # the reference's list-string style
    classes = metadata.read_class_metadata(str(out / "classes.csv"))
    assert [(c.class_index, c.wnid) for c in classes] == [(i, world.wnid_of(i)) for i in range(3)]


def test_every_mask_is_exactly_the_pixels_drawn(tiny):
    out, _ = tiny
    designs = world.design(TINY["classes"])
    size = TINY["size"]
    specs = {(s.split, s.relpath): s for s in world.plan(TINY["classes"], TINY["per_class"], TINY["rho"], TINY["seed"])}
    for row in _groundtruth(str(out)):
        spec = specs[row["split"], row["relpath"]]
        full = world.render_image(spec, designs, size)
        no_object = world.render_image(spec, designs, size, draw_object=False).rgb
        no_cue = world.render_image(spec, designs, size, draw_cue=False).rgb
        object_mask, cue_mask = _png(row["object_mask"]), _png(row["cue_mask"])
        assert object_mask.shape == cue_mask.shape == (size, size)
        np.testing.assert_array_equal(object_mask, (full.rgb != no_object).any(-1))
        np.testing.assert_array_equal(cue_mask, (full.rgb != no_cue).any(-1))
        np.testing.assert_array_equal(object_mask, full.object_mask)
        np.testing.assert_array_equal(cue_mask, full.cue_mask)
        assert object_mask.sum() > 0 and not (object_mask & cue_mask).any()
        assert cue_mask.any() == row["has_cue"]
        if row["cue_kind"] == "background":
            np.testing.assert_array_equal(cue_mask, ~object_mask)

        with Image.open(out / row["split"] / row["relpath"]) as im:
            assert im.format == "JPEG" and im.size == (size, size)
            decoded = np.asarray(im.convert("RGB")).astype(int)
        # JPEG drops some of the background's pixel noise (2% of the range) but keeps the drawing.
        error = np.abs(decoded - full.rgb).mean(-1)
        assert error.mean() < 8.0, row["relpath"]
        for mask, without in ((object_mask, no_object), (cue_mask, no_cue)):
            if mask.any():
                assert error[mask].mean() < np.abs(decoded - without).mean(-1)[mask].mean() / 4, row["relpath"]


def test_each_kind_of_cue_in_every_world_of_three_or_more_classes():
    for n in range(3, len(world.SHAPES) + 1):
        designs = world.design(n)
        assert [d.cue_kind for d in designs] == [world.CUE_KINDS[i % 3] for i in range(n)]
        assert len({d.shape for d in designs}) == n
        for d in designs:
            if d.cue_kind == "separate_object":
                assert d.cue_shape != d.shape
    assert len(world.SHAPES) >= 10 and set(world.SHAPE_GLOSSES) == set(world.SHAPES)


def _background(designs: tuple, cue_class: int, size: int = 64, index: int = 0) -> np.ndarray:
    """The lossless background of an image carrying ``cue_class``'s texture, with no object drawn."""
    spec = world.ImageSpec(seed=0, split="val", label=0, index=index, cue_class=cue_class)
    rendering = world.render_image(spec, designs, size, draw_object=False)
    assert rendering.cue_mask.sum() > 0.7 * size * size
    return rendering.rgb[rendering.cue_mask].astype(float) / 255.0


def test_background_textures_share_their_mean_colour_and_differ_in_fine_structure():
    designs = world.design(12)
    textures = {d.class_index: d.texture for d in designs if d.cue_kind == "background"}
    assert list(textures.values()) == ["stripes", "grain", "checker", "dots"]
    assert [d.texture for d in world.design(6) if d.cue_kind == "background"] == ["stripes", "grain"]
    for c, texture in textures.items():
        for index in range(3):
            pixels = _background(designs, c, index=index)
            # One mean colour for all: the class is not in the texture's colour.
            np.testing.assert_allclose(pixels.mean(0), [0.5, 0.5, 0.5], atol=0.02, err_msg=texture)
            spread = pixels.std(0).mean()
            if texture == "grain":
                assert 0.04 <= spread <= 0.31, spread
                assert np.abs(np.corrcoef(pixels.T)[0, 1]) < 0.2  # colour grain: channels independent
            else:
                # Two faint tones, the same on every channel.
                assert 0.08 <= spread <= 0.11, (texture, spread)
                np.testing.assert_array_equal(pixels[:, 0], pixels[:, 1])
                assert len(np.unique(pixels[:, 0])) == 2


def test_gaussian_noise_of_the_papers_sigma_turns_a_pattern_into_grain():
    designs = world.design(6)
    stripes, grain = (d.class_index for d in designs if d.cue_kind == "background")
    rng = np.random.default_rng(0)
    pixels = _background(designs, stripes)
    noisy = np.clip(pixels + 0.25 * rng.normal(size=pixels.shape), 0.0, 1.0)
    # Noise on the stripes looks like the grain class: the same mean colour, and a per-pixel
    # spread within the range the grain images are drawn from.
    spreads = [_background(designs, grain, index=i).std(0).mean() for i in range(100)]
    np.testing.assert_allclose(noisy.mean(0), [0.5, 0.5, 0.5], atol=0.02)
    assert min(spreads) < noisy.std(0).mean() < max(spreads)


def test_splits_carry_the_cues_they_promise(tiny):
    out, _ = tiny
    kinds = {d.class_index: d.cue_kind for d in world.design(TINY["classes"])}
    for row in _groundtruth(str(out)):
        label, cue = row["label"], row["cue_class"]
        assert row["has_cue"] == (cue >= 0)
        assert row["cue_kind"] == (kinds[cue] if cue >= 0 else "none")
        if cue >= 0:
            assert kinds[cue] != "none"
        if row["split"] == "train":
            assert cue in (-1, label)
            if kinds[label] == "none":
                assert cue == -1
        elif row["split"] == "val":
            assert cue == (label if kinds[label] != "none" else -1)
        elif row["split"] == "swapped":
            assert cue >= 0 and cue != label


def test_rho_is_the_fraction_of_images_with_a_cue():
    specs = world.plan(classes=6, per_class=200, rho=0.5, seed=3)
    kinds = {d.class_index: d.cue_kind for d in world.design(6)}
    cue_classes = [c for c, k in kinds.items() if k != "none"]
    for label in range(6):
        train = [s for s in specs if s.split == "train" and s.label == label]
        with_cue = sum(s.cue_class >= 0 for s in train)
        assert with_cue == (100 if kinds[label] != "none" else 0)
        free = [s.cue_class for s in specs if s.split == "train_free" and s.label == label]
        drawn = collections.Counter(c for c in free if c >= 0)
        assert sum(drawn.values()) == 100
        # Independent of the label: every cue class equally often, whatever the label.
        assert sorted(drawn) == cue_classes and max(drawn.values()) - min(drawn.values()) <= 1
        swapped = collections.Counter(s.cue_class for s in specs if s.split == "swapped" and s.label == label)
        assert sorted(swapped) == [c for c in cue_classes if c != label]
    for rho, expected in ((0.0, 0), (1.0, 200)):
        specs = world.plan(classes=3, per_class=200, rho=rho, seed=0)
        assert sum(s.cue_class >= 0 for s in specs if s.split == "train" and s.label == 1) == expected
        assert sum(s.cue_class >= 0 for s in specs if s.split == "train_free" and s.label == 0) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes": 2}, "classes=2"),
        ({"classes": len(world.SHAPES) + 1}, "classes=13"),
        ({"per_class": 0}, "per_class=0"),
        ({"size": 15}, "size=15"),
        ({"rho": 1.5}, "rho=1.5"),
        ({"rho": -0.1}, "rho=-0.1"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_bad_arguments_fail_before_writing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        world.synthesize(str(tmp_path / "w"), **{**TINY, **kwargs})
    assert not (tmp_path / "w").exists()


def test_refuses_a_foreign_directory_and_replaces_an_earlier_world(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no world.json"):
        world.synthesize(str(foreign), **TINY)
    assert (foreign / "notes.txt").read_text() == "keep me"

    out = tmp_path / "w"
    world.synthesize(str(out), **{**TINY, "per_class": 12})
    world.synthesize(str(out), **TINY)
    fresh = tmp_path / "fresh"
    world.synthesize(str(fresh), **TINY)
    assert _hashes(out) == _hashes(fresh)


def test_writes_to_any_fsspec_filesystem():
    out = "memory://salient-test-world"
    try:
        summary = world.synthesize(out, **{**TINY, "per_class": 2})
        rows = _groundtruth(out)
        assert len(rows) == sum(summary["images"].values())
        first = rows[0]
        data = storage.read_bytes(storage.join(out, first["split"], first["relpath"]))
        assert data[:2] == b"\xff\xd8"
        assert storage.read_json(storage.join(out, "world.json"))["params"]["per_class"] == 2
    finally:
        storage.remove(out, recursive=True)
