"""One worker's model as every model stage runs it (docs/design.md §3, "Data plane").

The model is loaded once, on the worker's device, in channels-last layout with BatchNorm folded
into the convolutions (ResNet-like networks), under ``compute.precision`` (autocast) and, with
``compute.compile``, ``torch.compile`` d with batches padded to ``compute.batch_size`` so that every
call has one static shape. It takes uint8 pixels on the device and scales them to ``[0, 1]``
there. Worker threads that share one model take turns through :attr:`Inference.lock`.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext

import torch

from salient import images, models
from salient.config import ComputeConfig
from salient.errors import ConfigError


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
        forward = net.forward_normalized
        self._forward = torch.compile(forward, mode=compute.compile, dynamic=False) if self.compiled else forward
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

    def _run(self, x: torch.Tensor) -> models.ModelOutput:
        """The forward pass on normalised images ``x``: compiled models get the whole (padded) buffer."""
        n = len(x)
        with torch.inference_mode(), self.autocast():
            out = self._forward(self._input if self.compiled else x)
        if self.compiled and self._input is not None and len(self._input) != n:
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
        if self.compiled:  # the static shape lives in the buffer
            x = self._buffer(x).copy_(x)
        return self._run(x)
