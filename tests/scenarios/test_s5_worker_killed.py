"""S5: the process running a task is killed mid-body (SIGKILL, OOM).

With ``task_acks_late`` and ``task_reject_on_worker_lost`` the message goes
back to the queue; the dead process's lease must not keep it from running.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from celery_dedup.connection import get_backend
from tests.rig import Recorder, Worker, wait_for

pytestmark = pytest.mark.scenario

LOCK_TTL = 10


def test_the_task_survives_and_the_key_is_free_again(
    scenario_app: Any,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    conf = {"task_acks_late": True, "task_reject_on_worker_lost": True}
    workers(concurrency=2, conf=conf)
    task = scenario_app.close_campaign
    result = task.apply_async((5, 4.0), queue=queue, dedup_lock_ttl=LOCK_TTL)
    # Given the body is 2 s into its run
    first = wait_for(lambda: recorder.started("close_campaign"), 20, "the start")
    time.sleep(2)
    # When the process running it is killed
    os.kill(first[0]["pid"], signal.SIGKILL)  # type: ignore[index]
    killed_at = time.time()
    # Then the task is run again, well within the lease TTL of the kill
    wait_for(lambda: len(recorder.started("close_campaign")) == 2, 30, "a rerun")
    restarted = recorder.started("close_campaign")[1]
    assert restarted["task_id"] == result.id
    assert result.get(timeout=30) == 5
    runs = recorder.runs("close_campaign")
    assert [r["task_id"] for r in runs] == [result.id]  # completed exactly once
    assert runs[0]["start"] - killed_at < LOCK_TTL
    # and nothing of the key is held afterwards: a new call is accepted
    backend = get_backend(scenario_app.app)
    key = task.dedup_key_for((5, 4.0))
    assert redis_client.zcard(backend.store.names(key).lease) == 0
    again = task.apply_async((5, 4.0), queue=queue, dedup_lock_ttl=LOCK_TTL)
    assert not again.deduplicated
    assert again.get(timeout=30) == 5
