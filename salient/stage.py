"""How every stage runs: the :class:`Stage` type, the :class:`Run` it runs in, the executors that
spread its work, and the one cache lookup and copy around all of it.

A stage plans its work as :class:`Item` s. Each item is content-addressed: its ``key`` is a
fingerprint of the stage's code version, the whole config sections that can change its output
(:func:`salient.config.identity`), and the item's own inputs. :func:`execute` runs a stage the
same way for every stage:

1. ``plan`` lists the items;
2. an item whose commit marker in the build names its fingerprint is done; else an item whose key
   is in the output root's cache is restored from there; else it is to do;
3. ``compute`` runs the items to do (on the run's executor, or in this process) and each finished
   item is kept in the cache at once, so a stopped run loses nothing it finished;
4. ``commit`` writes the stage's tables from every item's result and returns its summary.

Nothing here imports Prefect or Ray: an :class:`Executor` is handed in (the Ray one lives in
``tasks/ray_pool.py``; :class:`LocalExecutor` runs everything in this process).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from salient import builds, stopping, storage, tables
from salient.config import Config, identity
from salient.preflight import Preflight

log = logging.getLogger("salient.stage")

# Cached items put in a build at once on an object store (on a local disk: one at a time, as links).
RESTORE_THREADS = 16
# Seconds between two progress lines of a stage in the log (the terminal's bar is live).
PROGRESS_INTERVAL_S = 30.0


@dataclass(frozen=True)
class Item:
    """One unit of a stage's work.

    ``key`` names its cache entry: everything its files depend on. ``marker`` is the JSON file,
    relative to the build, that the work writes last, holding ``fingerprint`` and its result;
    ``fingerprint`` (default: ``key``) is what that marker must name for the item to count as done
    in this build. ``files`` are the other files it writes (relative to the build); ``payload`` is
    what the worker is given; ``size`` weighs it on the progress bar.
    """

    key: str
    marker: str
    files: tuple[str, ...] = ()
    payload: Any = None
    label: str = ""
    size: int = 1
    fingerprint: str | None = None

    @property
    def commit_fingerprint(self) -> str:
        return self.fingerprint or self.key


@dataclass
class PoolResult:
    """What a pool of workers did: results in the order they finished, items that failed every
    attempt with the last reason, workers replaced after dying, and who the workers were."""

    results: list[Any] = field(default_factory=list)
    failed: list[tuple[Any, str]] = field(default_factory=list)
    replaced_workers: int = 0
    workers: list[dict[str, Any]] = field(default_factory=list)


# A worker is built once where it runs, from the number of CPU threads it may use. It is handed up
# to ITEMS_PER_WORKER items at once, from as many threads, so that it reads its next item while it
# computes one and computes the next while it writes one: the callable must be thread-safe (model
# stages take turns on the device through salient.inference.Inference.lock).
Builder = Callable[[int | None], Callable[[Any], Any]]
ITEMS_PER_WORKER = 2
OnResult = Callable[[Any, Any], None]


class Executor(Protocol):
    """Where a stage's work runs."""

    def pool(
        self, builder: Builder, payloads: Sequence[Any], *, uses_gpus: bool = True,
        on_result: OnResult | None = None, max_attempts: int = 3,
    ) -> PoolResult:
        """Run every payload on workers built by ``builder``, each at most ``max_attempts`` times;
        ``on_result(payload, result)`` is called as each one finishes."""
        ...

    def map(self, fn: Callable[..., Any], args: Sequence[tuple]) -> Iterator[Any]:
        """``fn(*a)`` for each ``a``, as independent tasks, yielding results as they finish."""
        ...


