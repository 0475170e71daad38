import os
import re

import pyarrow as pa

from salient import aggregate, report, storage
from tests.salient.test_masks import _build, _generalize


def test_report_shows_every_pair_with_pictures_and_escapes_text(tmp_path):
    root, out, ckpt = _build(tmp_path)
    _generalize(root, out, ckpt)
    index = storage.read_parquet(f"{out}/masks/index.parquet").to_pylist()
    pairs = sorted({(r["class_index"], r["wnid"], r["feature_index"]) for r in index})
    storage.write_parquet(f"{out}/{aggregate.PAIRS_TABLE}", pa.table({
        "class_index": [c for c, _, _ in pairs], "wnid": [w for _, w, _ in pairs], "feature_index": [j for _, _, j in pairs],
        "feature_rank": list(range(1, len(pairs) + 1)), "importance": [0.5] * len(pairs),
    }), "fp")
    storage.write_parquet(f"{out}/{aggregate.CLASSES_TABLE}", pa.table({
        "class_index": [0, 1, 2], "wnid": ["n0000", "n0001", "n0002"],
        "name": ["<script>alert(1)</script>", "b & c", None], "reason": [None, None, "no images predicted as this class"],
    }), "fp")
    page = report.write_report(out, "a <title>")
    text = open(page).read()
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "b &amp; c" in text and "No pairs: no images predicted as this class." in text
    sources = re.findall(r"<img [^>]*src='([^']+)'", text)
    assert len(sources) == len(pairs), "one mask strip per pair (no discovery assets in this build)"
    for src in sources:
        assert os.path.getsize(os.path.join(os.path.dirname(page), src)) > 0
    for c, _, j in pairs:
        assert f"feature {j} (rank" in text
