"""Every way a body can end gives its key back: nothing stays held."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from celery_dedup import DuplicateTaskError
from celery_dedup.connection import get_backend
from tests.rig import FREE, Recorder, Worker, held, max_overlap, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("how", ["soft", "hard", "reject", "ignore"])
def test_the_key_is_free_after_the_body_ends(
    how: str,
    scenario_app: Any,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    workers(concurrency=2)
    task = scenario_app.ending
    result = task.apply_async((how,), queue=queue, dedup_lock_ttl=30)
    wait_for(lambda: recorder.started("ending"), 20, "the body to start")
    # well before the 30 s lease or the 3600 s claim would expire
    wait_for(
        lambda: held(get_backend(scenario_app.app).redis, task, (how,)) == FREE,
        10,
        "release",
    )
    again = task.apply_async((how,), queue=queue, dedup_lock_ttl=30)
    assert not again.deduplicated
    assert again.id != result.id


def test_a_warm_shutdown_lets_the_body_finish_and_release(
    scenario_app: Any,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    worker = workers(concurrency=2)
    task = scenario_app.close_campaign
    result = task.apply_async((30, 2.0), queue=queue)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the body to start")
    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)  # warm shutdown
    worker.process.wait(30)
    assert result.get(timeout=5) == 30
    assert held(get_backend(scenario_app.app).redis, task, (30, 2.0)) == FREE


def test_raise_at_execution_fails_the_second_body(
    scenario_app: Any,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    workers(concurrency=2)
    task = scenario_app.close_campaign
    options = {"dedup_lock": "while_executing", "dedup_on_conflict": "raise"}
    first = task.apply_async((31, 2.0), queue=queue, **options)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the first body")
    second = task.apply_async((31, 2.0), queue=queue, **options)
    with pytest.raises(DuplicateTaskError) as caught:
        second.get(timeout=20)
    assert caught.value.existing_task_id == first.id
    assert first.get(timeout=20) == 31
    assert len(recorder.started("close_campaign")) == 1


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_other_pools_keep_one_body_per_key(
    pool: str,
    scenario_app: Any,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    workers(concurrency=3 if pool == "threads" else 1, pool=pool)
    workers(concurrency=3 if pool == "threads" else 1, pool=pool)
    task = scenario_app.close_campaign
    options = {
        "dedup_lock": "while_executing",
        "dedup_on_conflict": "reschedule",
        "dedup_lock_ttl": 5,
    }
    results = [task.apply_async((32, 0.5), queue=queue, **options) for _ in range(4)]
    assert [r.get(timeout=60) for r in results] == [32] * 4
    runs = recorder.runs("close_campaign")
    assert len(runs) == 4
    assert max_overlap(runs) == 1
    fences = [r["fence"] for r in sorted(runs, key=lambda r: r["start"])]
    assert fences == sorted(set(fences))
    time.sleep(0.2)
    assert held(get_backend(scenario_app.app).redis, task, (32, 0.5)) == FREE


def test_terminating_a_running_task_frees_its_key(
    scenario_app: Any,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    workers(concurrency=2)
    task = scenario_app.close_campaign
    result = task.apply_async((33, 30.0), queue=queue, dedup_lock_ttl=60)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the body to start")
    scenario_app.app.control.revoke(result.id, terminate=True, signal="SIGKILL")
    wait_for(
        lambda: held(get_backend(scenario_app.app).redis, task, (33, 30.0)) == FREE,
        10,
        "release",
    )
    assert result.state == "REVOKED"


def test_a_task_id_that_already_succeeded_is_not_published_again(
    scenario_app: Any,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    queue: str,
) -> None:
    workers(concurrency=1)
    task = scenario_app.close_campaign
    done = task.apply_async((34, 0.01), queue=queue, task_id="order-34")
    assert done.get(timeout=20) == 34
    again = task.apply_async((34, 0.01), queue=queue, task_id="order-34")
    assert again.deduplicated
    assert again.get(timeout=5) == 34  # the existing result
    assert held(get_backend(scenario_app.app).redis, task, (34, 0.01)) == FREE
