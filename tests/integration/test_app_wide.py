"""DedupTask as the app-wide default: only tasks that opt in deduplicate."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.apps import fleet_app
from tests.rig import Recorder, RedisServer, Worker, free_port, queue_length

pytestmark = pytest.mark.integration

APP = "tests.apps.fleet_app"


@pytest.fixture
def fleet(redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[Any]:
    fleet_app.configure(redis_server.url())
    yield fleet_app
    fleet_app.configure(redis_server.url())


def test_a_task_without_options_is_plain_celery(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    # Given the dedup Redis is unreachable: any dedup call would fail loudly
    dead = f"redis://127.0.0.1:{free_port()}/0"
    fleet_app.configure(redis_server.url(), dead)
    try:
        # When a task without dedup options is sent twice and run
        first = fleet_app.plain_job.apply_async((1,), queue=queue)
        second = fleet_app.plain_job.apply_async((1,), queue=queue)
        assert not first.deduplicated
        assert not second.deduplicated
        assert queue_length(redis_client, queue) == 2
        workers(concurrency=2, app_module=APP, env={"DEDUP_TEST_DEDUP_REDIS_URL": dead})
        # Then both ran, with no Redis call on either side
        assert first.get(timeout=20) == second.get(timeout=20) == 1
        assert len(recorder.runs("plain_job")) == 2
    finally:
        fleet_app.configure(redis_server.url())


@pytest.mark.parametrize("name", ["opted_job", "listed_job", "annotated_job"])
def test_a_task_that_opts_in_deduplicates(
    name: str, fleet: Any, redis_client: redis.Redis, queue: str
) -> None:
    task = getattr(fleet, name)
    first = task.apply_async((2,), queue=queue)
    again = task.apply_async((2,), queue=queue)
    assert not first.deduplicated
    assert again.deduplicated
    assert again.id == first.id
    assert queue_length(redis_client, queue) == 1
