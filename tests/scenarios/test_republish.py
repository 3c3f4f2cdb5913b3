"""A republish of the same task id keeps its claim and is never deduplicated:
Celery 5.7's ``task_retry_on_worker_lost``, and ``self.replace()`` by the
same call of the task."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import celery
import pytest
import redis

from tests.rig import FREE, Recorder, Worker, held, wait_for

pytestmark = pytest.mark.scenario

APP = "tests.apps.canvas_app"


@pytest.fixture
def canvas(scenario_app: Any) -> Any:
    from tests.apps import canvas_app

    return canvas_app


def celery_version() -> tuple[int, ...]:
    return tuple(int(part) for part in celery.__version__.split(".")[:2])


@pytest.mark.skipif(
    celery_version() < (5, 7),
    reason=f"task_retry_on_worker_lost came with Celery 5.7 ({celery.__version__})",
)
def test_a_task_retried_after_its_process_was_lost_runs_once_and_frees_its_key(
    canvas: Any,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    # Given a worker that retries a task whose process is lost (no acks_late:
    # the main process republishes it, 0.5 s later)
    workers(concurrency=2, app_module=APP, conf={"task_retry_on_worker_lost": True})
    task = canvas.survivor
    result = task.apply_async((3, 3.0), queue=queue)
    first = wait_for(lambda: recorder.started("survivor"), 20, "the body")
    # When its process is killed mid-body
    os.kill(first[0]["pid"], signal.SIGKILL)  # type: ignore[index]
    # Then the task is republished and runs to completion, once
    assert result.get(timeout=60) == 3
    assert result.state == "SUCCESS"
    started = recorder.started("survivor")
    assert [s["task_id"] for s in started] == [result.id, result.id]
    assert [r["task_id"] for r in recorder.runs("survivor")] == [result.id]
    # and its key is free afterwards: a later call is not deduplicated onto it
    wait_for(lambda: held(redis_client, task, (3, 3.0)) == FREE, 10, "a free key")
    again = task.apply_async((3, 0.1), queue=queue)
    assert not again.deduplicated
    assert again.get(timeout=30) == 3


def test_a_replacement_by_the_same_call_keeps_the_claim_until_it_ran(
    canvas: Any,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    workers(concurrency=2, app_module=APP)
    task = canvas.handover
    # Given a body that replaced itself by the same call, published 3 s later
    result = task.apply_async((4, 1, 3.0), queue=queue)
    wait_for(lambda: recorder.started("handover"), 20, "the first body")
    time.sleep(0.5)
    # When the same job is called while the replacement waits
    duplicate = task.apply_async((4, 0), queue=queue)
    # Then it is deduplicated onto the replacement (the claim was kept)
    assert duplicate.deduplicated
    assert duplicate.id == result.id
    # and the replacement runs, under the task's id, once
    assert result.get(timeout=60) == 4
    assert [r["task_id"] for r in recorder.runs("handover")] == [result.id]
    # and after it the key is free
    wait_for(lambda: held(redis_client, task, (4,)) == FREE, 10, "a free key")
    again = task.apply_async((4, 0), queue=queue)
    assert not again.deduplicated
    assert again.get(timeout=30) == 4
