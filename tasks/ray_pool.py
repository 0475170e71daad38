"""The Ray executor of a run: one Ray session for the whole run (a running Ray, a cluster at
``compute.ray_address``, or a private local Ray stopped at the end), and on it a pool of actors,
each built once (loading its model once), that work through a list of items with bounded retries;
a dead actor (alone, or with its whole node) is replaced and its item is run again."""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any
from urllib.parse import urlsplit

import ray
import ray._private.utils
from ray.autoscaler.sdk import request_resources
from ray.exceptions import RayActorError, RayTaskError

from salient.config import ComputeConfig
from salient.errors import ConfigError, Unreachable
from salient import resources, stopping
from salient.resources import WorkerResources, plan_workers
from salient.stage import ITEMS_PER_WORKER, Builder, OnResult, PoolResult, reason_of

log = logging.getLogger("salient.pool")

DEFAULT_CONNECT_TIMEOUT_S: float = ComputeConfig.model_fields["ray_connect_timeout_s"].default
RAY_CLIENT_PORT = 10001  # the Ray Client server's port when a ray:// address names none
# How long a pool waits for a worker to start while nothing runs: room on a node may take an
# autoscaler minutes to add.
WORKER_START_TIMEOUT_S = 900.0
_RETRY_S = 0.5
SCALE_POLL_S = 2.0  # how often a stage waiting for requested GPUs looks again


