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
