"""The dedup Redis fails under real workers (issue 9): nothing stays held, and
``dedup_enabled = False`` never asks Redis anything.

The dedup keys live on a Redis of their own (``dedup_redis``, kept on disk
across a restart), so the broker and the result backend stay up while it is
stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_dedup.request import process_gone
from tests.rig import (
    FREE,
    Recorder,
    RedisServer,
    Worker,
    held,
    queue_length,
    wait_for,
)

pytestmark = pytest.mark.scenario

#: Far longer than any wait below: a key freed at all is freed by a release.
DEDUP_TTL = 300


@pytest.fixture
def dedup_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A second Redis, for the dedup keys only, that keeps them on disk."""
    workdir = tmp_path / "dedup-redis"
    workdir.mkdir()
    server = RedisServer(workdir, persistent=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def split(
    scenario_app: Any, redis_server: RedisServer, dedup_redis: RedisServer
) -> Iterator[Any]:
    """The app of this process with its dedup keys on ``dedup_redis``."""
    scenario_app.configure(redis_server.url(), dedup_redis.url())
    yield scenario_app
    # dedup_enabled back to its default, for a test that turned it off here
    scenario_app.configure(redis_server.url(), dedup_enabled=True)


@pytest.fixture
def dedup_client(dedup_redis: RedisServer) -> Iterator[redis.Redis]:
    client = dedup_redis.client()
    yield client
    client.close()


def on_dedup_redis(dedup_redis: RedisServer) -> dict[str, str]:
    """The environment of a worker whose dedup keys are on ``dedup_redis``."""
    return {"DEDUP_TEST_DEDUP_REDIS_URL": dedup_redis.url()}


def done_marker(task: Any, args: tuple[Any, ...], task_id: str) -> str:
    return f"dedup:{{{task.dedup_key_for(args)}}}:done:{task_id}"


def logged(worker: Worker, text: str) -> Callable[[], bool]:
    return lambda: text in worker.log()


# -- dedup_on_redis_error = "proceed" ------------------------------------------


# Guards: a body run unguarded (ACQUIRE raised, "proceed") never released its
# claim nor recorded completion, so the key stayed held until dedup_ttl.
@pytest.mark.parametrize("lock", ["until_executed", "until_executing"])
def test_a_body_run_unguarded_frees_its_claim_once_redis_is_back(
    lock: str,
    split: Any,
    dedup_redis: RedisServer,
    dedup_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    task = split.close_campaign
    args = (40, 0.2)
    options = {"dedup_lock": lock, "dedup_ttl": DEDUP_TTL}
    # Given a call claimed its key while the dedup Redis was up
    result = task.apply_async(args, queue=queue, **options)
    assert held(dedup_client, task, args)["claim"] == result.id.encode()
    # When a worker that proceeds without Redis runs it while Redis is down
    dedup_redis.stop()
    worker = workers(
        concurrency=1,
        conf={"dedup_on_redis_error": "proceed"},
        env=on_dedup_redis(dedup_redis),
    )
    assert result.get(timeout=30) == 40
    assert "runs without its lease" in worker.log()
    # and Redis comes back (with what it had saved)
    dedup_redis.start()
    # Then the claim is freed, and the success remembered, long before dedup_ttl
    wait_for(lambda: held(dedup_client, task, args) == FREE, 20, "the key to be free")
    assert dedup_client.exists(done_marker(task, args, result.id))
    assert [r["task_id"] for r in recorder.runs("close_campaign")] == [result.id]
    # and an identical call is published, not deduplicated, and runs
    again = task.apply_async(args, queue=queue, **options)
    assert not again.deduplicated
    assert again.id != result.id
    assert again.get(timeout=30) == 40
    assert len(recorder.runs("close_campaign")) == 2


# -- dedup_enabled = False: the kill switch --------------------------------------


# Guards: a per-call dedup_* option turned dedup back on at enqueue under
# dedup_enabled=False (a claim asked of Redis: BackendUnavailableError).
def test_disabled_a_call_with_a_dedup_option_publishes_without_redis(
    split: Any,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    dedup_redis: RedisServer,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    split.configure(redis_server.url(), dedup_redis.url(), dedup_enabled=False)
    task = split.close_campaign
    dedup_redis.stop()
    # When the same call, with a dedup_* option, is made twice, Redis down
    first = task.apply_async((41, 0.01), queue=queue, dedup_ttl=60)
    second = task.apply_async((41, 0.01), queue=queue, dedup_ttl=60)
    # Then both are published, as plain Celery calls
    assert not first.deduplicated and not second.deduplicated
    assert first.id != second.id
    assert queue_length(redis_client, queue) == 2
    # and a worker with dedup disabled runs both
    workers(
        concurrency=1, conf={"dedup_enabled": False}, env=on_dedup_redis(dedup_redis)
    )
    assert [first.get(timeout=30), second.get(timeout=30)] == [41, 41]
    runs = recorder.runs("close_campaign")
    assert sorted(r["task_id"] for r in runs) == sorted([first.id, second.id])


# Guards: a stamped message still ran under dedup in a dedup_enabled=False
# worker (ACQUIRE against the down Redis: rescheduled every 5 s, never run).
def test_disabled_a_worker_runs_a_stamped_message_as_plain_celery(
    split: Any,
    dedup_redis: RedisServer,
    dedup_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    task = split.close_campaign
    args = (42, 0.01)
    # Given a message stamped (and its key claimed) by an enabled publisher
    result = task.apply_async(args, queue=queue, dedup_ttl=DEDUP_TTL)
    assert held(dedup_client, task, args)["claim"] == result.id.encode()
    # When a worker with dedup disabled receives it, the dedup Redis down
    dedup_redis.stop()
    worker = workers(
        concurrency=1, conf={"dedup_enabled": False}, env=on_dedup_redis(dedup_redis)
    )
    # Then it runs at once, once, delivered once: no reschedule loop
    assert result.get(timeout=20) == 42
    assert [r["task_id"] for r in recorder.runs("close_campaign")] == [result.id]
    assert recorder.delivered("close_campaign") == [result.id]
    assert "Rescheduled" not in worker.log()
    assert "Redis unavailable" not in worker.log()


# -- a deferred release at process exit ----------------------------------------


# Guards: a release that failed was retried only by the daemon thread, which
# died with the child (max_tasks_per_child=1): the key stayed held to its TTLs.
def test_a_failed_release_is_done_before_the_child_exits(
    split: Any,
    dedup_redis: RedisServer,
    dedup_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    worker = workers(
        concurrency=1,
        conf={"worker_max_tasks_per_child": 1},
        env=on_dedup_redis(dedup_redis),
    )
    task = split.close_campaign
    args = (43, 3.0)
    result = task.apply_async(args, queue=queue, dedup_ttl=DEDUP_TTL)
    # Given the body runs under its lease (60 s) and claim (300 s)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the body")
    (started,) = recorder.started("close_campaign")
    assert held(dedup_client, task, args) == {"claim": result.id.encode(), "lease": 1}
    # When the dedup Redis is down as the body ends, so that its release fails
    dedup_redis.stop()
    wait_for(logged(worker, "Could not release"), 20, "the failed release")
    assert result.get(timeout=10) == 43
    # and is back within the child's last seconds (it exits after one task)
    dedup_redis.start()
    # Then the child gave the key back before it exited
    wait_for(lambda: held(dedup_client, task, args) == FREE, 20, "the key to be free")
    assert dedup_client.exists(done_marker(task, args, result.id))
    wait_for(lambda: process_gone(started["pid"]), 20, "the child to exit")
    assert "not done at exit" not in worker.log()
    assert [r["task_id"] for r in recorder.runs("close_campaign")] == [result.id]
