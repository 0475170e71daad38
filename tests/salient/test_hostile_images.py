"""Hostile and odd images: a 1x1 image, pixel bombs, extreme aspect ratios, EXIF-rotated images,
wrong extensions and unreadable files. Each one is either processed or listed with a reason;
none crashes a shard and none goes missing."""

import io
import struct
import time
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from salient import activations, images, plan, storage
from salient.config import MAX_PIXELS, ComputeConfig, Config, DatasetConfig, ModelConfig, PreprocessConfig
from salient.stage import local_run
from salient.stages.activations import Activations
from tests.helpers import jpeg_bytes, make_checkpoint, make_image_folder

ORIENTATION = 0x0112


def png_bomb(width: int, height: int, truncate: bool = False) -> bytes:
    """A genuine 1-bit greyscale PNG of ``width`` x ``height`` black pixels, compressed to almost
    nothing; with ``truncate`` its pixel data stops halfway, so decoding it would fail."""
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    if truncate:
        idat = idat[: len(idat) // 2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose frame header says ``width`` x ``height``: its data cannot fill that size."""
    data = bytearray(jpeg_bytes(np.full((16, 16, 3), 128, np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def encode(img: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    """``img`` as ``fmt`` bytes, with an EXIF Orientation tag when ``orientation`` is given."""
    options = {"quality": 95} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        options["exif"] = exif.tobytes()
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def asymmetric(h: int = 30, w: int = 50) -> Image.Image:
    """An image whose rotation shows: a bright top-left quadrant on a dark gradient."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 2] = np.linspace(0, 120, w, dtype=np.uint8)[None, :]
    arr[: h // 2, : w // 2] = (250, 240, 10)
    return Image.fromarray(arr)


def test_one_pixel_image_is_upscaled_to_a_constant_crop():
    data = encode(Image.new("RGB", (1, 1), (200, 10, 30)), "PNG")
    x, orientation = images.read_image(data, 256, 224)
    assert x.shape == (3, 224, 224) and orientation == 1
    expected = np.array([200, 10, 30], np.float32)[:, None, None] / 255
    np.testing.assert_array_equal(x.numpy(), np.broadcast_to(expected, (3, 224, 224)))


def test_pixel_bomb_is_refused_from_its_header():
    bomb = png_bomb(20000, 20000, truncate=True)
    assert len(bomb) < 100_000 and struct.unpack(">II", bomb[16:24]) == (20000, 20000)
    for data in (bomb, jpeg_claiming(20000, 20000)):
        start = time.perf_counter()
        with pytest.raises(images.TooManyPixels) as err:
            images.read_image(data, 256, 224)
        # decoding would take seconds and then fail on the missing data, with another error
        assert time.perf_counter() - start < 1.0
        assert "400000000 pixels" in str(err.value) and "refused before decoding" in str(err.value).lower()
        assert isinstance(err.value, images.DECODE_ERRORS)


def test_pixel_limit_counts_stored_and_resized_pixels():
    square = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    assert images.read_image(square, 64, 64, max_pixels=64 * 64)[0].shape == (3, 64, 64)
    with pytest.raises(images.TooManyPixels, match="64x64 = 4,096 pixels, over preprocess.max_pixels = 4,095"):
        images.read_image(square, 64, 64, max_pixels=64 * 64 - 1)
    with pytest.raises(images.TooManyPixels):
        images.decode(square, max_pixels=64 * 64 - 1)

    # 10 wide, 40 high: resized to 32 on the shorter side it is 32 x 128 = 4096 pixels
    tall = encode(Image.new("RGB", (10, 40), (9, 9, 9)), "PNG")
    assert images.read_image(tall, 32, 32, max_pixels=4096)[0].shape == (3, 32, 32)
    with pytest.raises(images.TooManyPixels, match="10x40 would be 32x128 = 4,096 pixels once resized to 32"):
        images.read_image(tall, 32, 32, max_pixels=4095)

    # a 1 x 4000 strip has few pixels but would be 256 x 1,024,000 once resized: over the default limit
    assert 256 * 1_024_000 > MAX_PIXELS > 4000
    with pytest.raises(images.TooManyPixels, match="would be 1024000x256"):
        images.read_image(encode(Image.new("L", (4000, 1), 7), "PNG"), 256, 224)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_rotation_is_recorded_not_applied(fmt):
    img = asymmetric()
    plain, rotated = encode(img, fmt), encode(img, fmt, orientation=6)
    assert Image.open(io.BytesIO(rotated)).getexif()[ORIENTATION] == 6
    x_plain, o_plain = images.read_image(plain, 36, 32)
    x_rot, o_rot = images.read_image(rotated, 36, 32)
    assert (o_plain, o_rot) == (1, 6)
    np.testing.assert_array_equal(x_rot.numpy(), x_plain.numpy())
    # as stored: the bright quadrant stays top-left, where a 90-degree turn would have moved it
    assert x_rot[0, :8, :8].mean() > 0.9 and x_rot[0, -8:, :8].mean() < 0.1


@pytest.mark.parametrize("value, expected", [(1, 1), (3, 3), (8, 8), (0, 0), (9, 0), (300, 0)])
def test_orientation_values_outside_one_to_eight_read_as_zero(value, expected):
    assert images.read_image(encode(asymmetric(), "JPEG", orientation=value), 32, 32)[1] == expected


def _hostile_folder(root):
    """Normal JPEGs plus odd entries. Returns (processed relpaths, failing relpaths, skipped relpaths)."""
    make_image_folder(root, classes=2, per_class=3, size=(30, 40))
    pic = asymmetric()
    processed = {
        "n0000/one_pixel.JPEG": encode(Image.new("RGB", (1, 1), (90, 80, 70)), "JPEG"),
        "n0000/plain.JPEG": encode(pic, "JPEG"),
        "n0000/rotated.JPEG": encode(pic, "JPEG", orientation=6),
        "n0001/jpeg_named.png": encode(pic, "JPEG"),
    }
    failing = {
        "n0000/bomb.png": png_bomb(20000, 20000),
        "n0001/claims_huge.JPEG": jpeg_claiming(20000, 20000),
        "n0001/strip.png": encode(Image.new("L", (4000, 1), 7), "PNG"),  # 144,000 x 36 once resized
        "n0001/forbidden.JPEG": encode(pic, "JPEG"),
    }
    for rel, data in {**processed, **failing}.items():
        (root / rel).write_bytes(data)
    (root / "n0000" / "notes.txt").write_text("not an image")
    (root / "n0000" / "photo.webp").write_bytes(b"RIFF")
    (root / "n0001" / "nested").mkdir()
    (root / "n0001" / "nested" / "deep.JPEG").write_bytes(encode(pic, "JPEG"))
    (root / "README.md").write_text("a file beside the class folders")
    skipped = ["README.md", "n0000/notes.txt", "n0000/photo.webp", "n0001/nested/"]
    return sorted(processed), sorted(failing), skipped


def test_shard_processes_or_lists_every_hostile_file(tmp_path, monkeypatch):
    root = tmp_path / "data"
    processed, failing, skipped = _hostile_folder(root)
    ckpt = make_checkpoint(tmp_path / "tiny.pt", num_classes=2)
    cfg = Config(
        dataset=DatasetConfig(root=str(root)), model=ModelConfig(checkpoint=ckpt, arch="tiny_resnet"),
        preprocess=PreprocessConfig(resize=36, crop=32, max_pixels=100_000), compute=ComputeConfig(batch_size=4, shard_size=100),
        output=str(tmp_path / "out"),
    )
    run = local_run(cfg, [Activations()])
    out = run.build
    summary = plan.write_plan(str(root), out, shard_size=100)
    recorded = plan.plan_skipped(out)
    assert summary["skipped"] == recorded["count"] == len(skipped)
    assert [e["relpath"] for e in recorded["entries"]] == skipped
    reasons = {e["relpath"]: e["reason"] for e in recorded["entries"]}
    assert "extension" in reasons["n0000/notes.txt"] and "folder inside a class folder" in reasons["n0001/nested/"]
    assert "beside the class folders" in reasons["README.md"]

    # the object store answers 403 for one file, as S3 does for an object the credentials may not read
    real_cat = storage._cat_file

    def cat_file(fs, path):
        if path.endswith("forbidden.JPEG"):
            raise PermissionError(13, "Permission denied", path)
        return real_cat(fs, path)

    monkeypatch.setattr(storage, "_cat_file", cat_file)
    runner = activations.ActivationRunner(cfg.model, cfg.preprocess, cfg.compute, threads=1)
    stats = [runner(item.payload) for item in Activations().shards(run)]
    tables = [pq.read_table(activations.table_uri(out, s["shard"])) for s in stats]
    rows = {r["relpath"]: r for t in tables for r in t.to_pylist()}
    failed = {f["relpath"]: f["reason"] for s in stats for f in s["failures"]}

    planned = plan.read_plan(out).column("relpath").to_pylist()
    assert sorted(planned) == sorted(set(planned)) and len(rows) + len(failed) == len(planned)
    assert set(rows) | set(failed) == set(planned), "every planned image is a row or a listed failure"
    assert set(processed) <= set(rows) and sorted(failed) == failing
    for rel in ("n0000/bomb.png", "n0001/claims_huge.JPEG", "n0001/strip.png"):
        assert failed[rel].startswith("TooManyPixels: ") and "refused before decoding" in failed[rel], failed[rel]
    assert failed["n0001/forbidden.JPEG"].startswith("PermissionError: ")

    assert {r: rows[r]["orientation"] for r in processed} == {
        "n0000/one_pixel.JPEG": 1, "n0000/plain.JPEG": 1, "n0000/rotated.JPEG": 6, "n0001/jpeg_named.png": 1,
    }
    assert {r["orientation"] for rel, r in rows.items() if rel not in processed} == {1}
    # processed as stored: the rotated file's features are those of the same pixels without EXIF
    assert rows["n0000/rotated.JPEG"]["features"] == rows["n0000/plain.JPEG"]["features"]
    assert rows["n0001/jpeg_named.png"]["features"] == rows["n0000/plain.JPEG"]["features"]
    assert all(t.schema.field("orientation").type == activations.output_schema(128).field("orientation").type for t in tables)


def test_pixel_limit_is_part_of_the_stage_fingerprint(tmp_path):
    model = ModelConfig(checkpoint=make_checkpoint(tmp_path / "tiny.pt", num_classes=2), arch="tiny_resnet")

    def stage_fingerprint(preprocess: PreprocessConfig) -> str:
        return Activations().key(local_run(Config(model=model, preprocess=preprocess, output=str(tmp_path / "out"))))

    default = stage_fingerprint(PreprocessConfig())
    assert default != stage_fingerprint(PreprocessConfig(max_pixels=10_000))
    assert default == stage_fingerprint(PreprocessConfig(max_pixels=MAX_PIXELS))
