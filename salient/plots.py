"""Small PNG charts for the report, drawn with PIL (no plotting library needed)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageDraw

COLOURS = {"clean": (90, 90, 90), "core": (40, 110, 200), "spurious": (210, 60, 50)}


def accuracy_chart(model: str, summary: Sequence[dict], pairs: Sequence[dict], sigma: float) -> bytes:
    """Left: mean clean / core / spurious accuracy per sigma. Right: every pair's accuracy drop at
    ``sigma``, sorted, coloured by its label (blue core, red spurious)."""
    w, h, pad = 900, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 8), f"{model}: mean accuracy under noise (left), per-pair drop at sigma {sigma:g} (right)", fill="black")
    left, right = (pad, pad, w // 2 - pad // 2, h - pad), (w // 2 + pad // 2, pad, w - pad, h - pad)
    for x0, y0, x1, y1 in (left, right):
        d.line([(x0, y1), (x1, y1)], fill="black")
        d.line([(x0, y0), (x0, y1)], fill="black")
    x0, y0, x1, y1 = left
    groups = sorted(summary, key=lambda r: r["sigma"])
    slot = (x1 - x0) / max(1, len(groups))
    for g, row in enumerate(groups):
        for k, name in enumerate(("clean", "core", "spurious")):
            value = row.get(f"mean_{name}_acc")
            if value is None:
                continue
            bx = x0 + g * slot + 8 + k * (slot - 16) / 3
            d.rectangle([bx, y1 - value * (y1 - y0), bx + (slot - 16) / 3 - 4, y1], fill=COLOURS[name])
        d.text((x0 + g * slot + 8, y1 + 4), f"sigma {row['sigma']:g}", fill="black")
    d.text((x0 + 4, y0 - 14), "1.0", fill="black")
    for k, name in enumerate(("clean", "core", "spurious")):
        lx = w // 2 + k * 110
        d.rectangle([lx, 10, lx + 10, 20], fill=COLOURS[name])
        d.text((lx + 14, 8), f"{name} acc" if name == "clean" else f"{name} acc / {name} pair", fill="black")
    x0, y0, x1, y1 = right
    drops = sorted((r for r in pairs if r["drop"] is not None), key=lambda r: r["drop"], reverse=True)
    if drops:
        top = max(max(abs(r["drop"]) for r in drops), 1e-6)
        zero = (y0 + y1) / 2
        d.line([(x0, zero), (x1, zero)], fill=(160, 160, 160))
        bar = (x1 - x0) / len(drops)
        for i, r in enumerate(drops):
            y = zero - r["drop"] / top * (y1 - y0) / 2
            d.rectangle([x0 + i * bar, min(y, zero), x0 + (i + 1) * bar - 1, max(y, zero)], fill=COLOURS[r["label"]])
        d.text((x0 + 4, y0 - 14), f"max drop {top:.2f}", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
