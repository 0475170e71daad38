"""The evaluation charts, drawn with matplotlib (Agg): readable for one pair and for 5,000.

matplotlib is imported inside the function that draws, so importing Salient stays quick; figures
are made without pyplot, so no figure outlives the call.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

COLOURS = {"clean": "#5e5c64", "core": "#1a5fb4", "spurious": "#c01c28"}
_DPI = 100
CHART_SIZE = (1350, 420)  # pixels, width x height: the report sizes the picture's place with it
_DROP_BINS = 40  # over [-1, 1]: 0.05 wide


def _text(value: object) -> str:
    """A user's string as plain matplotlib text ("$" would start mathtext)."""
    return str(value).replace("$", r"\$")


def accuracy_chart(model: str, summary: Sequence[dict], pairs: Sequence[dict], classes: Sequence[dict], sigma: float) -> bytes:
    """One model's evaluation as a PNG of three panels: the mean clean, core and spurious accuracy
    over classes at every sigma (``summary``: its rows of ``evaluation/summary.parquet``); the
    distribution of the per-pair accuracy drops at ``sigma`` by the pair's label (``pairs``: its
    rows of ``evaluation/pairs.parquet``); and each class's core accuracy against its spurious
    accuracy at ``sigma`` (``classes``: its rows of ``evaluation/classes.parquet``). Rows of other
    sigmas in ``pairs`` and ``classes``, and missing values, are left out and counted."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(CHART_SIZE[0] / _DPI, CHART_SIZE[1] / _DPI), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"{_text(model)}: accuracy under Gaussian noise on the masks", fontsize=12)
    means, drops, scatter = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.25, 1]})

    rows = sorted(summary, key=lambda r: r["sigma"])
    sigmas = [r["sigma"] for r in rows]
    names = {"clean": "clean", "core": "core acc (noise on spurious masks)", "spurious": "spurious acc (noise on core masks)"}
    for key, name in names.items():
        values = [np.nan if r.get(f"mean_{key}_acc") is None else r[f"mean_{key}_acc"] for r in rows]
        means.plot(sigmas, values, marker="o", color=COLOURS[key], label=name)
    means.set(xlabel="noise sigma (pixel values in [0, 1])", ylabel="mean accuracy over classes (fraction)",
              ylim=(-0.02, 1.02), title="Mean accuracy per sigma")
    if sigmas:
        means.set_xticks(sigmas, [f"{s:g}" for s in sigmas])
    means.grid(alpha=0.3)
    means.legend(fontsize=8, loc="lower left")

    at_sigma = [r for r in pairs if r["sigma"] == sigma]
    bins = np.linspace(-1, 1, _DROP_BINS + 1)
    missing = 0
    for label in ("core", "spurious"):
        values = [r["drop"] for r in at_sigma if r["label"] == label and r["drop"] is not None]
        missing += sum(1 for r in at_sigma if r["label"] == label and r["drop"] is None)
        if values:
            drops.hist(values, bins=bins, color=COLOURS[label], alpha=0.45, edgecolor=COLOURS[label], linewidth=1,
                       label=f"{label} pairs ({len(values):,})")
    drops.axvline(0, color="#888", linewidth=0.8)
    drops.set(xlabel="accuracy drop, clean - noisy (fraction)", ylabel="pairs", xlim=(-1, 1),
              title=f"Per-pair drop at sigma {sigma:g}" + (f" ({missing:,} pairs without images left out)" if missing else ""))
    if drops.get_legend_handles_labels()[0]:
        drops.legend(fontsize=8, loc="upper left")
    else:
        drops.text(0.5, 0.5, "no pair has scored images", ha="center", va="center", transform=drops.transAxes, color="#666")
    drops.grid(alpha=0.3)

    both = [(r["core_acc"], r["spurious_acc"]) for r in classes
            if r["sigma"] == sigma and r["core_acc"] is not None and r["spurious_acc"] is not None]
    scatter.plot([0, 1], [0, 1], color="#888", linewidth=0.8, linestyle="--", label="equal")
    if both:
        x, y = zip(*both)
        scatter.scatter(x, y, s=14 if len(both) < 200 else 6, alpha=0.8 if len(both) < 200 else 0.4,
                        color=COLOURS["spurious"], edgecolors="none", label=f"classes ({len(both):,})")
    else:
        scatter.text(0.5, 0.5, "no class has both core and spurious pairs", ha="center", va="center",
                     transform=scatter.transAxes, color="#666")
    scatter.set(xlabel="core accuracy (noise on spurious masks)", ylabel="spurious accuracy (noise on core masks)",
                xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title=f"Per class at sigma {sigma:g}")
    scatter.set_aspect("equal", adjustable="box")
    scatter.grid(alpha=0.3)
    scatter.legend(fontsize=8, loc="lower right")

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()