def reason_of(exc: BaseException) -> str:
    """One line about an exception: its type and the last line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:500]


class LocalExecutor:
    """Runs work in this process, as one worker: for libraries, notebooks and tests."""

    def pool(
        self, builder: Builder, payloads: Sequence[Any], *, uses_gpus: bool = True,
        on_result: OnResult | None = None, max_attempts: int = 3,
    ) -> PoolResult:
        out = PoolResult()
        if not payloads:
            return out
        fn = builder(None)
        queue = deque((payload, 1) for payload in payloads)
        running: dict[Future[Any], tuple[Any, int]] = {}
        with ThreadPoolExecutor(max_workers=ITEMS_PER_WORKER, thread_name_prefix="item") as threads:
            while queue or running:
                while queue and len(running) < ITEMS_PER_WORKER:
                    payload, attempt = queue.popleft()
                    running[threads.submit(fn, payload)] = (payload, attempt)
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    payload, attempt = running.pop(future)
                    exc = future.exception()
                    if exc is not None:
                        if attempt < max_attempts:
                            queue.append((payload, attempt + 1))
                        else:
                            out.failed.append((payload, reason_of(exc)))
                        continue
                    out.results.append(future.result())
                    if on_result is not None:
                        on_result(payload, future.result())
        return out

    def map(self, fn: Callable[..., Any], args: Sequence[tuple]) -> Iterator[Any]:
        for a in args:
            yield fn(*a)


@dataclass
class Run:
    """One command's run: the config, the build it reads and writes, what the pre-flight read,
    the executor, and the log to report to."""

    config: Config
    layout: builds.Layout
    preflight: Preflight
    executor: Executor = field(default_factory=LocalExecutor)
    log: logging.Logger | logging.LoggerAdapter = log

    @property
    def root(self) -> str:
        """The output root (the config's ``output``)."""
        return self.layout.root

    @property
    def build(self) -> str:
        """The build directory this run reads and writes."""
        return self.layout.build

    def identity(self, *sections: str) -> dict[str, Any]:
        """What of the named config sections can change an output (for cache keys)."""
        return {s: identity(getattr(self.config, s), self.preflight.digest) for s in sections if getattr(self.config, s) is not None}


class StageFailed(RuntimeError):
    """Items of a stage failed every attempt."""


class Stage:
    """One stage of a build. Subclasses set the class attributes and override what they need;
    see docs/stages.md."""

    name: ClassVar[str]
    help: ClassVar[str]  # one line for the command line
    code_version: ClassVar[str]  # bump when the code changes what the stage writes
    requires: ClassVar[tuple[str, ...]] = ("output",)  # config parts the pre-flight checks
    sections: ClassVar[tuple[str, ...]] = ()  # config sections that can change the stage's outputs
    needs_discovery: ClassVar[bool] = False  # needs a ResNet-like model (last conv stage, final linear layer)
    uses_gpus: ClassVar[bool] = False
    retries: ClassVar[int] = 1  # orchestrator retries of the whole stage
    # What an item's ``size`` counts, for progress; None: the stage's compute shows its own.
    group: ClassVar[str | None] = None  # the command group its command is under (`salient GROUP NAME`)
    unit: ClassVar[str | None] = "items"
    max_attempts: ClassVar[int] = 3  # attempts per item

    def applies(self, config: Config) -> bool:
        """Whether a full rebuild with ``config`` runs this stage."""
        return True

    def check(self, config: Config, found: Preflight) -> list[str]:
        """Pre-flight problems of this stage's own, beyond the sections in ``requires``."""
        return []

    def key(self, run: Run, *inputs: Any) -> str:
        """The fingerprint of this stage's code, its config sections and ``inputs``."""
        return storage.fingerprint(self.name, self.code_version, run.identity(*self.sections), *inputs)

    def whole(self, key: str, files: Sequence[str], payload: Any = None) -> Item:
        """The single item of a stage that makes all its files at once, in this process."""
        return Item(key, tables.stage_marker(self.name), tuple(files), payload, self.name)

    def plan(self, run: Run) -> list[Item]:
        """The stage's items; none for a stage that only commits."""
        return []

    def worker(self, run: Run) -> Builder | None:
        """A picklable builder of the worker that makes one item's files from its payload and
        returns its result (a JSON-able dict); None runs :meth:`make` in this process instead."""
        return None

    def make(self, run: Run, item: Item) -> dict:
        """Make one item's files in this process (stages without a worker); returns its result.
        The item's marker is written from the result afterwards."""
        raise NotImplementedError(f"stage {self.name} has neither a worker nor make()")

    def compute(self, run: Run, todo: list[Item], done: Callable[[Item, dict], None]) -> None:
        """Make every item of ``todo``, calling ``done(item, result)`` as each is finished."""
        builder = self.worker(run)
        if builder is None:
            for item in todo:
                result = {"fingerprint": item.commit_fingerprint, **self.make(run, item)}
                storage.write_json(storage.join(run.build, item.marker), result)
                done(item, result)
            return
        by_payload = {id(item.payload): item for item in todo}
        result = run.executor.pool(
            builder, [item.payload for item in todo], uses_gpus=self.uses_gpus, max_attempts=self.max_attempts,
            on_result=lambda payload, res: done(by_payload[id(payload)], res),
        )
        fail(self, [(by_payload[id(p)], reason) for p, reason in result.failed])
        if result.replaced_workers:
            run.log.warning("%s: replaced %d dead workers", self.name, result.replaced_workers)

    def restore(self, run: Run, item: Item, entry: dict) -> dict:
        """Put a cached item in the build: its files and marker as they were kept; returns its result."""
        builds.restore_entry(run.root, self.name, item.key, run.build, entry)
        return entry["result"]

    def on_result(self, run: Run, item: Item, result: dict) -> None:
        """Report a finished item (at debug level: the log shows the stage's progress, not its items)."""
        run.log.debug("%s: %s done", self.name, item.label or item.key[:12])

    def commit(self, run: Run, results: list[tuple[Item, dict, str]]) -> dict:
        """Write the stage's tables from every item's ``(item, result, origin)``, origin being
        ``build``, ``cache`` or ``computed``; returns the stage's summary."""
        return {"items": len(results), "computed": sum(origin == "computed" for _, _, origin in results)}

    def describe(self, summary: dict) -> str:
        """One or a few lines about ``summary`` for the command line."""
        return f"{self.name}: {summary}"

    def counts(self, summary: dict) -> dict[str, int]:
        """What a build's manifest counts from the stage's ``summary`` (``counts``); an ``images``
        count also gives the manifest's ``images_per_second`` over the stage's time."""
        return {}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Options of the stage's own command (``salient NAME CONFIG``) besides the config's."""

    def with_arguments(self, config: Config, args: argparse.Namespace) -> Config:
        """``config`` with the options of :meth:`add_arguments` applied."""
        return config


def fail(stage: Stage, failed: Sequence[tuple[Item, str]]) -> None:
    """Raise :class:`StageFailed` naming the first items of ``failed``, if there are any."""
    if failed:
        lines = "; ".join(f"{item.label or item.key[:12]}: {reason}" for item, reason in failed[:5])
        raise StageFailed(
            f"{stage.name}: {len(failed)} items failed after {stage.max_attempts} attempts ({lines}); rerun to retry them"
        )


def committed_result(run: Run, item: Item) -> dict | None:
    """The result in ``item``'s marker when it names the item's fingerprint, else None."""
    return committed_results(run, [item])[0]


def committed_results(run: Run, items: Sequence[Item]) -> list[dict | None]:
    """:func:`committed_result` of each of ``items``, their markers read concurrently."""
    found = storage.read_json_many([storage.join(run.build, item.marker) for item in items])
    return [
        result if isinstance(result, dict) and result.get("fingerprint") == item.commit_fingerprint else None
        for item, result in zip(items, found)
    ]


def keep(run: Run, stage: Stage, item: Item, result: dict) -> str:
    """Keep a finished item's files and marker as cache entry ``<stage>/<key>``; returns its name."""
    rels = [rel for rel in (*item.files, item.marker) if storage.exists(storage.join(run.build, rel))]
    return builds.save_entry(run.root, stage.name, item.key, run.build, rels, {"result": result})


def execute(stage: Stage, run: Run) -> dict:
    """Run ``stage`` in ``run``, taking what was made before from the build or the cache."""
    stopping.check()
    items = stage.plan(run)
    results: dict[str, tuple[Item, dict, str]] = {}
    missing: list[Item] = []
    for item, result in zip(items, committed_results(run, items)):
        if result is not None:
            results[item.marker] = (item, result, "build")
        else:
            missing.append(item)
    entries = builds.read_entries(run.root, stage.name, [item.key for item in missing])
    cached = [(item, entry) for item, entry in zip(missing, entries) if entry is not None and "result" in entry]
    todo = [item for item, entry in zip(missing, entries) if entry is None or "result" not in entry]
    # On a local disk a restore is a few hard links, quicker done here than handed to threads.
    threads = 1 if storage.is_local(run.root) else RESTORE_THREADS
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="restore") as pool:
        restored = (pool.map if threads > 1 else map)(lambda ie: stage.restore(run, *ie), cached)
        for item, result in zip((i for i, _ in cached), restored):
            results[item.marker] = (item, result, "cache")
    if items:
        run.log.info(
            "%s: %d items, %d done in this build, %d from the cache, %d to make",
            stage.name, len(items), sum(o == "build" for _, _, o in results.values()),
            sum(o == "cache" for _, _, o in results.values()), len(todo),
        )
    if todo:
        progress = Progress(run.log, stage.name, sum(i.size for i in todo), stage.unit) if stage.unit else contextlib.nullcontext(lambda n: None)
        with progress as advance:

            def done(item: Item, result: dict) -> None:
                keep(run, stage, item, result)
                results[item.marker] = (item, result, "computed")
                stage.on_result(run, item, result)
                advance(item.size)
                stopping.check()

            stage.compute(run, todo, done)
    builds.record_cache_use(run.build, [f"{stage.name}/{item.key}" for item in items])
    return stage.commit(run, [results[item.marker] for item in items])


