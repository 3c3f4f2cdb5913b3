"""S7: a revoked or expired task must not keep its key forever."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from celery_dedup.connection import get_backend
from tests.rig import Recorder, Worker, wait_for

pytestmark = pytest.mark.scenario


def test_revoking_a_queued_task_frees_its_key(
    scenario_app: Any,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    task = scenario_app.close_campaign
    backend = get_backend(scenario_app.app)
    claim = backend.store.names(task.dedup_key_for((71, 0.1))).claim
    # Given a busy worker, and a task queued behind the running one
    workers(concurrency=1)
    busy = task.apply_async((70, 3.0), queue=queue)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the busy task")
    queued = task.apply_async((71, 0.1), queue=queue, dedup_ttl=600)
    assert backend.redis.get(claim) == queued.id.encode()
    # When it is revoked
    scenario_app.app.control.revoke(queued.id)
    # Then once the worker reaches it, its claim is gone (not after 600 s)
    busy.get(timeout=20)
    wait_for(lambda: backend.redis.get(claim) is None, 10, "the claim's release")
    assert queued.id not in [r["task_id"] for r in recorder.started("close_campaign")]
    again = task.apply_async((71, 0.1), queue=queue)
    assert not again.deduplicated
    assert again.get(timeout=20) == 71


def test_an_expired_task_frees_its_key(
    scenario_app: Any,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    task = scenario_app.close_campaign
    workers(concurrency=1)
    busy = task.apply_async((72, 3.0), queue=queue)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the busy task")
    # a task that expires before the worker gets to it
    expiring = task.apply_async((73, 0.1), queue=queue, expires=1, dedup_ttl=600)
    busy.get(timeout=20)
    time.sleep(1)
    assert expiring.state == "REVOKED"
    assert expiring.id not in [r["task_id"] for r in recorder.started("close_campaign")]
    again = task.apply_async((73, 0.1), queue=queue)
    assert not again.deduplicated
    assert again.get(timeout=20) == 73
