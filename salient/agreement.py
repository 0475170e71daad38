"""Agreement between annotators: Fleiss' kappa (Fleiss 1971, "Measuring nominal scale agreement
among many raters").

For N subjects and k categories, ``counts[i][j]`` is the number of raters who put subject i in
category j, and n_i = sum_j counts[i][j] is the number of raters of subject i:

- P_i = (sum_j counts[i][j]^2 - n_i) / (n_i (n_i - 1)): the share of agreeing rater pairs on subject i;
- P = the mean of P_i;
- p_j = sum_i counts[i][j] / sum_i n_i: the share of all ratings in category j; P_e = sum_j p_j^2;
- kappa = (P - P_e) / (1 - P_e).

With the same number of raters for every subject this is Fleiss' statistic exactly; subjects may
also have different numbers of raters (each at least 2), with P_i and p_j taken as above.
"""

from __future__ import annotations

from collections.abc import Sequence


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa of a subjects x categories table of rating counts.

    None when it is undefined: no subjects, or every rating in one category (P_e = 1). Raises
    ``ValueError`` for negative counts, rows of different lengths, or a subject with fewer than 2 raters.
    """
    if not counts:
        return None
    width = len(counts[0])
    totals = [0] * width
    raters = 0
    agreement = 0.0
    for i, row in enumerate(counts):
        if len(row) != width:
            raise ValueError(f"subject {i} has {len(row)} categories, subject 0 has {width}: give every subject the same categories")
        if any(c < 0 for c in row):
            raise ValueError(f"subject {i} has a negative count {list(row)}")
        n = sum(row)
        if n < 2:
            raise ValueError(f"subject {i} has {n} rating(s); agreement needs at least 2 raters per subject")
        agreement += (sum(c * c for c in row) - n) / (n * (n - 1))
        raters += n
        for j, c in enumerate(row):
            totals[j] += c
    p_bar = agreement / len(counts)
    p_e = sum((t / raters) ** 2 for t in totals)
    if p_e >= 1.0:
        return None
    return (p_bar - p_e) / (1.0 - p_e)
