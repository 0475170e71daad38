"""Decoding and preprocessing, with PIL semantics (design.md §2).

``Resize(resize)`` on the shorter side (bilinear, antialiased as PIL does) -> ``CenterCrop(crop)``
-> ``[0, 1]`` RGB float tensor. EXIF orientation is not applied: images are used as stored.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode

# Exceptions that mean "this file is not a usable image"; anything else is a bug and propagates.
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB. 16-bit and 32-bit greyscale are scaled to 8 bits rather than clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N") or (img.mode == "I" and np.asarray(img).max() > 255):
        arr = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(data: bytes) -> Image.Image:
    """Decode image bytes (any format PIL reads, whatever the file name says) to RGB.

    Raises one of :data:`DECODE_ERRORS` for empty, truncated or undecodable data.
    """
    if not data:
        raise ValueError("empty file (0 bytes)")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_rgb(img)


def preprocess(img: Image.Image, resize: int, crop: int) -> torch.Tensor:
    """``Resize(resize)`` -> ``CenterCrop(crop)`` -> a ``[3, crop, crop]`` float tensor in ``[0, 1]``."""
    img = TF.resize(img, resize, interpolation=InterpolationMode.BILINEAR, antialias=True)
    img = TF.center_crop(img, [crop, crop])
    return TF.pil_to_tensor(img).float().div_(255.0)


def load_image(data: bytes, resize: int, crop: int) -> torch.Tensor:
    """Decode and preprocess image bytes."""
    return preprocess(decode(data), resize, crop)


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a failed image, for failure lists."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
