"""install(app): messages and tasks that DedupTask.apply_async never sees."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu.exceptions import OperationalError

from celery_dedup import DedupTask, install, uninstall
from tests.apps import hooks_app
from tests.rig import ROOT, Recorder, RedisServer, Worker, dropped_onto, wait_for

pytestmark = pytest.mark.integration

APP = "tests.apps.hooks_app"


@pytest.fixture
def hooks(redis_server: RedisServer, recorder: Recorder) -> Iterator[Any]:
    hooks_app.configure(redis_server.url())
    install(hooks_app.app)
    yield hooks_app
    # Publish signals are global: keep its hook off other tests' publishes.
    uninstall(hooks_app.app)


def test_a_task_of_another_base_is_adopted(hooks: Any) -> None:
    task = hooks.app.tasks["tests.apps.hooks_app.vendor_job"]  # finalizes the app
    assert isinstance(task, DedupTask)
    assert isinstance(task, hooks.VendorTask)
    nightly = hooks.app.tasks["tests.apps.hooks_app.nightly"]
    assert nightly.dedup_options().lock == "until_expired"  # its entry's


def test_an_adopted_task_runs_one_body_at_a_time(
    hooks: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    workers(concurrency=3, app_module=APP)
    name = hooks.vendor_job.name
    first = hooks.app.send_task(name, (1, 2.0), queue=queue)
    wait_for(lambda: recorder.started("vendor_job"), 20, "the first body")
    second = hooks.app.send_task(name, (1, 2.0), queue=queue)
    assert first.get(timeout=20) == 1
    time.sleep(1)
    assert [s["task_id"] for s in recorder.started("vendor_job")] == [first.id]
    assert dropped_onto(second) == first.id  # dropped at execution (skip)


def test_send_task_is_claimed_at_publish_and_a_duplicate_dropped(
    hooks: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    name = hooks.nightly.name
    # Given an idempotency key (until_expired, 60 s), sent by name twice
    first = hooks.app.send_task(name, (7,), queue=queue)
    second = hooks.app.send_task(name, (7,), queue=queue)
    # When a worker runs the queue
    workers(concurrency=2, app_module=APP)
    assert first.get(timeout=20) == 7
    time.sleep(1)
    # Then the second, published marked as a duplicate, was dropped unrun
    assert [r["task_id"] for r in recorder.runs("nightly")] == [first.id]
    assert dropped_onto(second) == first.id


def test_a_publisher_without_celery_dedup_is_claimed_at_execution(
    redis_server: RedisServer,
    hooks: Any,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    code = (
        "import sys; from celery import Celery; "
        "app = Celery(broker=sys.argv[1]); "
        "print(app.send_task(sys.argv[2], (8,), queue=sys.argv[3]).id)"
    )
    argv = [sys.executable, "-c", code, redis_server.url(), hooks.nightly.name, queue]

    def publish() -> str:
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, check=True
        )
        assert "celery_dedup" not in done.stderr
        return done.stdout.strip()

    workers(concurrency=2, app_module=APP)
    first = publish()
    wait_for(lambda: recorder.runs("nightly"), 20, "the first run")
    second = publish()  # the same job again, inside its 60 s window
    time.sleep(2)
    assert [r["task_id"] for r in recorder.runs("nightly")] == [first]
    assert second != first


def test_a_publish_that_fails_leaves_only_a_short_claim(
    redis_server: RedisServer, redis_client: Any
) -> None:
    from celery import Celery

    from celery_dedup import install
    from celery_dedup.keys import make_key
    from tests.rig import free_port

    def claim_ttl(app: Any, n: int) -> int:
        key = make_key("ext.job", None, None, (n,), {})
        return int(redis_client.pttl(f"dedup:{{{key}}}:claim"))

    options = {
        "dedup_tasks": {"ext.job": {"dedup_lock": "until_expired", "dedup_ttl": 600}}
    }
    good = Celery("publisher", broker=redis_server.url(), set_as_current=False)
    good.conf.update(dedup_redis_url=redis_server.url(), **options)
    install(good)
    good.send_task("ext.job", (1,), queue="nobody")
    assert 590_000 < claim_ttl(good, 1) <= 600_000  # confirmed: its whole TTL

    broken = Celery("broken", set_as_current=False)
    broken.conf.update(
        broker_url=f"redis://127.0.0.1:{free_port()}/0",
        dedup_redis_url=redis_server.url(),
        broker_connection_timeout=1,
        **options,
    )
    install(broken)
    with pytest.raises(OperationalError):
        broken.send_task("ext.job", (2,), queue="nobody", retry=False)
    assert 0 < claim_ttl(broken, 2) <= 30_000  # never confirmed: gone soon
