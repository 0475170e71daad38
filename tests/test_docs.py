"""The README and docs/: a short README that starts with the two commands, links that resolve, and
a pipeline picture that its script in the repository regenerates byte for byte."""

import glob
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
MAX_README_LINES = 250
# Written separately from these pages; linked, but its existence is not this file's to check.
NOT_CHECKED = {os.path.join(DOCS, "stages.md")}

FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?^[ \t]*\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG_SRC = re.compile(r"<img\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.I)
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _pages() -> list[str]:
    return [README, *sorted(glob.glob(os.path.join(DOCS, "*.md")))]


def _links(text: str) -> list[str]:
    """Link targets of a markdown page, outside code blocks and code spans."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return MD_LINK.findall(prose) + IMG_SRC.findall(prose) + REF_DEF.findall(prose)


def test_readme_is_short():
    lines = _read(README).splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; at most {MAX_README_LINES}"


def test_readme_opens_with_make_demo_and_make_test():
    text = _read(README)
    first = FENCE.search(text)
    assert first, "README.md has no code block"
    commands = [line.split("#")[0].strip() for line in first.group(0).splitlines()[1:-1]]
    assert commands[:2] == ["make demo", "make test"], f"README.md's first code block starts with {commands[:2]}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
    missing = []
    links = _links(_read(page))
    for link in links:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", link) or link.startswith("#"):
            continue  # http(s), mailto, ...; an anchor within the page
        target = os.path.normpath(os.path.join(os.path.dirname(page), link.split("#", 1)[0]))
        if target in NOT_CHECKED:
            continue
        if not target.startswith(ROOT + os.sep) or not os.path.exists(target):
            missing.append(link)
    assert not missing, f"{os.path.relpath(page, ROOT)}: links to nothing in the repository: {missing}"


def test_link_finder_sees_markdown_links_and_img_tags_but_not_code():
    text = (
        "See [a](docs/a.md#x), ![pic](b.svg \"t\") and <img src='c.png' width=3>.\n"
        "`[not](inline.md)`\n```\n[not](fenced.md)\n```\n[ref]: d.md\n"
    )
    assert sorted(_links(text)) == ["b.svg", "c.png", "d.md", "docs/a.md#x"]


def test_pipeline_svg_is_what_its_script_draws(tmp_path):
    svg = os.path.join(DOCS, "pipeline.svg")
    assert os.path.isfile(svg), "docs/pipeline.svg is missing: run `python docs/pipeline.py`"
    ET.parse(svg)  # well-formed
    fresh = tmp_path / "pipeline.svg"
    subprocess.run([sys.executable, os.path.join(DOCS, "pipeline.py"), str(fresh)], check=True, capture_output=True)
    with open(svg, "rb") as a, open(fresh, "rb") as b:
        assert a.read() == b.read(), "docs/pipeline.svg is out of date: run `python docs/pipeline.py`"
