"""One worker's model as every model stage runs it (docs/design.md §3, "Data plane").

The model is loaded once, on the worker's device, in channels-last layout with BatchNorm folded
into the convolutions (ResNet-like networks), under ``compute.precision`` (autocast) and, with
``compute.compile``, ``torch.compile`` d. It takes uint8 pixels on the device and scales them to
``[0, 1]`` there. Worker threads that share one model take turns through :attr:`Inference.lock`.

Batches are padded to ``compute.batch_size`` when the model is compiled (one static shape) and on
CUDA (``cudnn.benchmark`` tunes once per input shape, and a shard's tail or a partial block would
each be a new one); padding rows cost compute but change no row's result. The CUDA-graph modes of
``torch.compile`` (``reduce-overhead``, ``max-autotune``) replay graphs only on the thread that
recorded them, so there every forward pass runs on one thread of the model's own.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext

import torch

from salient import images, models
from salient.config import ComputeConfig
from salient.errors import ConfigError

# torch.compile modes that record CUDA graphs
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class Inference:
    """A loaded classifier with the worker's precision, layout and compilation settings."""

    def __init__(self, net: models.SalientModel, device: str, compute: ComputeConfig) -> None:
        self.net = net
        self.device = device
        self.precision = compute.precision
        self.batch_size = compute.batch_size
        kind = torch.device(device).type
        if self.precision == "fp16" and kind != "cuda":
            raise ConfigError(["compute.precision = 'fp16' needs a CUDA device; use fp32 (or bf16) on the CPU"])
        if kind == "cuda":
            torch.backends.cudnn.benchmark = True
        self.lock = threading.Lock()
        self.compiled = compute.compile != "none"
        self.pads = self.compiled or kind == "cuda"
        forward = net.forward_normalized
        self._forward = torch.compile(forward, mode=compute.compile, dynamic=False) if self.compiled else forward
        self._graphs_thread = ThreadPoolExecutor(1, thread_name_prefix="model") if compute.compile in CUDA_GRAPH_MODES else None
        # the statistics the checkpoint says its classifier expects (models.normalization_of)
        self.mean = net.mean.detach().to(device).reshape(1, 3, 1, 1)
        self.std = net.std.detach().to(device).reshape(1, 3, 1, 1)
        # normalised = pixels * scale + shift: pixels in [0, 255] (uint8) or in [0, 1] (floats)
        self._affine = {True: (1.0 / (255.0 * self.std), -self.mean / self.std), False: (1.0 / self.std, -self.mean / self.std)}
        self._input: torch.Tensor | None = None

    @classmethod
    def load(
        cls, checkpoint: str, arch: str, format: models.CheckpointFormat, compute: ComputeConfig,
        threads: int | None = None, device: str | None = None, need_discovery: bool = False,
    ) -> Inference:
        """Load a checkpoint for a worker: on ``device`` (default: CUDA when there is one) with
        ``threads`` torch threads."""
        net, device = models.load_for_worker(checkpoint, arch, format, device, threads, need_discovery=need_discovery)
        return cls(net, device, compute)

    def autocast(self) -> AbstractContextManager:
        """The configured precision for forward (and backward) passes."""
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=torch.device(self.device).type, dtype=dtype)

    def unit(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` pixels as ``[0, 1]`` floats on the device, channels-last."""
        return images.to_unit(pixels.to(self.device, non_blocking=True)).contiguous(memory_format=torch.channels_last)

    def _buffer(self, x: torch.Tensor) -> torch.Tensor:
        """The first ``len(x)`` images of the worker's reused input buffer, channels-last (on the CPU
        a fresh buffer per batch costs more than the arithmetic)."""
        shape = (max(len(x), self.batch_size), *x.shape[1:])
        if self._input is None or self._input.shape != shape:
            self._input = torch.zeros(shape, device=self.device).contiguous(memory_format=torch.channels_last)
        return self._input[: len(x)]

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (uint8 pixels or ``[0, 1]`` floats) copied into the input buffer and normalised there.

        The buffer is channels-last, so each image is rows of ``W * 3`` numbers: the per-channel
        scale and shift, repeated along a row, make one vectorised pass over contiguous rows
        (broadcasting them as ``[1, 3, 1, 1]`` is twice as slow on the CPU). Same numbers either way."""
        part = self._buffer(x).copy_(x, non_blocking=True)
        n, _, h, w = part.shape
        scale, shift = self._affine[x.dtype == torch.uint8]
        rows = part.permute(0, 2, 3, 1).view(n * h, w * 3)
        torch.addcmul(shift.flatten().repeat(w), rows, scale.flatten().repeat(w), out=rows)
        return part

    def _forward_pass(self, x: torch.Tensor) -> models.ModelOutput:
        with torch.inference_mode(), self.autocast():
            return self._forward(x)

    def _run(self, x: torch.Tensor) -> models.ModelOutput:
        """The forward pass on normalised images ``x`` (the first rows of the input buffer when
        padding): padded models get the whole buffer."""
        n = len(x)
        if self.pads:
            x = self._input
        if self._graphs_thread is not None:
            out = self._graphs_thread.submit(self._forward_pass, x).result()
        else:
            out = self._forward_pass(x)
        if len(x) != n:
            out = models.ModelOutput(*(None if t is None else t[:n] for t in out))
        return out

    def __call__(self, x: torch.Tensor) -> models.ModelOutput:
        """The model's outputs for uint8 pixels or ``[0, 1]`` images ``[N, 3, H, W]``, on the device.
        With ``compute.compile = reduce-overhead`` (CUDA graphs) the next call overwrites them: use
        or copy them first."""
        return self._run(self._normalised(x))

    def normalized(self, x: torch.Tensor) -> models.ModelOutput:
        """The model's outputs for images already normalised with its :attr:`mean` and :attr:`std`
        (``(x - mean) / std`` of ``[0, 1]`` images), on the device; as :meth:`__call__` otherwise."""
        if self.pads:  # the padded shape lives in the buffer
            x = self._buffer(x).copy_(x)
        return self._run(x)
