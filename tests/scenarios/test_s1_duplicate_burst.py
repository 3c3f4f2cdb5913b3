"""S1 (seed 000): one job enqueued 30 times in 3 s by 3 processes.

The seed's event was published 30+ times in 3 seconds because the same job was
added again and again and run in parallel. Replayed here with 3 client
processes (10 calls each over 3 s) and 2 prefork workers of concurrency 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.rig import (
    ROOT,
    Recorder,
    RedisServer,
    Worker,
    max_overlap,
    queue_length,
    wait_for,
)

pytestmark = pytest.mark.scenario

TASK = "tests.apps.scenario_app.close_campaign"


def burst(
    server: RedisServer,
    queue: str,
    options: dict[str, Any],
    *,
    task: str = TASK,
    args: list[Any] | None = None,
) -> list[dict[str, Any]]:
    """3 client processes, each 10 identical apply_async calls over 3 s."""
    start_at = time.time() + 1.5  # all three import Celery first, then fire together
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DEDUP_TEST_REDIS_URL": server.url()}
    argv = [
        task,
        json.dumps(args or [75]),
        json.dumps({"queue": queue, **options}),
        "10",
        "3",
    ]
    clients = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.apps.client", *argv, str(start_at)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    calls = []
    for client in clients:
        out, _ = client.communicate(timeout=60)
        assert client.returncode == 0
        calls += [json.loads(line) for line in out.splitlines()]
    assert len(calls) == 30
    return calls


def test_default_lock_never_runs_two_at_once(
    scenario_app: Any,
    redis_server: RedisServer,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    # Given 2 workers with 3 processes each, ready to run the job in parallel
    workers(concurrency=3)
    workers(concurrency=3)
    # When 3 processes enqueue the same 0.5 s job 30 times over 3 s
    calls = burst(redis_server, queue, {})
    # Then the bodies that ran never overlapped
    published = {c["id"] for c in calls if not c["deduplicated"]}
    wait_for(
        lambda: len(recorder.runs("close_campaign")) == len(published),
        30,
        "every published task to run",
    )
    runs = recorder.runs("close_campaign")
    assert max_overlap(runs) == 1
    # and far fewer than 30 ran: each one only after the one before finished
    assert 1 <= len(runs) <= 8
    assert sum(c["deduplicated"] for c in calls) >= 22
    # and every deduplicated call was handed a task that was published
    assert {c["id"] for c in calls} == published


def test_an_idempotency_key_publishes_once_and_runs_once(
    scenario_app: Any,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    # Given the seed's intent: an idempotency key held for 60 s
    options = {"dedup_lock": "until_expired", "dedup_ttl": 60}
    # When 3 processes enqueue the job 30 times over 3 s, with no worker yet
    calls = burst(redis_server, queue, options)
    # Then exactly 1 message landed in the broker queue
    assert queue_length(redis_client, queue) == 1
    assert len({c["id"] for c in calls}) == 1
    assert sum(not c["deduplicated"] for c in calls) == 1
    # and once workers run, it executes exactly once, also after more calls
    workers(concurrency=3)
    workers(concurrency=3)
    wait_for(lambda: recorder.runs("close_campaign"), 30, "the execution")
    late = burst(redis_server, queue, options)
    assert all(c["deduplicated"] for c in late)
    time.sleep(1)
    assert len(recorder.runs("close_campaign")) == 1
