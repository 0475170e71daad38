"""Draws docs/pipeline.svg: the Salient pipeline and where Prefect, Ray and object storage sit.

    python docs/pipeline.py            # writes docs/pipeline.svg beside this script
    python docs/pipeline.py OUT.svg    # writes OUT.svg instead

Standard library only. Boxes and arrows are laid out by hand; text uses the generic sans-serif and
monospace families (no font files). Before writing, the script checks its own layout: every text
fits inside its box and no text touches another text or a line, measured with DejaVu Sans widths
(wider than Helvetica or Arial, so the check is conservative). The same script writes the same
bytes on every run.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 1100, 736
SANS = "DejaVu Sans, Helvetica, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
MONO_SCALE = 0.92  # monospace is set a little smaller than the text around it

# Advance widths of DejaVu Sans, in em.
_SANS_EM = {
    **dict.fromkeys("abdghnopqu", 0.635), "c": 0.55, "e": 0.615, "f": 0.352, "i": 0.278, "j": 0.278, "k": 0.579,
    "l": 0.278, "m": 0.974, "r": 0.411, "s": 0.521, "t": 0.392, "v": 0.592, "w": 0.818, "x": 0.592, "y": 0.592,
    "z": 0.525, **dict.fromkeys("0123456789", 0.636), " ": 0.318, ".": 0.318, ",": 0.318, ":": 0.337, ";": 0.337,
    "(": 0.39, ")": 0.39, "[": 0.39, "]": 0.39, "{": 0.636, "}": 0.636, "/": 0.337, "-": 0.361, "_": 0.5,
    "<": 0.838, ">": 0.838, "=": 0.838, "+": 0.838, "*": 0.5, "'": 0.275, '"': 0.46, "|": 0.337, "·": 0.318,
    "≥": 0.838, "≤": 0.838, "→": 0.838, "…": 1.0, "@": 1.0, "#": 0.838, "&": 0.78, "?": 0.531, "%": 0.95,
    "A": 0.684, "B": 0.686, "C": 0.698, "D": 0.77, "E": 0.632, "F": 0.575, "G": 0.775, "H": 0.752, "I": 0.295,
    "J": 0.295, "K": 0.656, "L": 0.557, "M": 0.863, "N": 0.748, "O": 0.787, "P": 0.603, "Q": 0.787, "R": 0.695,
    "S": 0.635, "T": 0.611, "U": 0.732, "V": 0.684, "W": 0.989, "X": 0.685, "Y": 0.611, "Z": 0.685,
}


def text_width(text: str, size: float, mono: bool = False, bold: bool = False) -> float:
    """The rendered width of ``text`` in pixels (DejaVu metrics; unknown characters count as wide)."""
    if mono:
        return len(text) * 0.602 * size
    em = sum(_SANS_EM.get(ch, 1.0) for ch in text)
    return em * size * (1.1 if bold else 1.0)


@dataclass(frozen=True)
class Run:
    """A piece of one text line with its own style."""

    text: str
    bold: bool = False
    mono: bool = False


@dataclass
class Drawing:
    parts: list[str] = field(default_factory=list)
    texts: list[tuple[str, tuple[float, float, float, float], tuple[float, float, float, float] | None]] = field(default_factory=list)
    lines: list[tuple[float, float, float, float]] = field(default_factory=list)

    # ---- primitives ------------------------------------------------------------------------

    def rect(self, x: float, y: float, w: float, h: float, fill: str, stroke: str, dashed: bool = False, rx: int = 8) -> None:
        dash = ' stroke-dasharray="7 5"' if dashed else ""
        self.parts.append(
            f'<rect x="{x:g}" y="{y:g}" width="{w:g}" height="{h:g}" rx="{rx}" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="1.5"{dash}/>'
        )

    def text(self, x: float, y: float, runs: list[Run] | str, size: float = 12, color: str = "#1f2933",
             within: tuple[float, float, float, float] | None = None, anchor: str = "start") -> float:
        """One line of text with its baseline at ``y``; ``within`` is the box it must fit in. Returns its width."""
        if isinstance(runs, str):
            runs = [Run(runs)]
        width = sum(text_width(r.text, size * (MONO_SCALE if r.mono else 1), r.mono, r.bold) for r in runs)
        left = x - width / 2 if anchor == "middle" else x
        self.texts.append(("".join(r.text for r in runs), (left, y - 0.8 * size, width, size * 1.05), within))
        spans = []
        for r in runs:
            attrs = ""
            if r.bold:
                attrs += ' font-weight="bold"'
            if r.mono:
                attrs += f' font-family="{MONO}" font-size="{size * MONO_SCALE:g}"'
            spans.append(f"<tspan{attrs}>{escape(r.text)}</tspan>")
        anchor_attr = ' text-anchor="middle"' if anchor == "middle" else ""
        self.parts.append(
            f'<text x="{x:g}" y="{y:g}" font-size="{size:g}" fill="{color}"{anchor_attr} xml:space="preserve">{"".join(spans)}</text>'
        )
        return width

    def arrow(self, x1: float, y1: float, x2: float, y2: float, color: str = "#3e4c59", both: bool = False,
              dashed: bool = False, marker: str = "arrow") -> None:
        """A straight, horizontal or vertical arrow from (x1, y1) to (x2, y2)."""
        start = f' marker-start="url(#{marker}-start)"' if both else ""
        dash = ' stroke-dasharray="5 4"' if dashed else ""
        self.parts.append(
            f'<line x1="{x1:g}" y1="{y1:g}" x2="{x2:g}" y2="{y2:g}" stroke="{color}" stroke-width="1.8"{dash}'
            f'{start} marker-end="url(#{marker})"/>'
        )
        self.lines.append((min(x1, x2) - 2, min(y1, y2), abs(x2 - x1) + 4, abs(y2 - y1)))

    def box(self, x: float, y: float, w: float, h: float, title: list[Run] | str, lines: list[list[Run] | str],
            fill: str, stroke: str, title_size: float = 15, size: float = 12, gap: float = 17) -> None:
        """A box with a bold title and lines under it; strings ending in '/' or holding '.' in a file
        name are set in monospace by the caller with Run(..., mono=True)."""
        self.rect(x, y, w, h, fill, stroke)
        inner = (x + 1, y + 1, w - 2, h - 2)
        if isinstance(title, str):
            title = [Run(title)]
        title = [Run(r.text, bold=True, mono=r.mono) for r in title]
        self.text(x + 10, y + 24, title, title_size, within=inner)
        for i, line in enumerate(lines):
            runs = [Run(line)] if isinstance(line, str) else line
            self.text(x + 10, y + 24 + (i + 1) * gap + 4, runs, size, within=inner)

    # ---- checks and output -----------------------------------------------------------------

    def check(self) -> None:
        """Every text inside its box and the canvas; no text touching another text or a line."""
        problems = []

        def overlap(a, b) -> bool:
            return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]

        for name, (x, y, w, h), within in self.texts:
            bx, by, bw, bh = within or (8, 8, WIDTH - 16, HEIGHT - 16)
            if x < bx + 6 or x + w > bx + bw - 6 or y < by or y + h > by + bh:
                problems.append(f"text {name!r} does not fit in its box")
        for i, (a_name, a, _) in enumerate(self.texts):
            for b_name, b, _ in self.texts[i + 1:]:
                if overlap(a, b):
                    problems.append(f"texts {a_name!r} and {b_name!r} overlap")
            for line in self.lines:
                if overlap(a, line):
                    problems.append(f"text {a_name!r} touches a line")
        if problems:
            raise SystemExit("pipeline.py: layout problems:\n  " + "\n  ".join(problems))

    def svg(self) -> str:
        self.check()
        defs = []
        for name, color in (("arrow", "#3e4c59"), ("ray", "#b3611b"), ("store", "#2f7a33"), ("people", "#7b4fa0")):
            defs.append(
                f'<marker id="{name}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
                f'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{color}"/></marker>'
            )
            defs.append(
                f'<marker id="{name}-start" viewBox="0 0 10 10" refX="1" refY="5" markerWidth="7" markerHeight="7" '
                f'orient="auto"><path d="M10,0 L0,5 L10,10 z" fill="{color}"/></marker>'
            )
        return "\n".join([
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'font-family="{SANS}" role="img" aria-labelledby="title">',
            "<title id=\"title\">Salient pipeline: images, activations, top images, human labels, masks, evaluation; "
            "Prefect orchestrates, Ray computes, object storage holds versioned builds</title>",
            "<defs>", *defs, "</defs>",
            f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
            *self.parts,
            "</svg>",
            "",
        ])


# Colours: Prefect blue, Ray orange, storage green, people purple.
PREFECT = ("#eef3fb", "#4a6fa5")
STAGE = ("#ffffff", "#4a6fa5")
RAY = ("#fff4e6", "#d9822b")
ACTOR = ("#ffffff", "#d9822b")
STORE = ("#eef8ee", "#3c8d40")
STORE_BOX = ("#ffffff", "#3c8d40")
PEOPLE = ("#f5effa", "#7b4fa0")


def M(text: str) -> Run:
    return Run(text, mono=True)


def draw() -> Drawing:
    d = Drawing()
    d.text(20, 34, [Run("Salient", bold=True), Run(": from images to a published, versioned dataset")], 20)

    # ---- Prefect: the stages of one flow run ---------------------------------------------------
    frame = (20, 50, 1060, 208)
    d.rect(*frame, *PREFECT, dashed=True, rx=10)
    d.text(36, 75, [Run("Prefect", bold=True), Run(" orchestrates the coarse stages: one flow run per command")], 14, within=frame)
    d.text(36, 95, [M("salient run CONFIG"), Run(" runs them all, writes "), M("manifest.json"), Run(" and moves "),
                    M("latest"), Run("; "), M("salient <stage> CONFIG"), Run(" runs one")], 12, within=frame)

    stage_w, stage_h, stage_y = 150, 132, 110
    xs = [39 + i * 175 for i in range(6)]
    stages = [
        ("images", ["ImageFolder listing of", [M("dataset.root")], [M("<root>/<wnid>/<file>")], "cut into shards",
                    [M("plan.parquet")]]),
        ("activations", ["robust ResNet-50:", "2048 penultimate", "values per image", [M("activations/")],
                         [M("part-NNNNN.parquet")]]),
        ("top images", ["importance w·mean r", "top 5 features / class", "top K images / pair", [M("pairs.parquet")],
                        [M("topk/class.parquet")]]),
        ("human labels", ["heatmaps, attacks;", "5 answers per pair;", "≥ 3 off the object:", "spurious, else core",
                          [M("labels.parquet")]]),
        ("masks", ["the NAM of each", "top-K image is its", "soft mask", [M("masks/masks.zarr")],
                   [M("masks/index.parquet")]]),
        ("evaluation", ["noise on core or", "spurious regions:", "accuracy of models", [M("evaluation/")],
                        [M("report/index.html")]]),
    ]
    for x, (title, lines) in zip(xs, stages):
        d.box(x, stage_y, stage_w, stage_h, title, lines, *STAGE)
    mid = stage_y + stage_h / 2
    for a, b in zip(xs, xs[1:]):
        d.arrow(a + stage_w + 2, mid, b - 2, mid)

    # ---- Ray: the actor pool the stages fan out to ----------------------------------------------
    band = (20, 300, 1060, 122)
    d.rect(*band, *RAY, rx=10)
    d.text(36, 324, [Run("Ray", bold=True), Run(": one actor per GPU, the model loaded once")], 14, within=band)
    d.text(36, 344, "decoding overlaps inference; workers write their own outputs", 12, within=band)
    actor_y, actor_h = 360, 40
    for x, w, label in ((36, 112, "actor · GPU 0"), (158, 112, "actor · GPU 1"), (280, 112, "actor · GPU 2"),
                        (402, 48, "…"), (460, 112, "actor · GPU N")):
        d.rect(x, actor_y, w, actor_h, *ACTOR, rx=6)
        d.text(x + w / 2, actor_y + 25, label, 12, within=(x, actor_y, w, actor_h), anchor="middle")
    notes = (716, 306, 356, 112)
    for i, line in enumerate([
        [Run("work items", bold=True), Run(": shards of images")],
        [Run("(≤ "), M("compute.shard_size"), Run(", one class);")],
        "aggregation: one Ray task per shard;",
        "discover, generalize, evaluate:",
        "blocks on the same actor pool",
    ]):
        d.text(724, 326 + i * 19, line, 12, within=notes)
    d.text(36, 284, "tasks call Ray; summaries return", 12)
    for x in xs[1:]:
        cx = x + stage_w / 2
        if x == xs[3]:
            cx -= 30  # leave room for the answers' arrow on the right of this box
        d.arrow(cx, stage_y + stage_h + 2, cx, band[1] - 2, color="#b3611b", both=True, dashed=True, marker="ray")

    # ---- object storage: OUT ------------------------------------------------------------------
    store = (20, 462, 1060, 176)
    d.rect(*store, *STORE, rx=10)
    for x in (92, 214):
        d.arrow(x, actor_y + actor_h + 2, x, store[1] - 2, color="#2f7a33", marker="store")
    d.text(230, 446, "shards and mask blocks, each committed by a marker written last", 12)
    d.text(36, 486, [Run("Object storage", bold=True), Run(" via fsspec: "), M("file://"), Run(", "), M("s3://"),
                     Run(", "), M("gs://"), Run("; OUT is the config's "), M("output")], 14, within=store)
    box_y, box_h = 500, 124
    d.box(36, box_y, 320, box_h, [M("builds/<build_id>/")], [
        "one versioned build: Parquet tables",
        [M("masks/masks.zarr"), Run(" (Zarr v3, uint8)")],
        "(row i = row i of the mask index)",
        [M("manifest.json"), Run(", written last")],
    ], *STORE_BOX, title_size=14)
    d.box(372, box_y, 180, box_h, [M("latest"), Run(" · "), M("current")], [
        "pointers to a build:",
        [M("latest"), Run(" = the last")],
        "complete, published one;",
        "readers follow it",
    ], *STORE_BOX, title_size=14)
    d.arrow(372 - 2, box_y + 62, 356 + 2, box_y + 62, color="#2f7a33", marker="store")
    d.box(568, box_y, 240, box_h, [M("annotations/incoming/")], [
        "human answers (CSV):",
        "outside every build,",
        "kept by clean-up,",
        [Run("read by "), M("salient ingest")],
    ], *STORE_BOX, title_size=14)
    d.box(824, box_y, 240, box_h, [M("cache/<stage>/<key>/")], [
        "content-addressed results:",
        "shards, NAMs, evaluations;",
        "unchanged inputs are",
        "never computed twice",
    ], *STORE_BOX, title_size=14)
    answers_x = xs[3] + stage_w - 14  # inside the human-labels box and the answers box
    d.arrow(answers_x, box_y - 2, answers_x, stage_y + stage_h + 2, color="#7b4fa0", marker="people")

    # ---- who reads and who writes ---------------------------------------------------------------
    row_y, row_h = 666, 58
    d.box(36, row_y, 516, row_h, "readers", [
        [Run("pandas, polars, DuckDB, "), M("datasets"), Run(", zarr, "), M("SalientDataset")],
    ], "#ffffff", "#3e4c59", title_size=13, gap=19)
    d.arrow(462, box_y + box_h + 2, 462, row_y - 2, color="#2f7a33", marker="store")
    d.box(568, row_y, 240, row_h, "people", [
        [M("salient annotate serve"), Run(", CSVs")],
    ], *PEOPLE, title_size=13, gap=19)
    d.arrow(688, row_y - 2, 688, box_y + box_h + 2, color="#7b4fa0", marker="people")
    d.box(824, row_y, 240, row_h, [M("salient gc OUT --keep N")], [
        "old builds and unused cache go",
    ], "#ffffff", "#3e4c59", title_size=12, gap=19)
    return d


def main(argv: list[str]) -> int:
    out = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline.svg")
    with open(out, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(draw().svg())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
