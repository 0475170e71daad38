"""Planning a large ImageFolder listing on an object store: class folders listed in parallel
against one at a time, on a synthetic store with a fixed per-request latency.

    python -m benchmarks.listing [--classes 1000] [--per-class 100] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import time

from fsspec import AbstractFileSystem

from benchmarks.common import environment, save
from salient import plan


class SlowListingFS(AbstractFileSystem):
    """A synthetic ImageFolder store whose listings cost a round trip, like an object store's LIST."""

    protocol = "slowlist"
    latency = 0.02
    classes = 1000
    per_class = 100

    @classmethod
    def _strip_protocol(cls, path):
        return path.removeprefix("slowlist://").rstrip("/") or "/"

    def ls(self, path, detail=True, **kwargs):
        time.sleep(self.latency)
        path = self._strip_protocol(path)
        if path == "/train":
            entries = [{"name": f"/train/n{c:08d}", "type": "directory", "size": 0} for c in range(self.classes)]
        else:
            wnid = path.rsplit("/", 1)[-1]
            entries = [{"name": f"{path}/{wnid}_{i}.JPEG", "type": "file", "size": 110_000} for i in range(self.per_class)]
        return entries if detail else [e["name"] for e in entries]

    def isdir(self, path):
        return self._strip_protocol(path) == "/train"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    args = ap.parse_args()
    import fsspec

    fsspec.register_implementation("slowlist", SlowListingFS, clobber=True)
    SlowListingFS.latency = args.latency_ms / 1000
    SlowListingFS.classes, SlowListingFS.per_class = args.classes, args.per_class
    n = args.classes * args.per_class
    timings = {}
    for threads in (1, 32):
        t0 = time.perf_counter()
        listing = plan.list_images("slowlist:///train", threads=threads)
        timings[threads] = time.perf_counter() - t0
        assert listing.table.num_rows == n
    result = {
        "benchmark": "listing",
        "files": n,
        "classes": args.classes,
        "latency_ms_per_list": args.latency_ms,
        "seconds": {"sequential": round(timings[1], 3), "parallel_32": round(timings[32], 3)},
        "files_per_s_parallel": round(n / timings[32]),
        "ratio": round(timings[1] / timings[32], 2),
        "environment": environment(),
    }
    md = (
        "# Planning: listing an ImageFolder on an object store\n\n"
        f"{n:,} files in {args.classes} class folders, {args.latency_ms:g} ms per LIST request.\n\n"
        f"| class folders listed | seconds |\n|---|---|\n| one at a time | {timings[1]:.2f} |\n"
        f"| 32 in parallel | {timings[32]:.2f} |\n\n**Ratio: {result['ratio']}x**; "
        f"{result['files_per_s_parallel']:,} files/s planned in parallel.\n"
    )
    save("listing", result, md)


if __name__ == "__main__":
    main()
