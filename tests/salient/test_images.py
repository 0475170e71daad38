import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from salient import images

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_preprocess_matches_torchvision_transforms():
    img = Image.fromarray(RNG.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    expected = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])(img)
    got = images.preprocess(img, 256, 224)
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _save(Image.fromarray(RGB).convert("CMYK"), "JPEG"),
        lambda: _save(Image.fromarray(RGB).convert("L"), "JPEG"),
        lambda: _save(Image.fromarray(RGB).convert("P"), "PNG"),
        lambda: _save(Image.fromarray(RGB).convert("RGBA"), "PNG"),
        lambda: _save(Image.fromarray(RGB).convert("LA"), "PNG"),
        lambda: _save(Image.fromarray(RGB), "PNG"),  # a PNG, whatever its name says
    ],
    ids=["cmyk-jpeg", "grayscale-jpeg", "palette-png", "rgba-png", "la-png", "png-bytes"],
)
def test_odd_modes_decode_to_rgb(make):
    img = images.decode(make())
    assert img.mode == "RGB" and img.size == (40, 30)


def test_16_bit_png_is_scaled_not_clipped():
    arr = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    data = _save(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb = np.asarray(images.decode(data))
    assert rgb[0, :, 0].tolist() == [0, 100, 255]
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is not an image", "UnidentifiedImageError"),
        (_save(Image.fromarray(RGB), "JPEG")[:200], "Truncated"),
    ],
    ids=["zero-bytes", "garbage", "truncated-jpeg"],
)
def test_undecodable_data_raises_a_decode_error(data, reason):
    with pytest.raises(images.DECODE_ERRORS) as err:
        images.decode(data)
    assert reason in images.describe_error(err.value)
