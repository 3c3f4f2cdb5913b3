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
