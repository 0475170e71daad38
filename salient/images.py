"""Decoding and preprocessing, with PIL semantics (docs/design.md §2).

``Resize(resize)`` on the shorter side (bilinear, antialiased as PIL does) -> ``CenterCrop(crop)``
-> ``[0, 1]`` RGB float tensor. EXIF orientation is not applied: images are used as stored, and
the orientation tag is reported beside the pixels. An image with more pixels than ``max_pixels``,
as stored or once resized, is refused from its header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode

from salient.config import MAX_PIXELS
from salient.errors import InputError

# Exceptions that mean "this file is not a usable image"; anything else is a bug and propagates.
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)

EXIF_ORIENTATION = 0x0112

# torchvision 0.29 announces that its image codecs will move to another package; the pinned
# release has them, and the warning would be printed once per decode thread.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning)


class TooManyPixels(InputError):
    """An image refused before decoding: too many pixels as stored or once resized."""


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB. 16-bit and 32-bit greyscale are scaled to 8 bits rather than clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N") or (img.mode == "I" and np.asarray(img).max() > 255):
        arr = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag of ``img``: 1..8 as stored, 1 when absent, 0 when unreadable or
    not one of 1..8."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 -- a corrupt EXIF block is odd metadata, not an unusable image
        return 0
    return value if type(value) is int and 1 <= value <= 8 else 0


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) after ``Resize(resize)`` on the shorter side, as torchvision computes it."""
    short, long = min(width, height), max(width, height)
    new_long = int(resize * long / short)
    return (resize, new_long) if width <= height else (new_long, resize)


def open_header(data: bytes, max_pixels: int, resize: int | None) -> Image.Image:
    """The image with only its header read, refused if it has, or would have once resized, more than
    ``max_pixels`` pixels."""
    if not data:
        raise InputError("empty file (0 bytes)")
    limit = f"preprocess.max_pixels = {max_pixels:,}"
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(f"{str(exc).rstrip('.')}; refused before decoding ({limit})") from None
    width, height = img.size
    problem = None
    if width * height > max_pixels:
        problem = f"{width}x{height} = {width * height:,} pixels, over {limit}"
    elif resize is not None:
        w, h = resized_size(width, height, resize)
        if w * h > max_pixels:
            problem = f"{width}x{height} would be {w}x{h} = {w * h:,} pixels once resized to {resize} on its shorter side, over {limit}"
    if problem is not None:
        img.close()
        raise TooManyPixels(f"{problem}; refused before decoding (the limit can be raised up to {MAX_PIXELS:,})")
    return img


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode image bytes (any format PIL reads, whatever the file name says) to RGB.

    Raises one of :data:`DECODE_ERRORS` for empty, truncated, undecodable or oversized data.
    """
    with open_header(data, max_pixels, None) as img:
        img.load()
        return to_rgb(img)


def preprocess_uint8(img: Image.Image, resize: int, crop: int) -> torch.Tensor:
    """``Resize(resize)`` -> ``CenterCrop(crop)`` of an RGB image -> a ``[3, crop, crop]`` uint8 tensor."""
    img = TF.resize(img, resize, interpolation=InterpolationMode.BILINEAR, antialias=True)
    img = TF.center_crop(img, [crop, crop])
    return TF.pil_to_tensor(img)


def preprocess(img: Image.Image, resize: int, crop: int) -> torch.Tensor:
    """``Resize(resize)`` -> ``CenterCrop(crop)`` -> a ``[3, crop, crop]`` float tensor in ``[0, 1]``."""
    return to_unit(preprocess_uint8(img, resize, crop))


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in ``[0, 1]``, on their own device."""
    return pixels.float().div_(255.0)


def read_image(data: bytes, resize: int, crop: int, max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, int]:
    """Decode and preprocess image bytes, as stored; returns the tensor and the EXIF orientation
    (see :func:`orientation`). Raises one of :data:`DECODE_ERRORS` for an unusable image."""
    pixels, orient, _ = read_pixels(data, resize, crop, max_pixels)
    return to_unit(pixels), orient


def read_pixels(
    data: bytes, resize: int, crop: int, max_pixels: int = MAX_PIXELS, decoder: str = "pil"
) -> tuple[torch.Tensor, int, bool]:
    """Decode and preprocess image bytes to uint8 ``[3, crop, crop]``; returns the pixels, the EXIF
    orientation and whether ``decoder`` could not read the image and PIL did instead.

    ``pil`` is the reference. ``torchvision`` decodes 8-bit RGB JPEGs with libjpeg-turbo
    (``torchvision.io.decode_jpeg``) and resizes the uint8 tensor with torch's antialiased bilinear
    kernel; everything else (PNG, greyscale, CMYK, 16-bit, other formats) is read by ``pil``.
    ``nvjpeg`` decodes on the GPU in :mod:`salient.stream`; here it reads like ``pil``. Raises one of
    :data:`DECODE_ERRORS` for an unusable image.
    """
    with open_header(data, max_pixels, resize) as img:
        orient = orientation(img)
        if decoder == "torchvision" and fast_decodable(img):
            try:
                return resize_crop(decode_jpeg_cpu(data), resize, crop), orient, False
            except RuntimeError:
                pass  # libjpeg-turbo refused what PIL's header reader accepted: PIL decides
        img.load()
        return preprocess_uint8(to_rgb(img), resize, crop), orient, decoder != "pil"


def fast_decodable(img: Image.Image) -> bool:
    """Whether a fast JPEG decoder reads ``img`` (its header only read) as PIL does: an 8-bit RGB JPEG."""
    return img.format == "JPEG" and img.mode == "RGB"


def jpeg_complete(data: bytes) -> bool:
    """Whether a JPEG's bytes reach an end-of-image marker after its first scan: a file cut short
    has none, and a GPU decoder may return its pixels where PIL refuses it as truncated."""
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: entropy-coded data follows, in which FF D9 cannot occur
            return data.find(b"\xff\xd9", pos + 2) != -1
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


def decode_jpeg_cpu(data: bytes) -> torch.Tensor:
    """An RGB JPEG decoded by libjpeg-turbo (``torchvision.io``): uint8 ``[3, H, W]``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def resize_crop(pixels: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """``Resize(resize)`` (bilinear, antialiased) -> ``CenterCrop(crop)`` of uint8 ``[3, H, W]``
    pixels on any device; uint8 out."""
    if pixels.device.type == "cpu":
        out = TF.resize(pixels, resize, interpolation=InterpolationMode.BILINEAR, antialias=True)
    else:  # torch's antialiased kernels take floats on the GPU
        out = TF.resize(pixels.float(), resize, interpolation=InterpolationMode.BILINEAR, antialias=True)
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return TF.center_crop(out, [crop, crop])


def load_image(data: bytes, resize: int, crop: int, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Decode and preprocess image bytes, as stored: ``[3, crop, crop]`` floats in ``[0, 1]``."""
    return read_image(data, resize, crop, max_pixels)[0]


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a failed image, for failure lists."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
