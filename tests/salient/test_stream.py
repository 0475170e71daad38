"""The image stream: every image arrives once, in order, with the reference preprocessing; bad files
are listed, never dropped; feeds opened together do not mix; reads of many objects at once keep
missing objects apart from store errors."""

import errno
import io
import threading
import uuid

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from torchvision.transforms import InterpolationMode

from salient import storage
from salient.config import PreprocessConfig
from salient.errors import ConfigError
from salient.stream import HostCopies, ImageStream
from tests.helpers import make_image_folder

RESIZE, CROP = 40, 32


def reference(path) -> torch.Tensor:
    """torchvision's documented ImageNet preprocessing on a PIL image, as uint8."""
    img = Image.open(path).convert("RGB")
    img = TF.center_crop(TF.resize(img, RESIZE, interpolation=InterpolationMode.BILINEAR, antialias=True), [CROP, CROP])
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def collect(feed):
    positions, pixels, failures = [], [], []
    for batch in feed:
        positions += batch.positions
        pixels += list(batch.pixels)
        failures += batch.failures
    return positions, pixels, failures


@pytest.fixture
def folder(tmp_path):
    rels = make_image_folder(tmp_path / "data", classes=2, per_class=7, size=(45, 61))
    return tmp_path / "data", rels


def test_every_image_arrives_once_in_order_with_the_reference_pixels_and_bad_files_are_listed(folder):
    root, rels = folder
    (root / "n0000" / "broken.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
    wanted = rels[:3] + ["n0000/broken.JPEG", "n0000/missing.JPEG"] + rels[3:]
    stream = ImageStream(str(root), PreprocessConfig(resize=RESIZE, crop=CROP), "cpu", batch_size=4, threads=3)
    try:
        feed = stream.open(wanted)
        positions, pixels, failures = collect(feed)
    finally:
        stream.close()
    good = [i for i, r in enumerate(wanted) if r in rels]
    assert positions == good
    for pos, px in zip(positions, pixels):
        assert px.dtype == torch.uint8 and torch.equal(px, reference(root / wanted[pos])), wanted[pos]
    reasons = dict(failures)
    assert sorted(reasons) == [3, 4]
    assert "UnidentifiedImageError" in reasons[3] or "cannot identify" in reasons[3]
    assert "disappeared" in reasons[4]
    assert feed.stats.images == len(good) and feed.stats.failed == 2 and feed.stats.fallbacks == 0


def test_feeds_opened_together_each_get_their_own_images(folder):
    root, rels = folder
    stream = ImageStream(str(root), PreprocessConfig(resize=RESIZE, crop=CROP), "cpu", batch_size=3, threads=2)
    results = {}
    try:
        feeds = {"a": stream.open(rels[:9]), "b": stream.open(rels[5:][::-1])}

        def drain(name):
            results[name] = collect(feeds[name])

        threads = [threading.Thread(target=drain, args=(n,)) for n in feeds]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stream.close()
    for name, wanted in (("a", rels[:9]), ("b", rels[5:][::-1])):
        positions, pixels, failures = results[name]
        assert positions == list(range(len(wanted))) and not failures
        for pos, px in zip(positions, pixels):
            assert torch.equal(px, reference(root / wanted[pos]))


def test_a_feed_left_unread_stops_reading(folder):
    root, rels = folder
    stream = ImageStream(str(root), PreprocessConfig(resize=RESIZE, crop=CROP), "cpu", batch_size=1, threads=1)
    feed = stream.open(rels * 20)
    next(iter(feed)).pixels  # noqa: B018 -- take one batch, then give up
    feed.cancel()
    feed._reader.join(timeout=10)
    assert not feed._reader.is_alive()
    stream.close()


def test_nvjpeg_on_a_cpu_worker_is_a_config_error(folder):
    root, _ = folder
    with pytest.raises(ConfigError, match="nvjpeg"):
        ImageStream(str(root), PreprocessConfig(resize=RESIZE, crop=CROP, decoder="nvjpeg"), "cpu", batch_size=4, threads=1)


class FlakyFS(LocalFileSystem):
    """A local filesystem whose first read of each file fails like a dropped connection."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: set[str] = set()

    def cat_file(self, path, start=None, end=None, **kwargs):
        if path not in self.seen:
            self.seen.add(path)
            raise OSError(errno.ECONNRESET, "connection reset by peer")
        return super().cat_file(path, start, end, **kwargs)


class ForbiddenFS(LocalFileSystem):
    def cat_file(self, path, start=None, end=None, **kwargs):
        if "forbidden" in path:
            raise PermissionError(errno.EACCES, "access denied", path)
        if "broken-store" in path:
            raise OSError(errno.EIO, "the disk failed")
        return super().cat_file(path, start, end, **kwargs)


def test_cat_many_retries_transient_errors_returns_missing_and_forbidden_and_raises_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.0)
    for name in ("a", "b", "forbidden", "broken-store"):
        (tmp_path / name).write_bytes(name.encode())
    flaky = FlakyFS(skip_instance_cache=True)
    assert storage.cat_many(flaky, [str(tmp_path / "a"), str(tmp_path / "b")]) == [b"a", b"b"]
    got = storage.cat_many(ForbiddenFS(skip_instance_cache=True), [str(tmp_path / n) for n in ("a", "forbidden", "nope")])
    assert got[0] == b"a" and isinstance(got[1], PermissionError) and isinstance(got[2], FileNotFoundError)
    with pytest.raises(OSError, match="disk failed"):
        storage.cat_many(ForbiddenFS(skip_instance_cache=True), [str(tmp_path / "broken-store")])


def test_images_stream_from_an_object_store_many_at_once(s3_server, folder):
    root, rels = folder
    base = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}/data"
    for rel in rels:
        storage.write_bytes_atomic(f"{base}/{rel}", (root / rel).read_bytes())
    stream = ImageStream(base, PreprocessConfig(resize=RESIZE, crop=CROP), "cpu", batch_size=5, threads=2)
    try:
        positions, pixels, failures = collect(stream.open(rels + ["n0001/gone.JPEG"]))
    finally:
        stream.close()
    assert positions == list(range(len(rels))) and [p for p, _ in failures] == [len(rels)]
    for pos, px in zip(positions, pixels):
        assert torch.equal(px, reference(io.BytesIO((root / rels[pos]).read_bytes())))


def test_host_copies_on_the_cpu_are_the_tensors_themselves():
    t = torch.arange(6)
    copies = HostCopies(torch.device("cpu"))
    assert copies.add(t) is t
    copies.wait()


def test_consecutive_groups_keep_order_and_the_budget():
    from salient.stream import consecutive_groups

    assert consecutive_groups([4, 4, 4, 9, 1, 2, 12, 3], budget=8) == [[0, 1], [2], [3], [4, 5], [6], [7]]
    assert consecutive_groups([], budget=8) == []


def test_decode_each_keeps_the_good_items_of_a_batch_that_fails():
    from salient.stream import decode_each

    calls = []

    def decode(batch):
        calls.append(len(batch))
        if any(int(t[0]) == 13 for t in batch):
            raise RuntimeError("nvjpegDecode failed: bad Huffman code")
        return [t * 2 for t in batch]

    items = [torch.tensor([1]), torch.tensor([13]), torch.tensor([3])]
    out = decode_each(items, decode)
    assert calls == [3, 1, 1, 1]
    assert [int(o[0]) for o in out if isinstance(o, torch.Tensor)] == [2, 6]
    assert isinstance(out[1], RuntimeError) and "Huffman" in str(out[1])
    calls.clear()
    assert [int(o[0]) for o in decode_each(items[::2], decode)] == [2, 6]
    assert calls == [2]  # a good batch is one call


def _nvjpeg_on_the_cpu(stream, refuse: bytes):
    """``stream`` decoding as the nvjpeg path does, with a stand-in for nvJPEG on the CPU
    (libjpeg-turbo) that fails a whole batch holding the JPEG ``refuse``, as nvJPEG fails on a file
    it cannot decode."""
    from salient import images

    stream.decoder = "nvjpeg"
    calls = []

    def stand_in(data):
        calls.append(len(data))
        if any(bytes(t.numpy()) == refuse for t in data):
            raise RuntimeError("nvjpegDecodeJpeg failed: stand-in refuses this file")
        return [images.decode_jpeg_cpu(bytes(t.numpy())) for t in data]

    stream._nvjpeg = stand_in
    return calls


def test_nvjpeg_loses_no_batch_to_one_bad_jpeg_and_gives_pils_reasons(tmp_path):
    """A truncated JPEG (which nvJPEG may decode silently) is refused as PIL refuses it; one nvJPEG
    refuses is read by PIL; the other images of the batch come from the GPU path."""
    root = tmp_path / "data"
    rels = make_image_folder(root, classes=1, per_class=6, size=(45, 61))
    whole = (root / rels[0]).read_bytes()
    (root / "n0000" / "cut.JPEG").write_bytes(whole[: len(whole) // 2])
    refused = (root / rels[1]).read_bytes()
    wanted = rels[:2] + ["n0000/cut.JPEG"] + rels[2:]
    pre = PreprocessConfig(resize=RESIZE, crop=CROP)
    by_decoder = {}
    for decoder in ("pil", "torchvision", "nvjpeg"):
        stream = ImageStream(str(root), pre.model_copy(update={"decoder": "pil" if decoder == "nvjpeg" else decoder}), "cpu", batch_size=8, threads=2)
        calls = _nvjpeg_on_the_cpu(stream, refused) if decoder == "nvjpeg" else None
        try:
            feed = stream.open(wanted)
            by_decoder[decoder] = (*collect(feed), feed.stats, calls)
        finally:
            stream.close()
    positions, pixels, failures, stats, calls = by_decoder["nvjpeg"]
    pil_positions, pil_pixels, pil_failures, _, _ = by_decoder["pil"]
    tv_pixels = dict(zip(by_decoder["torchvision"][0], by_decoder["torchvision"][1]))
    assert positions == pil_positions == [0, 1, 3, 4, 5, 6]
    assert failures == pil_failures and "truncated" in failures[0][1] and failures[0][0] == 2
    assert calls == [6, 1, 1, 1, 1, 1, 1]  # the batch of six, then each alone
    for pos, px, ref in zip(positions, pixels, pil_pixels):
        assert torch.equal(px, ref if wanted[pos] == rels[1] else tv_pixels[pos]), wanted[pos]
    assert stats.images == 6 and stats.failed == 1 and stats.fallbacks == 1


def test_nvjpeg_waits_for_the_copy_stream_before_it_decodes(tmp_path):
    root = tmp_path / "data"
    rels = make_image_folder(root, classes=1, per_class=2, size=(45, 61))
    stream = ImageStream(str(root), PreprocessConfig(resize=RESIZE, crop=CROP), "cpu", batch_size=8, threads=1)
    order = []
    try:
        _nvjpeg_on_the_cpu(stream, b"")
        decode = stream._nvjpeg
        stream._nvjpeg = lambda data: (order.append("decode"), decode(data))[1]

        class CopyStream:
            def synchronize(self):
                order.append("synchronize")

        stream._copy_stream = CopyStream()
        decoded = [stream.decode((root / r).read_bytes()) for r in rels]
        assert all(d.jpeg is not None for d in decoded)
        stream.decode_on_device(decoded)
    finally:
        stream.close()
    assert order == ["synchronize", "decode"]
    assert all(d.pixels is not None and d.pixels.shape == (3, CROP, CROP) and d.jpeg is None for d in decoded)


def test_nvjpeg_decodes_a_batch_of_large_images_in_parts(tmp_path, monkeypatch):
    """At most NVJPEG_BATCH_PIXELS source pixels per nvJPEG call (a batch of full-size photos would
    take gigabytes at once); an image over it alone."""
    from salient import stream as streammod

    root = tmp_path / "data"
    rels = make_image_folder(root, classes=1, per_class=5, size=(45, 61))  # 2,745 pixels each
    monkeypatch.setattr(streammod, "NVJPEG_BATCH_PIXELS", 2 * 45 * 61)
    stream = ImageStream(str(root), PreprocessConfig(resize=RESIZE, crop=CROP), "cpu", batch_size=8, threads=1)
    try:
        calls = _nvjpeg_on_the_cpu(stream, b"")
        decoded = [stream.decode((root / r).read_bytes()) for r in rels]
        stream.decode_on_device(decoded)
    finally:
        stream.close()
    assert calls == [2, 2, 1]
    assert all(d.pixels is not None and d.error is None for d in decoded)
