"""Workers that cannot start: a pool never hands an item to a worker that has not started, so a
worker with no room in the cluster, or one whose model cannot load, ends the pool with every
item failed and a reason, instead of waiting forever."""

import time

from salient.resources import WorkerResources


def _square_builder():
    return lambda x: x * x


def _broken_builder():
    raise OSError("checkpoint unreadable: [Errno 5] Input/output error")


def test_no_room_for_any_worker_fails_the_items_after_the_start_timeout(ray_session):
    from tasks.ray_pool import run_pool

    gpus = ray_session.cluster_resources()["GPU"]
    started = time.monotonic()
    result = run_pool(_square_builder, [1, 2, 3], WorkerResources(1, gpus + 1, 1.0), start_timeout_s=2.0)
    elapsed = time.monotonic() - started
    assert result.results == [] and [item for item, _ in result.failed] == [1, 2, 3]
    assert all(f"no worker started within 2 s: the Ray cluster has no room for one with {gpus + 1:g} GPU" in r for _, r in result.failed)
    assert elapsed < 30, "it gave up instead of waiting for room that never comes"


def test_a_worker_with_no_room_holds_up_nothing(ray_session):
    from tasks.ray_pool import run_pool

    # two workers of one GPU each fit the session's two GPUs; a third waits for room that never comes
    result = run_pool(_square_builder, list(range(8)), WorkerResources(3, 1.0, 0.5))
    assert sorted(result.results) == [x * x for x in range(8)] and not result.failed
    assert 1 <= len(result.workers) <= 2 and all(w["gpu_ids"] for w in result.workers)


def test_a_worker_that_cannot_start_is_tried_again_a_bounded_number_of_times(ray_session):
    from tasks.ray_pool import run_pool

    result = run_pool(_broken_builder, ["a", "b"], WorkerResources(1, 0.0, 1.0), max_attempts=2)
    assert result.results == [] and [item for item, _ in result.failed] == ["a", "b"]
    reason = result.failed[0][1]
    assert reason.startswith("no worker could be started (2 tries; the last: ") and "checkpoint unreadable" in reason, reason
