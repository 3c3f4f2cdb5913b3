"""Errors and logs name the real cause (issue 10), on real workers.

The dedup keys live on a Redis of their own, so the broker and the result
backend stay up while it is stopped or restarted.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_dedup.exceptions import BackendUnavailableError, LockLostError
from tests.rig import Recorder, RedisServer, Worker, free_port, held, wait_for
from tests.scenarios.test_redis_faults import on_dedup_redis, split

pytestmark = pytest.mark.scenario
__all__ = ["split"]  # a fixture, on this module's dedup_redis


@pytest.fixture
def dedup_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A second Redis, for the dedup keys only, that keeps nothing on disk
    (``split`` puts the app's dedup keys on it)."""
    workdir = tmp_path / "dedup-redis"
    workdir.mkdir()
    server = RedisServer(workdir)
    server.start()
    yield server
    server.stop()


def test_a_lease_lost_with_redis_data_says_so(
    split: Any,
    dedup_redis: RedisServer,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    # Given a body that runs, its lease renewed every half second
    workers(
        concurrency=1, conf={"dedup_lock_ttl": 1.5}, env=on_dedup_redis(dedup_redis)
    )
    result = split.close_campaign.apply_async((50, 4.0), queue=queue)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the body to start")
    # When the dedup Redis restarts without persistence under it
    dedup_redis.restart()
    # Then the task fails with LockLostError, which says Redis lost its data
    with pytest.raises(LockLostError) as lost:
        result.get(timeout=30, propagate=True)
    assert "its lease key vanished: Redis lost its data" in str(lost.value)
    assert "another execution" not in str(lost.value)


def test_a_lease_taken_over_says_so(
    split: Any,
    dedup_redis: RedisServer,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    client = dedup_redis.client()
    workers(
        concurrency=1, conf={"dedup_lock_ttl": 1.5}, env=on_dedup_redis(dedup_redis)
    )
    args = (51, 4.0)
    result = split.close_campaign.apply_async(args, queue=queue)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the body to start")
    # When an operator frees the lease by force (the fence is kept)
    key = split.close_campaign.dedup_key_for(args)
    client.delete(f"dedup:{{{key}}}:lease")
    with pytest.raises(LockLostError) as lost:
        result.get(timeout=30, propagate=True)
    assert "another execution holds the key, or the lease expired or was " in str(
        lost.value
    )
    client.close()


def test_redis_down_at_execution_is_one_line_per_reschedule(
    split: Any,
    dedup_redis: RedisServer,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    client = dedup_redis.client()
    args = (52, 0.01)
    # Given a call claimed while the dedup Redis was up
    result = split.close_campaign.apply_async(args, queue=queue)
    # When a worker receives it while that Redis is down
    dedup_redis.stop()
    worker = workers(
        concurrency=1, conf={"dedup_lock_ttl": 2}, env=on_dedup_redis(dedup_redis)
    )
    wait_for(lambda: len(recorder.delivered("close_campaign")) >= 3, 30, "redeliveries")
    dedup_redis.start()
    assert result.get(timeout=30) == 52
    # Then each delivery that could not take its lease logged one line, naming
    # a reschedule, not a retry; the republish it made logged nothing more
    log = worker.log()
    lines = [line for line in log.splitlines() if result.id in line]
    rescheduled = [line for line in lines if "Rescheduled" in line]
    deliveries = recorder.delivered("close_campaign")
    assert len(rescheduled) == len(deliveries) - 1, lines
    assert all("Redis unavailable" in line for line in rescheduled)
    assert not [line for line in lines if re.search(r"\bretr(y|ied|ying)\b", line)]
    assert "published without its claim" not in log
    assert held(client, split.close_campaign, args)["claim"] is None
    client.close()


def test_redis_unavailable_at_enqueue_names_the_server_password_masked(
    scenario_app: Any, redis_server: RedisServer
) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    scenario_app.configure(redis_server.url(), url)
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError) as down:
            scenario_app.close_campaign.apply_async((53,))
        assert time.monotonic() - started < 30
    finally:
        scenario_app.configure(redis_server.url())
    message = str(down.value)
    assert url.replace("s3cret", "**") in message
    assert "s3cret" not in message
    assert down.value.url == url.replace("s3cret", "**")
