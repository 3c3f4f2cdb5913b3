"""celery-dedup's own signals fire once per event, with their arguments."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from celery_dedup import signals

pytestmark = pytest.mark.integration


def test_task_deduplicated_at_enqueue(
    scenario_app: Any, redis_client: redis.Redis, queue: str
) -> None:
    seen: list[dict[str, Any]] = []

    def receiver(**kwargs: Any) -> None:
        seen.append(kwargs)

    signals.task_deduplicated.connect(receiver, weak=False)
    try:
        task = scenario_app.close_campaign
        first = task.apply_async((40,), queue=queue)
        task.apply_async((40,), queue=queue)
        task.apply_async((41,), queue=queue)  # another job: no signal
    finally:
        signals.task_deduplicated.disconnect(receiver)
    assert seen == [
        {
            "signal": signals.task_deduplicated,
            "sender": task.name,
            "key": task.dedup_key_for((40,)),
            "task_id": None,
            "existing_task_id": first.id,
            "stage": "enqueue",
        }
    ]


def test_lease_acquired_and_released_once_per_execution(
    scenario_app: Any,
    workers: Any,
    recorder: Any,
    queue: str,
) -> None:
    import json

    workers(concurrency=1)
    task = scenario_app.close_campaign
    result = task.apply_async((42, 0.05), queue=queue)
    assert result.get(timeout=20) == 42
    seen = [json.loads(item) for item in recorder.client.lrange("signals", 0, -1)]
    key = task.dedup_key_for((42, 0.05))
    (run,) = recorder.runs("close_campaign")
    assert seen == [
        [
            "lease_acquired",
            task.name,
            {"key": key, "task_id": result.id, "token": run["fence"]},
        ],
        [
            "lease_released",
            task.name,
            {"key": key, "task_id": result.id, "held": True, "outcome": "success"},
        ],
    ]
