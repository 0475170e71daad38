import numpy as np
import pytest
import torch

from salient import nam


def _bilinear_half_pixel(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Reference resize: output pixel centres mapped back with half-pixel offsets, clamped at the edges."""
    h, w = img.shape
    out = np.zeros((out_h, out_w))
    for y in range(out_h):
        sy = min(max((y + 0.5) * h / out_h - 0.5, 0.0), h - 1)
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - np.floor(sy)
        for x in range(out_w):
            sx = min(max((x + 0.5) * w / out_w - 0.5, 0.0), w - 1)
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - np.floor(sx)
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bottom * fy
    return out


def test_nams_are_channel_over_max_upsampled_with_half_pixel_centres():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 8, 7, 7, generator=g) * 5
    maps[2, 6] = 0  # an all-zero map stays zero
    low, masks = nam.nams(maps, [1, 4, 6], 32)
    for i, j in enumerate([1, 4, 6]):
        m = maps[i, j].numpy().astype(np.float64)
        expected_low = m / m.max() if m.max() > 0 else np.zeros_like(m)
        np.testing.assert_allclose(low[i].numpy(), expected_low, atol=1e-6)
        np.testing.assert_allclose(masks[i].numpy(), _bilinear_half_pixel(expected_low, 32, 32), atol=1e-5)
    assert masks[2].abs().max() == 0
    assert masks.shape == (3, 32, 32) and float(masks.max()) <= 1.0


def test_no_min_subtraction():
    maps = torch.full((1, 1, 2, 2), 2.0)
    maps[0, 0, 0, 0] = 4.0
    low, _ = nam.nams(maps, [0], 2)
    assert low[0].tolist() == [[1.0, 0.5], [0.5, 0.5]]


@pytest.mark.parametrize(
    "x, rgb",
    [(0.0, (0, 0, 0.5)), (1.0, (0.5, 0, 0)), (0.5, (0.15 / 0.31, 1, 1 - 0.16 / 0.31)), (0.66, (1, 1 - 0.02 / 0.27, 0)), (0.11, (0, 0, 1))],
)
def test_jet_matches_matplotlib_anchor_values(x, rgb):
    np.testing.assert_allclose(nam.jet(np.array(x)), rgb, atol=1e-6)


def test_heatmap_is_jet_plus_image_over_its_max():
    image = np.zeros((2, 2, 3))
    image[1, 1] = (0.2, 0.4, 0.6)
    mask = np.array([[1.0, 0.0], [0.5, 0.0]])
    out = nam.heatmap(image, mask)
    raw = np.array([[[0.5, 0, 0], [0, 0, 0.5]], [[0.15 / 0.31, 1, 1 - 0.16 / 0.31], [0.2, 0.4, 1.1]]])
    np.testing.assert_allclose(out, raw / raw.max(), atol=1e-6)
    assert out[0, 0].argmax() == 0, "high NAM is red"


@pytest.mark.parametrize("n", [1, nam.MASK_CHUNK, nam.MASK_CHUNK + 1, 3 * nam.MASK_CHUNK + 5])
def test_stored_masks_are_the_rounded_float_masks_whatever_their_number(n):
    g = torch.Generator().manual_seed(n)
    maps = torch.rand(n, 4, 7, 7, generator=g) * 3
    channels = torch.randint(0, 4, (n,), generator=g)
    low, floats = nam.nams(maps, channels, 40)
    stored = nam.masks_uint8(low, 40)
    assert stored.dtype == torch.uint8 and stored.shape == (n, 40, 40)
    assert np.array_equal(stored.numpy(), nam.to_uint8(floats.numpy())), "the same numbers as the float masks, rounded"
    for i in range(n):  # and within one level of a hand-written bilinear resize of the normalised map
        expected = np.rint(255 * np.clip(_bilinear_half_pixel(low[i].numpy().astype(np.float64), 40, 40), 0, 1))
        assert np.abs(stored[i].numpy().astype(int) - expected).max() <= 1