class Progress:
    """Progress of a stage's work, shown as progress: a bar on a terminal, and in the log one line
    every ``interval_s`` with the count, the rate and the time left, and one when the work is done
    (never a line per item). ``with Progress(log, name, total, unit) as advance: advance(n)``."""

    def __init__(
        self, log: logging.Logger | logging.LoggerAdapter, name: str, total: int, unit: str = "items",
        interval_s: float | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.log, self.name, self.total, self.unit = log, name, total, unit
        self.interval_s = PROGRESS_INTERVAL_S if interval_s is None else interval_s
        self.clock = clock
        self.bar = Bar(
            TextColumn(name), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            disable=not sys.stderr.isatty() or bool(os.environ.get("CI")), transient=True,
        )
        self.task = self.bar.add_task(name, total=total)
        self.done = 0
        self.lock = threading.Lock()

    def __enter__(self) -> Callable[[int], None]:
        self.bar.__enter__()
        self.started = self.last = self.clock()
        return self.advance

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units done; log a line when the interval has passed."""
        with self.lock:
            self.done += n
            self.bar.advance(self.task, n)
            now = self.clock()
            if now - self.last < self.interval_s or self.done >= self.total:
                return
            self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        self.log.info(
            "%s: %s of %s %s (%.0f%%), %s %s/s, about %s left", self.name, f"{self.done:,}", f"{self.total:,}", self.unit,
            100 * self.done / max(self.total, 1), f"{rate:,.1f}", self.unit, duration((self.total - self.done) / rate if rate else 0),
        )

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.bar.__exit__(exc_type, *exc)
        if exc_type is None:
            seconds = self.clock() - self.started
            if self.total <= 1:  # one piece of work: a count and a rate would say nothing
                self.log.info("%s: done in %s", self.name, duration(seconds))
                return
            self.log.info(
                "%s: %s %s done in %s (%s %s/s)", self.name, f"{self.done:,}", self.unit, duration(seconds),
                f"{self.done / max(seconds, 1e-9):,.1f}", self.unit,
            )


def duration(seconds: float) -> str:
    """``seconds`` for people: ``42 s``, ``3 min 05 s``, ``2 h 04 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def local_run(config: Config, stages: Sequence[Stage] = (), current: bool = True) -> Run:
    """A run of ``stages`` in this process (:class:`LocalExecutor`), after their pre-flight, on the
    ``current`` build of ``config.output`` (or, with ``current=False``, a new or unfinished one, as
    ``salient run`` takes); for libraries, notebooks and tests. No lease is taken."""
    from salient import preflight

    root = config.output
    layout = builds.open_current(root) if current else builds.start_run(root)
    return Run(config, layout, preflight.for_stages(config, stages), LocalExecutor())
