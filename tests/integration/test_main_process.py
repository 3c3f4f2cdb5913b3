"""The worker's main process leaves every Redis call to its background thread.

Defect 13 of issue 9: ``DedupRequest`` and the revoke receiver called Redis
synchronously (5 s timeouts) on the consumer's thread, so a slow Redis
stalled the worker's main loop. Here real messages, taken from the real
broker, go through ``DedupRequest`` as the worker would build it, with every
``Store`` call recorded with the thread that made it.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery.worker import state as worker_state
from kombu.message import Message

from celery_dedup.connection import get_backend
from celery_dedup.lease import member
from celery_dedup.request import DedupRequest, on_revoked
from tests.rig import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def store_calls(scenario_app: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread ident of every ``Store`` call made from now on."""
    store = get_backend(scenario_app.app).store
    calls: list[int] = []

    def recording(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(threading.get_ident())
            return method(*args, **kwargs)

        return call

    for name in ("claim", "confirm", "release_claim", "acquire", "release", "read"):
        monkeypatch.setattr(store, name, recording(getattr(store, name)))
    return calls


@pytest.fixture
def take(scenario_app: Any) -> Iterator[Callable[[str], Message]]:
    """Take the next message off a queue of the real broker."""
    conn = scenario_app.app.connection_for_read()

    def take_one(queue: str) -> Message:
        simple = conn.SimpleQueue(queue, no_ack=True)
        message: Message = simple.get(timeout=5)
        return message

    yield take_one
    conn.release()


def request_for(scenario_app: Any, message: Message) -> DedupRequest:
    task = scenario_app.close_campaign
    return DedupRequest(message, app=scenario_app.app, task=task, hostname="w@rig")


def test_a_revoked_eta_message_is_freed_off_the_consumers_thread(
    scenario_app: Any,
    redis_client: redis.Redis,
    store_calls: list[int],
    take: Callable[[str], Message],
    queue: str,
) -> None:
    task = scenario_app.close_campaign
    result = task.apply_async((91,), queue=queue, countdown=60, dedup_ttl=600)
    claim = get_backend(scenario_app.app).store.names(result.dedup_key).claim
    store_calls.clear()
    # Given the worker holding the eta message
    request = request_for(scenario_app, take(queue))
    assert request.eta is not None
    # When it learns of the revoke
    worker_state.revoked.add(result.id)
    try:
        on_revoked(sender=task, request=request._context)
        # Then the claim is freed, by the background thread alone
        wait_for(lambda: redis_client.get(claim) is None, 5, "the claim's release")
    finally:
        worker_state.revoked.discard(result.id)
    assert store_calls
    assert threading.get_ident() not in store_calls


# Celery's Redis result backend stores the failure with redis-py's setex.
@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
def test_a_dead_childs_lease_is_freed_off_the_consumers_thread(
    scenario_app: Any,
    redis_client: redis.Redis,
    store_calls: list[int],
    take: Callable[[str], Message],
    queue: str,
) -> None:
    task = scenario_app.close_campaign
    result = task.apply_async((92,), queue=queue, dedup_ttl=600)
    store = get_backend(scenario_app.app).store
    names = store.names(result.dedup_key)
    request = request_for(scenario_app, take(queue))
    # Given a child process that took the lease and died
    child = subprocess.Popen(["true"])
    child.wait()
    store.acquire(
        result.dedup_key,
        member(result.id, request.hostname, child.pid, None),
        result.id,
        ttl=600,
        max_running=1,
        fence_ttl=600,
        free_claim=False,
    )
    request.worker_pid = child.pid
    store_calls.clear()
    # When the pool reports it lost
    try:
        raise WorkerLostError("killed")
    except WorkerLostError:
        request.on_failure(ExceptionInfo(), send_failed_event=False)
    # Then its lease and claim are freed, by the background thread alone
    wait_for(lambda: redis_client.zcard(names.lease) == 0, 5, "the lease's release")
    assert redis_client.get(names.claim) is None
    assert store_calls
    assert threading.get_ident() not in store_calls
