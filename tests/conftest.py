"""Fixtures shared by every test folder.

Unit tests use Celery's own ``celery.contrib.pytest`` fixtures (``celery_app``,
``celery_config``) with the in-memory broker. Integration and scenario tests
use the rig: one private ``redis-server`` per session, flushed before each
test, and real ``celery worker`` processes started per test.
"""

from __future__ import annotations

import gc
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.redis_topologies import Cluster
from tests.rig import Recorder, RedisServer, Worker

pytest_plugins = ("celery.contrib.pytest",)

APP_MODULE = "tests.apps.scenario_app"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A Redis Cluster of three masters, one per test module that asks."""
    started = Cluster(masters=3).start()
    yield started
    started.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """db 0 (broker and dedup keys), flushed with every db before the test."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()  # a test stopped it
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def scenario_app(redis_server: RedisServer, redis_client: redis.Redis) -> Any:
    from tests.apps import scenario_app

    scenario_app.configure(redis_server.url())
    return scenario_app


@pytest.fixture
def queue() -> str:
    return f"q-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def workers(
    redis_server: RedisServer, queue: str, tmp_path: Path
) -> Iterator[Callable[..., Worker]]:
    """Start real worker processes on the test's queue; all stopped at the end."""
    started: list[Worker] = []

    def start(
        concurrency: int = 3,
        conf: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        app_module: str = APP_MODULE,
        queue_name: str | None = None,
        **kwargs: Any,
    ) -> Worker:
        worker = Worker(
            app_module,
            queue_name or queue,
            {
                "DEDUP_TEST_REDIS_URL": redis_server.url(),
                "DEDUP_TEST_QUEUE": queue,
                "DEDUP_TEST_CONF": json.dumps(conf or {}),
                **(env or {}),
            },
            tmp_path,
            name=f"w{len(started) + 1}-{queue}",
            concurrency=concurrency,
            **kwargs,
        )
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def recorder(
    redis_server: RedisServer, redis_client: redis.Redis
) -> Iterator[Recorder]:
    """What the task bodies recorded (db 2), read by the test."""
    client = redis_server.client(2)
    yield Recorder(client)
    client.close()


@pytest.fixture(autouse=True)
def _collect_results() -> Iterator[None]:
    """Collect a test's results while its Redis still runs: on Celery 5.3 a
    result collected later reconnects to a stopped server from ``__del__``."""
    yield
    gc.collect()
