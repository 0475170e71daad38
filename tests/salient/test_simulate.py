import numpy as np
import pytest

from salient import groundtruth, simulate


def _truth(kind="background"):
    obj = np.zeros((8, 8))
    obj[2:6, 2:6] = 1  # 16 px object in the middle
    cue = np.zeros((8, 8))
    if kind == "background":
        cue[:, :] = 1 - obj
    elif kind == "separate_object":
        cue[0:2, 6:8] = 1  # 4 px corner object
    return groundtruth.ImageTruth(obj, cue, kind, 0)


def test_mass_fractions_by_hand():
    t = _truth("separate_object")
    mask = np.zeros((8, 8))
    mask[2:6, 2:6] = 0.5  # 16 px x 0.5 = 8 on the object
    mask[0:2, 6:8] = 1.0  # 4 on the cue
    mask[7, 0] = 4.0  # 4 on plain background
    mask[7, 7] = 0.4  # below the red threshold: not counted
    assert groundtruth.mass_fractions(mask, groundtruth.regions(t, 0)) == pytest.approx({"object": 0.5, "cue": 0.25, "rest": 0.25})
    assert groundtruth.mass_fractions(np.zeros((8, 8)), groundtruth.regions(t, 0)) == {"object": 0.0, "cue": 0.0, "rest": 1.0}


def test_regions_grow_small_things_by_the_map_resolution():
    t = _truth("separate_object")
    mask = np.zeros((8, 8))
    mask[2, 7] = 1.0  # one pixel below the corner object
    assert groundtruth.mass_fractions(mask, groundtruth.regions(t, 0))["rest"] == 1.0
    assert groundtruth.mass_fractions(mask, groundtruth.regions(t, 1))["cue"] == 1.0
    obj, cue, rest = groundtruth.regions(t, 1)
    np.testing.assert_allclose(obj + cue + rest, 1.0)
    assert obj[1, 1] == 1 and cue[1, 5] == 0, "the object wins where both grow"


@pytest.mark.parametrize(
    "shares, kind, expected",
    [
        ({"object": 0.6, "cue": 0.3, "rest": 0.1}, "background", "main_object"),
        ({"object": 0.3, "cue": 0.4, "rest": 0.3}, "background", "background"),
        ({"object": 0.4, "cue": 0.45, "rest": 0.15}, "separate_object", "separate_object"),
        ({"object": 0.3, "cue": 0.2, "rest": 0.5}, "separate_object", "background"),
        ({"object": 0.2, "cue": 0.0, "rest": 0.8}, "none", "background"),
    ],
)
def test_true_answer_names_the_region_with_most_mass(shares, kind, expected):
    assert simulate.true_answer(shares, kind)[0] == expected


def test_crop_mask_follows_the_image_preprocessing():
    import io

    from PIL import Image

    m = np.zeros((40, 60), np.uint8)
    m[:, :6] = 255  # left strip, cut away by a centre crop
    m[10:30, 25:35] = 255
    buf = io.BytesIO()
    Image.fromarray(m).save(buf, format="PNG")
    out = groundtruth.crop_mask(buf.getvalue(), 20, 20)  # 40x60 -> 20x30 -> centre 20x20
    assert out.shape == (20, 20)
    assert out[:, 0].max() < 0.01, "the left strip is outside the crop"
    assert out[10, 10] > 0.99 and out[0, 10] < 0.01
