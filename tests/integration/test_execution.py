"""The execution lease in real worker processes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_dedup import LockLostError
from tests.rig import (
    FREE,
    Recorder,
    RedisServer,
    Worker,
    dropped_onto,
    held,
    max_overlap,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_a_body_longer_than_three_lease_ttls_keeps_its_lease(
    scenario_app: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    workers(concurrency=3)
    task = scenario_app.close_campaign
    options = {"dedup_lock": "while_executing", "dedup_lock_ttl": 1.5}
    first = task.apply_async((20, 5.0), queue=queue, **options)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the first body")
    # others of the same key keep arriving while it runs, for 4.5 s = 3 TTLs
    others = []
    for _ in range(9):
        others.append(task.apply_async((20, 5.0), queue=queue, **options))
        time.sleep(0.5)
    assert first.get(timeout=20) == 20
    time.sleep(1)
    started = recorder.started("close_campaign")
    assert [s["task_id"] for s in started] == [first.id]  # no second body
    (run,) = recorder.runs("close_campaign")
    assert run["lease_valid"] is True
    # dropped at execution, each with a result naming the task it duplicated
    assert all(dropped_onto(o) == first.id for o in others)


def test_max_running_two_never_runs_three(
    scenario_app: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    workers(concurrency=3)
    workers(concurrency=3)
    task = scenario_app.close_campaign
    options = {
        "dedup_lock": "while_executing",
        "dedup_max_running": 2,
        "dedup_on_conflict": "reschedule",
        "dedup_lock_ttl": 5,
    }
    results = [task.apply_async((21, 1.0), queue=queue, **options) for _ in range(6)]
    assert [r.get(timeout=60) for r in results] == [21] * 6
    runs = recorder.runs("close_campaign")
    assert len(runs) == 6
    assert max_overlap(runs) == 2  # six processes were free, two ran


def test_fence_tokens_increase_from_run_to_run(
    scenario_app: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    workers(concurrency=1)
    task = scenario_app.close_campaign
    for _ in range(3):
        assert task.apply_async((22, 0.01), queue=queue).get(timeout=20) == 22
    fences = [r["fence"] for r in recorder.runs("close_campaign")]
    assert len(fences) == 3
    assert all(isinstance(f, int) for f in fences)
    assert fences == sorted(set(fences))


@pytest.fixture
def dedup_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A second Redis, for the dedup keys only, that keeps them on disk."""
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    yield server
    server.stop()


def test_redis_lost_mid_body_is_reported_and_nothing_stays_held(
    scenario_app: Any,
    redis_server: RedisServer,
    dedup_redis: RedisServer,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    # Given the dedup keys live on their own Redis, and a 5 s body with a 1.5 s lease
    scenario_app.configure(redis_server.url(), dedup_redis.url())
    workers(concurrency=2, env={"DEDUP_TEST_DEDUP_REDIS_URL": dedup_redis.url()})
    task = scenario_app.close_campaign
    result = task.apply_async((23, 5.0), queue=queue, dedup_lock_ttl=1.5)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the body")
    # When that Redis goes away while the body runs
    dedup_redis.stop()
    # Then the body's lease is reported lost
    lost = wait_for(recorder.leases_lost, 10, "lease_lost")
    assert lost[0]["task_id"] == result.id  # type: ignore[index]
    # and the task is not reported a success
    wait_for(result.ready, 20, "the task to end")
    assert result.state == "FAILURE"
    assert isinstance(result.result, LockLostError)
    assert result.result.task_id == result.id
    (run,) = recorder.runs("close_campaign")
    assert run["lease_valid"] is False
    # and once Redis is back (with what it had saved), nothing of the key is held
    dedup_redis.start()
    client = dedup_redis.client()
    wait_for(lambda: held(client, task, (23, 5.0)) == FREE, 10, "the key to be free")
    again = task.apply_async((23, 0.1), queue=queue, dedup_lock_ttl=1.5)
    assert not again.deduplicated
    assert again.get(timeout=20) == 23
    client.close()
    scenario_app.configure(redis_server.url())


def test_redis_down_at_the_start_of_a_body_does_not_lose_the_task(
    scenario_app: Any,
    redis_server: RedisServer,
    dedup_redis: RedisServer,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    scenario_app.configure(redis_server.url(), dedup_redis.url())
    task = scenario_app.close_campaign
    # Given a task published while Redis was up
    result = task.apply_async((24, 0.1), queue=queue)
    dedup_redis.stop()
    # When a worker receives it while the dedup Redis is down
    workers(concurrency=1, env={"DEDUP_TEST_DEDUP_REDIS_URL": dedup_redis.url()})
    time.sleep(3)
    # Then it did not run unguarded, and is waiting, not lost
    assert recorder.started("close_campaign") == []
    assert result.state == "PENDING"
    # and it runs once Redis is back, and frees its key after
    dedup_redis.start()
    assert result.get(timeout=30) == 24
    assert len(recorder.runs("close_campaign")) == 1
    client = dedup_redis.client()
    wait_for(lambda: held(client, task, (24, 0.1)) == FREE, 10, "the key to be free")
    client.close()
    scenario_app.configure(redis_server.url())
    del redis_client


def test_a_worker_with_a_bad_setting_does_not_start(
    scenario_app: Any, workers: Callable[..., Worker]
) -> None:
    with pytest.raises(AssertionError, match="exited") as caught:
        workers(concurrency=1, conf={"dedup_lock": "sometimes"})
    assert "celery-dedup: dedup_lock: expected one of" in str(caught.value)


def test_a_worker_warns_about_a_risky_setting(
    scenario_app: Any, workers: Callable[..., Worker]
) -> None:
    worker = workers(concurrency=1, conf={"dedup_done_ttl": 60})
    assert "celery-dedup: dedup_done_ttl (60s) is shorter" in worker.log()


def test_a_body_sees_its_request_in_an_embedded_worker_and_in_apply(
    scenario_app: Any, recorder: Recorder, queue: str
) -> None:
    """A body sees its own request, as a plain task's does, however it runs:
    Celery before 5.5 pushed a bare request in ``Task.__call__``, which a
    DedupTask calls (a prefork worker's stack protection skips it)."""
    from celery.contrib.testing.worker import start_worker

    task = scenario_app.close_campaign
    with start_worker(
        scenario_app.app, pool="solo", queues=[queue], perform_ping_check=False
    ):
        # (no result: the worker thread's own backend client would be left
        # for the garbage collector to close)
        result = task.apply_async((23, 0.01), queue=queue, ignore_result=True)
        wait_for(lambda: recorder.runs("close_campaign"), 20, "the body")
    eager = task.apply((24, 0.01))
    assert eager.get() == 24
    leased, applied = recorder.runs("close_campaign")
    assert leased["task_id"] == result.id
    assert isinstance(leased["fence"], int)
    assert leased["lease_valid"] is True
    assert applied["task_id"] == eager.id
    assert applied["fence"] is None  # eager: no lease
