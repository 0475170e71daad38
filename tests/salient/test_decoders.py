"""Each fast decoder against the reference (PIL) on real photographs and on odd images: how far
the pixels and a ResNet's features move, and which images fall back to PIL.

The photographs are the sample images scikit-image ships (a dev dependency): its JPEGs as they
are, its PNG photographs encoded as JPEG (baseline and progressive). Run with ``-s`` to print the
figures quoted in docs/configuration.md.
"""

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from salient import images, models
from salient.config import PreprocessConfig
from salient.stream import ImageStream

RESIZE, CROP = 256, 224
PHOTO_JPEGS = ("rocket.jpg", "retina.jpg", "hubble_deep_field.jpg")
PHOTO_PNGS = ("chelsea.png", "coffee.png", "astronaut.png", "motorcycle_left.png", "grass.png", "brick.png")


def skimage_data() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("scikit-image (a dev dependency) is not installed: run `make install`")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def jpeg(img: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **options)
    return buf.getvalue()


def photographs() -> dict[str, bytes]:
    data = skimage_data()
    out = {name: (data / name).read_bytes() for name in PHOTO_JPEGS}
    for name in PHOTO_PNGS:
        img = Image.open(data / name).convert("RGB")
        out[f"{name} as JPEG q90"] = jpeg(img, quality=90)
        out[f"{name} as progressive JPEG q75"] = jpeg(img, quality=75, progressive=True)
    return out


def reference(data: bytes) -> torch.Tensor:
    """torchvision's documented ImageNet preprocessing of a PIL image, as uint8 ``[3, 224, 224]``."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    img = TF.center_crop(TF.resize(img, RESIZE, interpolation=InterpolationMode.BILINEAR, antialias=True), [CROP, CROP])
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def test_pil_is_bit_identical_to_the_reference_preprocessing():
    for name, data in photographs().items():
        pixels, _, fell_back = images.read_pixels(data, RESIZE, CROP)
        assert torch.equal(pixels, reference(data)), name
        assert not fell_back


def test_torchvision_decoder_stays_within_2_percent_of_pil_features_on_real_photographs():
    photos = photographs()
    torch.manual_seed(0)
    net = models.SalientModel(torchvision.models.resnet18(), "resnet18")
    pil = torch.stack([images.read_pixels(d, RESIZE, CROP)[0] for d in photos.values()])
    fast = [images.read_pixels(d, RESIZE, CROP, decoder="torchvision") for d in photos.values()]
    assert not any(fell_back for _, _, fell_back in fast), "every photograph is an RGB JPEG"
    tv = torch.stack([p for p, _, _ in fast])
    with torch.inference_mode():
        ref, out = net(images.to_unit(pil)), net(images.to_unit(tv))
    diff = (pil.int() - tv.int()).abs()
    rel_l2 = ((out.features - ref.features).norm(dim=1) / ref.features.norm(dim=1)).tolist()
    agree = (out.logits.argmax(1) == ref.logits.argmax(1)).float().mean().item()
    print(f"\ntorchvision vs pil on {len(photos)} photographs at {RESIZE}/{CROP}:")
    for name, d, r in zip(photos, diff, rel_l2):
        print(f"  {name:<40} max |pixel diff| {int(d.max()):>3}  mean {d.float().mean():.3f}  feature rel L2 {r:.4f}")
    print(f"  top-1 agreement {agree:.3f}; worst feature rel L2 {max(rel_l2):.4f}; worst pixel diff {int(diff.max())}")
    assert max(rel_l2) < 0.02
    assert int(diff.max()) <= 2, "the two resamplers round differently, by a level or two at most"
    assert diff.float().mean() < 0.5


def odd_images() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    sixteen = io.BytesIO()
    Image.fromarray((rng.integers(0, 65536, (64, 80))).astype(np.uint16)).save(sixteen, format="PNG")
    return {
        "cmyk.jpg": jpeg(rgb.convert("CMYK")),
        "grey.jpg": jpeg(rgb.convert("L")),
        "rgb.png": png.getvalue(),
        "16bit.png": sixteen.getvalue(),
        "progressive.jpg": jpeg(rgb, progressive=True),
        "subsampling-444.jpg": jpeg(rgb, subsampling=0, quality=95),
    }


def test_images_a_fast_decoder_cannot_read_fall_back_to_pil_and_are_counted(tmp_path):
    odd = odd_images()
    for name, data in odd.items():
        (tmp_path / name).write_bytes(data)
    stream = ImageStream(str(tmp_path), PreprocessConfig(resize=RESIZE, crop=CROP, decoder="torchvision"), "cpu", batch_size=4, threads=2)
    try:
        feed = stream.open(list(odd))
        got = {}
        for batch in feed:
            assert not batch.failures
            got.update({list(odd)[p]: px for p, px in zip(batch.positions, batch.pixels)})
    finally:
        stream.close()
    falls_back = {"cmyk.jpg", "grey.jpg", "rgb.png", "16bit.png"}
    assert feed.stats.fallbacks == len(falls_back)
    for name, data in odd.items():
        pil = images.read_pixels(data, RESIZE, CROP)[0]
        if name in falls_back:
            assert torch.equal(got[name], pil), f"{name} is read by PIL"
        else:
            assert (got[name].int() - pil.int()).abs().max() <= 2, name
