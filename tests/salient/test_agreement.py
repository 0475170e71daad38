import pytest

from salient.agreement import fleiss_kappa

# The worked example of Fleiss' kappa on Wikipedia: 10 subjects, 14 raters, 5 categories;
# P = 0.378, P_e = 0.213, kappa = 0.210.
WIKIPEDIA = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def test_wikipedia_worked_example():
    assert fleiss_kappa(WIKIPEDIA) == pytest.approx(0.210, abs=5e-4)


def test_different_numbers_of_raters_by_hand():
    # Subject 1: 2 raters agree, P_1 = (4 - 2) / (2 * 1) = 1. Subject 2: 3 raters split 1/2,
    # P_2 = (1 + 4 - 3) / (3 * 2) = 1/3. P = 2/3. p = (3/5, 2/5), P_e = 13/25.
    # kappa = (2/3 - 13/25) / (12/25) = 11/36.
    assert fleiss_kappa([[2, 0], [1, 2]]) == pytest.approx(11 / 36, abs=1e-12)


def test_perfect_and_chance_agreement():
    assert fleiss_kappa([[5, 0, 0], [0, 5, 0], [0, 0, 5]]) == pytest.approx(1.0)
    # Every subject split the same way: agreement is what the shares predict, minus a little
    # (P = (9 + 4 - 5) / 20 = 0.4, P_e = 0.36 + 0.16 = 0.52, kappa = -0.25).
    assert fleiss_kappa([[3, 2], [3, 2]]) == pytest.approx(-0.25)


def test_undefined_and_bad_tables():
    assert fleiss_kappa([]) is None
    assert fleiss_kappa([[5, 0, 0], [5, 0, 0]]) is None, "every rating in one category: kappa is undefined"
    with pytest.raises(ValueError, match="at least 2 raters"):
        fleiss_kappa([[1, 0], [2, 0]])
    with pytest.raises(ValueError, match="same categories"):
        fleiss_kappa([[1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="negative"):
        fleiss_kappa([[3, -1]])
