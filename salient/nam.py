"""Neural activation maps (NAMs) and the heatmaps shown to people (docs/design.md §2).

A NAM is channel j of the last conv stage (7x7 at 224 px for a ResNet-50) divided by its own
maximum (no min subtraction; an all-zero map stays zero), upsampled bilinearly with half-pixel
centres to the crop size. It is soft, with no threshold, and it is the mask: bright = the feature.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# matplotlib's "jet" as piecewise-linear segments: (x, value) per channel.
_JET = {
    "r": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "g": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "b": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def normalize_maps(maps: Tensor) -> Tensor:
    """Each ``[..., h, w]`` map divided by its own maximum; maps whose maximum is not positive become zero."""
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def upsample(nam: Tensor, size: int | tuple[int, int]) -> Tensor:
    """``[N, h, w]`` maps resized bilinearly (half-pixel centres) to ``size``: ``[N, H, W]``."""
    return F.interpolate(nam[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def low_maps(maps: Tensor, channels: Tensor | list[int]) -> Tensor:
    """The normalised low-resolution maps ``[N, h, w]`` of ``channels[i]`` of ``maps[i]``."""
    idx = torch.as_tensor(channels, device=maps.device)
    return normalize_maps(maps[torch.arange(len(idx), device=maps.device), idx].float())


def nams(maps: Tensor, channels: Tensor | list[int], size: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(normalised low-resolution maps ``[N, h, w]``, masks ``[N, H, W]``) of ``channels[i]`` of ``maps[i]``."""
    low = low_maps(maps, channels)
    return low, upsample(low, size).clamp_(0, 1)


# Masks made at once on the CPU by :func:`masks_uint8`: their float temporaries (0.2 MB each at
# 224 px) stay in cache, where whole batches of them would not.
MASK_CHUNK = 8


def masks_uint8(low: Tensor, size: int | tuple[int, int]) -> Tensor:
    """The stored masks of normalised maps ``[N, h, w]``: uint8 ``round(255 * clip(upsample(low), 0, 1))``,
    ``[N, H, W]`` on ``low``'s device; equal to :func:`to_uint8` of the float masks of :func:`nams`."""
    h, w = (size, size) if isinstance(size, int) else size
    out = torch.empty((len(low), h, w), dtype=torch.uint8, device=low.device)
    step = MASK_CHUNK if low.device.type == "cpu" else max(1, len(low))
    for s in range(0, len(low), step):
        out[s : s + step] = upsample(low[s : s + step], (h, w)).clamp_(0, 1).mul_(255.0).round_()
    return out


def jet(x: np.ndarray) -> np.ndarray:
    """matplotlib's jet colour map of values in [0, 1]: an array with a trailing RGB axis."""
    x = np.clip(x, 0.0, 1.0)
    return np.stack([np.interp(x, *zip(*_JET[c])) for c in "rgb"], axis=-1)


def heatmap(image: np.ndarray, nam: np.ndarray) -> np.ndarray:
    """The NAM's jet colour added to the image (``[H, W, 3]`` in [0, 1]) and divided by its max (red = high)."""
    out = jet(nam) + image
    return out / out.max()


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8 pixels, rounded."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
