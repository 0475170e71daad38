"""Example images of a class for annotators: a few of the images filed under the class in the
build's plan, preprocessed as the build saw them, side by side in one PNG."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from salient import discover, images, nam, storage
from salient.plan import plan_uri


@dataclass
class ClassExamples:
    """Strips of up to ``per_class`` images per class, evenly spread over the class folder, made once."""

    build: str
    resize: int
    crop: int
    per_class: int = 5
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _strips: dict[int, bytes | None] = field(default_factory=dict, init=False, repr=False)
    _plan: tuple[str, np.ndarray, pa.ChunkedArray] | None = field(default=None, init=False, repr=False)

    @property
    def available(self) -> bool:
        """True when the build has a plan to take examples from."""
        return storage.exists(plan_uri(self.build))

    def _load_plan(self) -> tuple[str, np.ndarray, pa.ChunkedArray]:
        if self._plan is None:
            uri = plan_uri(self.build)
            table = storage.read_parquet(uri, ["relpath", "label"])
            self._plan = (storage.parquet_metadata(uri)["root"], table.column("label").to_numpy(), table.column("relpath"))
        return self._plan

    def strip(self, class_index: int) -> bytes | None:
        """The PNG strip of ``class_index``, or None when none of its images can be shown."""
        with self._lock:
            if class_index not in self._strips:
                self._strips[class_index] = self._make(class_index)
            return self._strips[class_index]

    def _make(self, class_index: int) -> bytes | None:
        root, labels, relpaths = self._load_plan()
        rows = np.flatnonzero(labels == class_index)
        n = len(rows)
        chosen = [int(rows[i * n // self.per_class]) for i in range(min(self.per_class, n))]
        tiles = []
        for rel in relpaths.take(chosen).to_pylist():
            try:
                x = images.load_image(storage.read_bytes(storage.under(root, rel)), self.resize, self.crop)
            except images.DECODE_ERRORS:  # OSError covers a missing file, ValueError an unsafe relpath
                continue  # the activation stage lists such files as failures; show the others
            tiles.append(nam.to_uint8(x.permute(1, 2, 0).numpy()))
        return discover.png_strip(tiles) if tiles else None
