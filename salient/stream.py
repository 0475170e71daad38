"""The image stream every model stage reads its images through (docs/design.md §3, "Data plane").

A :class:`Feed` is the images of one work item. As soon as it is opened, a reader thread fetches
them a batch of paths at a time, concurrently on an object store (one request each, many in
flight), and hands each file to a shared pool of decode threads (PIL and libjpeg-turbo decode
without holding the GIL); on a filesystem read file by file, each decode thread reads its own. The model's side
takes ready batches: uint8 ``[N, 3, crop, crop]`` pixels, stacked into pinned memory and copied to
the device on a side stream while the previous batch computes; scaling to ``[0, 1]`` and the model's
normalisation happen on the device (:mod:`salient.inference`). A worker opens its next item's feed
while the current item runs, so nothing drains between items.

With ``preprocess.decoder = nvjpeg`` the decode threads only read headers; complete 8-bit RGB
JPEGs are decoded in batches on the GPU (``torchvision.io.decode_jpeg(device="cuda")``), at most
:data:`NVJPEG_BATCH_PIXELS` source pixels per call, and resized there. Images a fast decoder cannot
read (PNG, greyscale, CMYK, 16-bit, a JPEG cut short, one nvJPEG refuses, ...) are read by PIL, which
gives the reason when it refuses them too; the feed counts them.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec.asyn
import torch
from salient import images, storage
from salient.config import ComputeConfig, PreprocessConfig
from salient.errors import ConfigError, InputError

# Batches read and decoded ahead of the model, per feed.
LOOKAHEAD_BATCHES = 3
# Source pixels per nvJPEG call (3 bytes each decoded): a batch of large photos is decoded in parts,
# an image larger than this alone.
NVJPEG_BATCH_PIXELS = 2**27


@dataclass
class Batch:
    """Ready pixels of some of a feed's images, in request order.

    ``positions`` index the feed's relpaths; ``pixels`` is uint8 ``[len(positions), 3, crop, crop]``
    on the stream's device (possibly no rows, when every image of the stretch failed); ``failures``
    are the images of this stretch that could not be read or decoded, as ``(position, reason)``.
    """

    positions: list[int]
    pixels: torch.Tensor
    orientations: list[int]
    failures: list[tuple[int, str]]


@dataclass
class FeedStats:
    """Where a feed's time went. ``read``/``decode`` add up over threads; ``wait`` is the time the
    model's side waited for pixels (the device idle for want of input)."""

    images: int = 0
    failed: int = 0
    fallbacks: int = 0
    read: float = 0.0
    decode: float = 0.0
    wait: float = 0.0

    def as_dict(self) -> dict:
        return {
            "images": self.images, "failed": self.failed, "decoder_fallbacks": self.fallbacks,
            "read_s": round(self.read, 4), "decode_s": round(self.decode, 4), "wait_s": round(self.wait, 4),
        }


@dataclass
class _Decoded:
    pixels: torch.Tensor | None = None  # uint8 [3, crop, crop]; None: failed, or raw JPEG for the GPU
    jpeg: bytes | None = None
    source_pixels: int = 0  # of the JPEG, from its header
    orientation: int = 1
    error: str | None = None
    fallback: bool = False
    decode_s: float = 0.0
    read_s: float = 0.0


