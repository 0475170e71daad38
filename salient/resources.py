"""How many workers to start and what each asks for, from the config and the cluster's resources."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from salient.config import ComputeConfig
from salient.errors import ConfigError


# Environment every worker process gets unless it is set already. A worker's decode threads and
# torch's OpenMP threads share its cores; by default OpenMP keeps its threads spinning after each
# parallel region, and on a generalize worker that spinning took up to a fifth of the CPU time the
# decoders needed. Sleeping instead costs a model's forward pass next to nothing. OpenMP reads it
# once, when torch is first imported.
WORKER_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def available_memory() -> int:
    """Bytes of memory this machine can still give without swapping (Linux's MemAvailable; else its
    free pages)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def worker_env() -> dict[str, str]:
    """The worker environment: :data:`WORKER_ENV_DEFAULTS`, with any value this process has instead."""
    return {key: os.environ.get(key, value) for key, value in WORKER_ENV_DEFAULTS.items()}


def apply_worker_env() -> None:
    """Give this process the worker environment where it has no value of its own (before torch is imported)."""
    for key, value in worker_env().items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class WorkerResources:
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float

    @property
    def threads(self) -> int:
        """Torch threads per worker: its CPUs, at least one."""
        return max(1, int(self.cpus_per_worker))


def plan_workers(compute: ComputeConfig, cluster_cpus: float, cluster_gpus: float) -> WorkerResources:
    """Resolve unset ``compute`` values for a cluster with these totals.

    With GPUs: one worker per GPU (``gpus_per_worker`` 1) and the CPUs shared among them. Without:
    one worker that uses every core, which is the fastest layout for a single CPU box (intra-op
    threads scale better than separate model copies). Raises ``ConfigError`` when the request
    cannot fit the cluster, instead of waiting forever for resources.
    """
    gpus = compute.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster_gpus >= 1 else 0.0
    if gpus > 0 and cluster_gpus < gpus:
        raise ConfigError([
            f"compute.gpus_per_worker = {gpus}: the Ray cluster has {cluster_gpus:g} GPUs; "
            "set compute.gpus_per_worker=0 to run on CPUs"
        ])
    workers = compute.workers
    if workers is None:
        workers = max(1, math.floor(cluster_gpus / gpus)) if gpus > 0 else 1
    cpus = compute.cpus_per_worker
    if cpus is None:
        cpus = max(1.0, math.floor(cluster_cpus / workers))
    if gpus > 0 and workers * gpus > cluster_gpus + 1e-9:
        raise ConfigError([
            f"compute.workers = {workers} x gpus_per_worker = {gpus} needs {workers * gpus:g} GPUs; "
            f"the Ray cluster has {cluster_gpus:g}"
        ])
    if workers * cpus > cluster_cpus + 1e-9:
        raise ConfigError([
            f"compute.workers = {workers} x cpus_per_worker = {cpus:g} needs {workers * cpus:g} CPUs; "
            f"the Ray cluster has {cluster_cpus:g}; lower one of them"
        ])
    return WorkerResources(workers, float(gpus), float(cpus))