def run_log() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger inside a flow or task run, so that the pool's messages are in the
    run's log; this module's logger elsewhere."""
    # Imported here: Ray workers import this module for PoolWorker and need no Prefect.
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _endpoint(address: str) -> tuple[str, int] | None:
    """The (host, port) that ``address`` connects to; None when it means a new local Ray."""
    if address == "local":
        return None
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            address = canonicalize_bootstrap_address("auto")
        except ConnectionError as exc:
            raise Unreachable(f"compute.ray_address = 'auto': {exc}") from None
        if address is None:
            return None
    parts = urlsplit(address if address.startswith("ray://") else f"//{address}")
    if not parts.hostname:
        raise ConfigError([f"compute.ray_address = {address!r}: not host:port, ray://host:port or auto"])
    return parts.hostname, parts.port or RAY_CLIENT_PORT


def wait_reachable(address: str, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """Return once ``address`` accepts a TCP connection; raise ``Unreachable`` (a ``ConnectionError``) after ``timeout_s``.

    ``ray.init`` itself keeps retrying an address where nothing listens for many minutes.
    """
    endpoint = _endpoint(address)
    if endpoint is None:
        return
    host, port = endpoint
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())):
                return
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() + _RETRY_S >= deadline:
            break
        time.sleep(_RETRY_S)
    raise Unreachable(
        f"compute.ray_address = {address!r}: nothing accepted a connection at {host}:{port} within "
        f"{timeout_s:g} s ({last}); start the cluster (`ray start --head`) or fix compute.ray_address "
        "(leave it unset for a private local Ray); compute.ray_connect_timeout_s sets how long to wait"
    )


@contextmanager
def _sigterm_left_alone() -> Iterator[None]:
    """``ray.init`` that keeps the process's SIGTERM handler: Ray's, installed first thing, calls
    ``sys.exit`` wherever the main thread is (inside a fork hook, holding the logging module's lock)
    and can hang the exit; a run stops in order instead (salient.stopping)."""
    utils = ray._private.utils
    installs = utils.set_sigterm_handler
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = installs


@contextmanager
def ray_cluster(address: str | None = None, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> Iterator[dict[str, float]]:
    """Use the running Ray, connect to ``address``, or start a private local Ray (stopped on exit).

    An ``address`` that accepts no connection within ``connect_timeout_s`` raises ``ConnectionError``.
    Yields the cluster's total resources.
    """
    started = False
    if not ray.is_initialized():
        with _sigterm_left_alone():
            if address:
                wait_reachable(address, connect_timeout_s)
                ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": resources.worker_env()})
            else:
                ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, runtime_env={"env_vars": resources.worker_env()})
        started = True
    try:
        yield dict(ray.cluster_resources())
    finally:
        if started:
            ray.shutdown()


class RayExecutor:
    """Runs a run's work on Ray (see :class:`salient.stage.Executor`): it connects on first use,
    once for the whole run, and stops on exit the Ray it started.

    For a stage that ``uses_gpus``, with ``compute.request_gpus`` set, the autoscaler is asked for
    room for that many GPUs in worker-shaped bundles; the pool starts once they are there or
    ``compute.scale_up_timeout_s`` has passed, and the request is withdrawn when the pool is done
    so that idle nodes can go.
    """

    def __init__(self, compute: ComputeConfig) -> None:
        self.compute = compute
        self._session: ExitStack | None = None

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def connect(self) -> dict[str, float]:
        """Join or start Ray (once per run); returns the cluster's total resources."""
        if self._session is None:
            session = ExitStack()
            session.enter_context(ray_cluster(self.compute.ray_address, self.compute.ray_connect_timeout_s))
            self._session = session
        return dict(ray.cluster_resources())

    @contextmanager
    def gpus(self, uses_gpus: bool = True) -> Iterator[dict[str, float]]:
        """The cluster's totals, after asking the autoscaler for ``compute.request_gpus`` when set."""
        totals = self.connect()
        compute = self.compute
        if not uses_gpus or compute.request_gpus is None:
            yield totals
            return
        per_worker = compute.gpus_per_worker or 1.0
        bundle = {"GPU": per_worker, **({"CPU": compute.cpus_per_worker} if compute.cpus_per_worker else {})}
        ask_autoscaler([bundle] * math.ceil(compute.request_gpus / per_worker))
        try:
            yield await_gpus(compute.request_gpus, totals, compute.scale_up_timeout_s)
        finally:
            ask_autoscaler([])

    def pool(
        self, builder: Builder, payloads: Sequence[Any], *, uses_gpus: bool = True,
        on_result: OnResult | None = None, max_attempts: int = 3,
    ) -> PoolResult:
        if not payloads:
            return PoolResult()
        with self.gpus(uses_gpus) as totals:
            res = plan_workers(self.compute, totals.get("CPU", 1.0), totals.get("GPU", 0.0))
            run_log().info(
                "%d items on %d workers x (%g GPU, %g CPU)", len(payloads), res.workers, res.gpus_per_worker, res.cpus_per_worker
            )
            return run_pool(functools.partial(builder, res.threads), payloads, res, max_attempts=max_attempts, on_result=on_result)

    def map(self, fn: Callable[..., Any], args: Sequence[tuple]) -> Iterator[Any]:
        self.connect()
        yield from ray_map(fn, args)


@ray.remote(num_cpus=0)
def _ask_from_the_cluster(bundles: list[dict[str, float]]) -> None:
    request_resources(bundles=bundles)


def ask_autoscaler(bundles: list[dict[str, float]]) -> None:
    """Set the autoscaler's standing request to room for ``bundles`` (none withdraws it).

    Through Ray Client the request is made by a task on the cluster: Ray's autoscaler SDK needs
    the cluster's GCS, which a client does not reach.
    """
    if ray.util.client.ray.is_connected():
        ray.get(_ask_from_the_cluster.remote(bundles))
    else:
        request_resources(bundles=bundles)


def await_gpus(gpus: float, totals: dict[str, float], timeout_s: float) -> dict[str, float]:
    """The cluster's totals once they hold ``gpus`` GPUs, or after ``timeout_s`` with what there is."""
    if totals.get("GPU", 0.0) >= gpus:
        return totals
    run_log().info("asked the autoscaler for %g GPUs (%g now); waiting up to %g s", gpus, totals.get("GPU", 0.0), timeout_s)
    deadline = time.monotonic() + timeout_s
    while totals.get("GPU", 0.0) < gpus:
        if time.monotonic() >= deadline:
            run_log().warning(
                "%g of the %g GPUs asked for arrived within %g s (compute.scale_up_timeout_s); running on those",
                totals.get("GPU", 0.0), gpus, timeout_s,
            )
            break
        with stopping.interruptible():
            time.sleep(min(SCALE_POLL_S, max(0.0, deadline - time.monotonic())))
        totals = dict(ray.cluster_resources())
    return totals


@ray.remote(max_restarts=0, max_concurrency=ITEMS_PER_WORKER)
class PoolWorker:
    """Runs items with the callable its builder returns; the builder runs once, in the actor. Up to
    ``ITEMS_PER_WORKER`` items run at once, in threads of the actor."""

    def __init__(self, builder: Callable[[], Callable[[Any], Any]]) -> None:
        if not ray.get_runtime_context().get_accelerator_ids().get("GPU"):
            # Ray leaves a worker given no GPU every GPU of its node: it computes on the CPU, as asked
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        self.fn = builder()

    def run(self, item: Any) -> Any:
        return self.fn(item)

    def describe(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
            "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }


def run_pool(
    builder: Callable[[], Callable[[Any], Any]],
    items: Sequence[Any],
    resources: WorkerResources,
    *,
    max_attempts: int = 3,
    on_result: OnResult | None = None,
    start_timeout_s: float = WORKER_START_TIMEOUT_S,
) -> PoolResult:
    """Run every item on ``resources.workers`` actors; each item at most ``max_attempts`` times.

    An item is handed only to a worker that has started, so a replacement for a worker lost with
    its node, which may find no room left in the cluster, holds up nothing while the others go on.
    Each worker holds up to ``ITEMS_PER_WORKER`` items at once (it reads one while it computes
    another). Items whose attempts are all used up are returned in ``failed`` with the last reason; so are
    the items left when no worker could be started (each worker at most ``max_attempts`` times) or
    none started within ``start_timeout_s`` while no item was running.
    """
    out = PoolResult()
    if not items:
        return out
    n_workers = min(resources.workers, len(items))
    starting: dict[Any, Any] = {}  # readiness probe -> worker not yet started
    free: dict[Any, int] = {}  # started worker -> item slots it has free
    dead: set[Any] = set()
    queue: deque[tuple[Any, int]] = deque((item, 1) for item in items)
    inflight: dict[Any, tuple[Any, Any, int]] = {}
    start_failures, last_start_error = 0, ""

    def start() -> None:
        actor = PoolWorker.options(num_gpus=resources.gpus_per_worker, num_cpus=resources.cpus_per_worker).remote(builder)
        starting[actor.describe.remote()] = actor

    def retry(item: Any, attempt: int, reason: str) -> None:
        if attempt < max_attempts:
            run_log().warning("attempt %d of %d failed (%s); retrying", attempt, max_attempts, reason)
            queue.append((item, attempt + 1))
        else:
            out.failed.append((item, reason))

    def give_up(reason: str) -> None:
        out.failed.extend((item, reason) for item, _ in queue)
        queue.clear()

    for _ in range(n_workers):
        start()
    try:
        while queue or inflight:
            while queue and free:
                actor = max(free, key=free.__getitem__)
                if free[actor] == 0 or (free[actor] < ITEMS_PER_WORKER and len(queue) <= len(starting)):
                    break  # a second item for a busy worker only when the workers still starting get theirs
                free[actor] -= 1
                item, attempt = queue.popleft()
                inflight[actor.run.remote(item)] = (actor, item, attempt)
            if not inflight and not starting:
                give_up(f"no worker could be started ({start_failures} tries; the last: {last_start_error})")
                break
            with stopping.interruptible():
                ready, _ = ray.wait([*inflight, *starting], num_returns=1, timeout=None if inflight else start_timeout_s)
            if not ready:
                give_up(
                    f"no worker started within {start_timeout_s:g} s: the Ray cluster has no room for one with "
                    f"{resources.gpus_per_worker:g} GPU and {resources.cpus_per_worker:g} CPU (were nodes lost?)"
                )
                break
            ref = ready[0]
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    out.workers.append(ray.get(ref))
                except RayActorError as exc:
                    ray.kill(actor, no_restart=True)
                    start_failures += 1
                    last_start_error = reason_of(exc)
                    run_log().warning("a worker failed to start (%s)", last_start_error)
                    if start_failures < max_attempts * n_workers:
                        start()
                    continue
                free[actor] = ITEMS_PER_WORKER
                continue
            actor, item, attempt = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as exc:
                if actor not in dead:  # its other items fail the same way; replace it once
                    dead.add(actor)
                    out.replaced_workers += 1
                    ray.kill(actor, no_restart=True)
                    free.pop(actor, None)
                    start()
                retry(item, attempt, reason_of(exc))
                continue
            except RayTaskError as exc:
                if actor not in dead:
                    free[actor] += 1
                retry(item, attempt, reason_of(exc))
                continue
            if actor not in dead:
                free[actor] += 1
            out.results.append(result)
            if on_result is not None:
                on_result(item, result)
    finally:
        for actor in {*free, *starting.values(), *(a for a, _, _ in inflight.values())} - dead:
            ray.kill(actor, no_restart=True)
    return out


def ray_map(fn: Callable[..., Any], args: Sequence[tuple], window: int | None = None, max_retries: int = 3) -> Iterator[Any]:
    """Run ``fn(*a)`` as Ray tasks (one CPU each), yielding results as they finish.

    At most ``window`` tasks are in flight (default: twice the cluster's CPUs), so results are
    consumed, and memory freed, as fast as they arrive. A task whose worker dies is retried.
    """
    remote = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=False)(fn)
    window = window or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending = iter(args)
    inflight = [remote.remote(*a) for a in itertools.islice(pending, window)]
    while inflight:
        with stopping.interruptible():
            ready, inflight = ray.wait(inflight, num_returns=1)
        nxt = next(pending, None)
        if nxt is not None:
            inflight.append(remote.remote(*nxt))
        yield ray.get(ready[0])