def _read_error(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "FileNotFoundError: file disappeared after planning"
    if isinstance(exc, PermissionError):
        return f"{images.describe_error(exc)}; the file cannot be read with these credentials"
    return images.describe_error(exc)


def decode_threads(compute: ComputeConfig, threads: int | None) -> int:
    """A worker's decode threads: ``compute.decode_threads``, else the CPU threads it was given,
    else every core of its machine."""
    return compute.decode_threads or threads or os.cpu_count() or 1


class ImageStream:
    """Reads, decodes and batches images under a dataset root (``root``, or the one each feed is
    opened with) for one worker's model.

    ``threads`` decode threads are shared by every open feed; ``device`` is where batches are
    handed over.
    """

    def __init__(self, root: str | None, preprocess: PreprocessConfig, device: str, batch_size: int, threads: int) -> None:
        self.root = root
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.threads = max(1, threads)
        self.decoder = preprocess.decoder
        if self.decoder == "nvjpeg" and self.device.type != "cuda":
            raise ConfigError([f"preprocess.decoder = 'nvjpeg' decodes on a CUDA GPU; this worker runs on {device}: use pil or torchvision"])
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="decode")
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def open(self, relpaths: Sequence[str], root: str | None = None) -> Feed:
        """Start reading ``relpaths`` under ``root`` (default: the stream's) now; iterate the
        returned feed for their batches."""
        root = root if root is not None else self.root
        if root is None:
            raise ValueError("ImageStream.open needs a dataset root: the stream has none")
        return Feed(self, root, list(relpaths))

    def decode(self, data: bytes) -> _Decoded:
        """One file's bytes to pixels (or, for nvjpeg, to a JPEG checked for the GPU); never raises
        for an unusable image."""
        p = self.preprocess
        t0 = time.perf_counter()
        try:
            if self.decoder == "nvjpeg":
                with images.open_header(data, p.max_pixels, p.resize) as img:
                    if images.fast_decodable(img) and images.jpeg_complete(data):
                        w, h = img.size
                        return _Decoded(jpeg=data, orientation=images.orientation(img), source_pixels=w * h, decode_s=time.perf_counter() - t0)
            pixels, orient, fallback = images.read_pixels(data, p.resize, p.crop, p.max_pixels, self.decoder)
        except images.DECODE_ERRORS as exc:
            return _Decoded(error=images.describe_error(exc), decode_s=time.perf_counter() - t0)
        return _Decoded(pixels=pixels, orientation=orient, fallback=fallback, decode_s=time.perf_counter() - t0)

    def _nvjpeg(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)

    def decode_on_device(self, decoded: Sequence[_Decoded]) -> None:
        """The JPEGs among ``decoded`` that the header check kept for nvJPEG, decoded on the device
        and resized there, in place. One that nvJPEG refuses is read by PIL instead (its reason
        recorded where PIL refuses it too); the others of its batch are kept."""
        todo = [d for d in decoded if d.jpeg is not None]
        if not todo:
            return
        if self._copy_stream is not None:
            # nvJPEG writes on its own stream into memory allocated on this one: what this stream
            # still has queued (the last batch's resize) must be done before that memory is reused.
            self._copy_stream.synchronize()
        p = self.preprocess
        for group in consecutive_groups([d.source_pixels for d in todo], NVJPEG_BATCH_PIXELS):
            items = [todo[i] for i in group]
            outs = decode_each([torch.frombuffer(bytearray(d.jpeg), dtype=torch.uint8) for d in items], self._nvjpeg)
            for d, out in zip(items, outs):
                if isinstance(out, torch.Tensor):
                    d.pixels = images.resize_crop(out, p.resize, p.crop)
                else:
                    try:
                        d.pixels = images.read_pixels(d.jpeg, p.resize, p.crop, p.max_pixels, "pil")[0]
                        d.fallback = True
                    except images.DECODE_ERRORS as exc:
                        d.error = images.describe_error(exc)
                d.jpeg = None


