"""Class metadata: names, definitions and supercategories, from a CSV like ``imagenet_class_metadata.csv``."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from salient import storage
from salient.errors import InputError

REQUIRED_COLUMNS = ("class_index", "wordnet_id", "synset")


@dataclass(frozen=True)
class ClassInfo:
    class_index: int
    wnid: str
    name: str
    definition: str
    supercategory: str


# ImageNet's, with glosses, is 0.3 MB: a file much larger is not class metadata.
MAX_BYTES = 64 * 2**20


def read_class_metadata(uri: str) -> list[ClassInfo]:
    """Every class of the CSV at ``uri``, ordered by class_index.

    Needs the columns ``class_index, wordnet_id, synset``; ``gloss`` and ``supercategory`` are optional.
    """
    try:
        text = storage.read_input_file(uri, MAX_BYTES).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(f"missing columns {', '.join(missing)}; expected at least {', '.join(REQUIRED_COLUMNS)}")
    classes: list[ClassInfo] = []
    for line, row in enumerate(reader, start=2):
        try:
            index = int(row["class_index"])
        except (TypeError, ValueError):
            raise InputError(f"line {line}: class_index {row['class_index']!r} is not an integer") from None
        classes.append(
            ClassInfo(
                class_index=index,
                wnid=(row["wordnet_id"] or "").strip(),
                name=(row["synset"] or "").strip(),
                definition=(row.get("gloss") or "").strip(),
                supercategory=(row.get("supercategory") or "").strip(),
            )
        )
    classes.sort(key=lambda c: c.class_index)
    indices = [c.class_index for c in classes]
    if len(set(indices)) != len(indices):
        raise InputError("class_index values are not unique")
    return classes
