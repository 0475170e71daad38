import pytest

from salient.config import ComputeConfig
from salient.resources import plan_workers


def test_cpu_only_defaults_to_one_worker_on_every_core():
    r = plan_workers(ComputeConfig(), cluster_cpus=16, cluster_gpus=0)
    assert (r.workers, r.gpus_per_worker, r.cpus_per_worker, r.threads) == (1, 0.0, 16.0, 16)


def test_gpu_defaults_to_one_worker_per_gpu_sharing_cpus():
    r = plan_workers(ComputeConfig(), cluster_cpus=32, cluster_gpus=4)
    assert (r.workers, r.gpus_per_worker, r.cpus_per_worker) == (4, 1.0, 8.0)


def test_zero_gpus_means_cpu_even_with_gpus_present():
    r = plan_workers(ComputeConfig(gpus_per_worker=0, workers=2), cluster_cpus=8, cluster_gpus=2)
    assert (r.workers, r.gpus_per_worker, r.cpus_per_worker) == (2, 0.0, 4.0)


@pytest.mark.parametrize(
    "compute, match",
    [
        (ComputeConfig(gpus_per_worker=1), "the Ray cluster has 0 GPUs"),
        (ComputeConfig(workers=3, gpus_per_worker=1), "needs 3 GPUs"),
        (ComputeConfig(workers=2, cpus_per_worker=2), "needs 4 CPUs"),
    ],
)
def test_requests_that_cannot_fit_fail_early(compute, match):
    gpus = 2 if compute.workers == 3 else 0
    with pytest.raises(ValueError, match=match):
        plan_workers(compute, cluster_cpus=2, cluster_gpus=gpus)