def consecutive_groups(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """The indices of ``sizes``, in order, in consecutive groups whose sizes add up to at most
    ``budget`` (a size over it alone in its group)."""
    groups: list[list[int]] = []
    total = budget + 1
    for i, size in enumerate(sizes):
        if total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def decode_each(data: list[torch.Tensor], decode: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> list[torch.Tensor | RuntimeError]:
    """``decode`` of the whole batch; where it fails, of each item alone: per item, its result or
    the error that item raised."""
    try:
        return list(decode(data))
    except RuntimeError:
        pass
    out: list[torch.Tensor | RuntimeError] = []
    for item in data:
        try:
            out.append(decode([item])[0])
        except RuntimeError as exc:
            out.append(exc)
    return out


@dataclass
class _Chunk:
    positions: list[int]
    results: list[Future[_Decoded] | _Decoded]
    read_s: float


class Feed:
    """The images of one work item on their way to the model; iterate for :class:`Batch` es."""

    def __init__(self, stream: ImageStream, root: str, relpaths: list[str]) -> None:
        self.stream = stream
        self.fs, base = storage.url_to_fs(root)
        self.base = base.rstrip("/")
        self.relpaths = relpaths
        self.concurrent = isinstance(self.fs, fsspec.asyn.AsyncFileSystem)
        self.stats = FeedStats()
        self._chunks: queue.Queue[_Chunk | BaseException | None] = queue.Queue(maxsize=LOOKAHEAD_BATCHES)
        self._cancelled = threading.Event()
        self._reader = threading.Thread(target=self._read_all, name="read", daemon=True)
        self._reader.start()

    def cancel(self) -> None:
        """Stop reading ahead (the consumer gave up on this feed)."""
        self._cancelled.set()

    def _put(self, chunk: _Chunk | BaseException | None) -> bool:
        while not self._cancelled.is_set():
            try:
                self._chunks.put(chunk, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read_all(self) -> None:
        s = self.stream
        try:
            for start in range(0, len(self.relpaths), s.batch_size):
                positions = list(range(start, min(start + s.batch_size, len(self.relpaths))))
                paths = [f"{self.base}/{storage.safe_relpath(self.relpaths[p])}" for p in positions]
                results: list[Future[_Decoded] | _Decoded] = []
                read_s = 0.0
                if self.concurrent:
                    t0 = time.perf_counter()
                    got = storage.cat_many(self.fs, paths)
                    read_s = time.perf_counter() - t0
                    for data in got:
                        if isinstance(data, BaseException):
                            results.append(_Decoded(error=_read_error(data)))
                        else:
                            results.append(s.pool.submit(s.decode, data))
                else:  # a filesystem read file by file: each decode thread reads its own
                    results.extend(s.pool.submit(self._read_and_decode, path) for path in paths)
                if not self._put(_Chunk(positions, results, read_s)):
                    return
            self._put(None)
        except BaseException as exc:  # noqa: BLE001 -- handed to the consumer, which raises it
            self._put(exc)

    def _read_and_decode(self, path: str) -> _Decoded:
        t0 = time.perf_counter()
        (data,) = storage.cat_many(self.fs, [path])
        read_s = time.perf_counter() - t0
        decoded = _Decoded(error=_read_error(data)) if isinstance(data, BaseException) else self.stream.decode(data)
        decoded.read_s = read_s
        return decoded

    def __iter__(self) -> Iterator[Batch]:
        # A batch is handed over as soon as its copy is queued: the model's kernels are queued
        # behind it without a host sync, so the next batch's copy, on the side stream, runs while
        # this one computes.
        try:
            while True:
                t0 = time.perf_counter()
                chunk = self._chunks.get()
                if isinstance(chunk, BaseException):
                    raise chunk
                if chunk is None:
                    break
                decoded = [r.result() if isinstance(r, Future) else r for r in chunk.results]
                self.stats.wait += time.perf_counter() - t0
                self.stats.read += chunk.read_s
                batch = self._assemble(chunk.positions, decoded)
                if batch is not None:
                    yield self._ready(*batch)
        finally:
            self.cancel()

    def _ready(self, batch: Batch, event: torch.cuda.Event | None) -> Batch:
        if event is not None:
            consumer = torch.cuda.current_stream(self.stream.device)
            consumer.wait_event(event)
            batch.pixels.record_stream(consumer)  # made on the copy stream, used on this one
        return batch

    def _assemble(self, positions: list[int], decoded: list[_Decoded]) -> tuple[Batch, torch.cuda.Event | None] | None:
        """The chunk's good images as one batch on the device (the copy started, not waited for)."""
        s = self.stream
        cuda = s.device.type == "cuda"
        if any(d.jpeg is not None for d in decoded):
            t0 = time.perf_counter()
            with torch.cuda.stream(s._copy_stream) if cuda else contextlib.nullcontext():
                s.decode_on_device(decoded)
            self.stats.decode += time.perf_counter() - t0
        good, pixels, orientations, failures = [], [], [], []
        for pos, d in zip(positions, decoded):
            self.stats.decode += d.decode_s
            self.stats.read += d.read_s
            if d.error is not None:
                failures.append((pos, d.error))
                continue
            good.append(pos)
            orientations.append(d.orientation)
            self.stats.fallbacks += d.fallback
            pixels.append(d.pixels)
        self.stats.images += len(good)
        self.stats.failed += len(failures)
        if not good:
            if failures:
                empty = torch.zeros((0, 3, s.preprocess.crop, s.preprocess.crop), dtype=torch.uint8, device=s.device)
                return Batch([], empty, [], failures), None
            return None
        if not cuda:
            return Batch(good, channels_last(pixels), orientations, failures), None
        on_gpu = {i for i, p in enumerate(pixels) if p.device.type == "cuda"}
        host = channels_last([p for i, p in enumerate(pixels) if i not in on_gpu], pin=True)
        with torch.cuda.stream(s._copy_stream):
            on_device = host.to(s.device, non_blocking=True)
            if on_gpu:
                from_cpu = iter(on_device)
                ordered = [p if i in on_gpu else next(from_cpu) for i, p in enumerate(pixels)]
                on_device = torch.stack(ordered).contiguous(memory_format=torch.channels_last)
            event = torch.cuda.Event()
            event.record(s._copy_stream)
        return Batch(good, on_device, orientations, failures), event


def channels_last(pixels: Sequence[torch.Tensor], pin: bool = False) -> torch.Tensor:
    """uint8 ``[3, H, W]`` images as one ``[N, 3, H, W]`` batch laid out channels-last (the layout
    PIL decodes to, and the model's), in pinned memory with ``pin``."""
    h, w = pixels[0].shape[1:] if pixels else (0, 0)
    out = torch.empty((len(pixels), h, w, 3), dtype=torch.uint8, pin_memory=pin).permute(0, 3, 1, 2)
    for i, p in enumerate(pixels):
        out[i].copy_(p)
    return out


def refuse_failures(what: str, relpaths: Sequence[str], batch: Batch) -> None:
    """Raise :class:`InputError` naming the images of ``batch`` that could not be read, if any;
    ``what`` names the work they were read for."""
    if batch.failures:
        listed = "; ".join(f"{relpaths[p]}: {reason}" for p, reason in batch.failures[:3])
        raise InputError(
            f"{what}: {len(batch.failures)} images could not be read ({listed}); "
            "restore them, or rebuild from `salient activations CONFIG` if the dataset changed"
        )


@dataclass
class HostCopies:
    """Device results copied back to the host without waiting on each batch: :meth:`add` starts a
    copy, :meth:`wait` waits once for all of them."""

    device: torch.device
    _events: list = field(default_factory=list)

    def add(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor that will hold ``tensor`` after :meth:`wait`."""
        if tensor.device.type != "cuda":
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events.append(event)
        return host

    def wait(self) -> None:
        for event in self._events:
            event.synchronize()
        self._events.clear()
