"""S3 (seed 003): a monitor scheduled every second that takes three.

Enqueued every 1 s for 12 s, its body takes 3 s, on a worker with 3
processes: without celery-dedup the runs overlap and the queue grows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.rig import Recorder, Worker, max_overlap, queue_length, wait_for

pytestmark = pytest.mark.scenario


def test_never_two_at_once_and_no_backlog(
    scenario_app: Any,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    # Given a worker with 3 processes
    workers(concurrency=3)
    monitor = scenario_app.close_campaign
    # When the 3 s monitor is enqueued every second for 12 s
    backlog = []
    calls = []
    for _ in range(12):
        calls.append(monitor.apply_async((3, 3.0), queue=queue))
        time.sleep(1)
        backlog.append(queue_length(redis_client, queue))
    published = {c.id for c in calls if not c.deduplicated}
    wait_for(
        lambda: len(recorder.runs("close_campaign")) == len(published),
        20,
        "the published runs to finish",
    )
    runs = recorder.runs("close_campaign")
    # Then no two bodies ever ran at once
    assert max_overlap(runs) == 1
    # and the queue never held more than the one pending run
    assert max(backlog) <= 1
    # and the monitor kept running, back to back (12 s / 3 s per run)
    assert 3 <= len(runs) <= 5
