"""Regression tests of issue 9's seams with Celery, on real workers.

Each test names the defect it guards; each failed before its fix.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery.signals import after_task_publish

from celery_dedup import install, uninstall
from tests.apps import hooks_app
from tests.integration import outbox_fixtures
from tests.rig import (
    FREE,
    Recorder,
    RedisServer,
    Worker,
    dropped_onto,
    held,
    queue_length,
    wait_for,
)
from tests.scenarios.test_s1_outbox import outbox

pytestmark = pytest.mark.scenario
postgres_url = outbox_fixtures.postgres_url
__all__ = ["outbox"]

CANVAS = "tests.apps.canvas_app"
HOOKS = "tests.apps.hooks_app"


@pytest.fixture
def canvas(scenario_app: Any) -> Any:
    from tests.apps import canvas_app

    return canvas_app


@pytest.fixture
def hooks(redis_server: RedisServer) -> Iterator[Any]:
    hooks_app.configure(redis_server.url())
    install(hooks_app.app)
    yield hooks_app
    uninstall(hooks_app.app)


# Defect 2: a redelivery of a succeeded until_expired task freed its key.
def test_a_redelivery_after_success_keeps_the_idempotency_window(
    scenario_app: Any,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    task = scenario_app.close_campaign
    options = {"queue": queue, "dedup_lock": "until_expired", "dedup_ttl": 600}
    # Given an idempotency key's message, as the broker holds it
    first = task.apply_async((31, 0.05), **options)
    message = redis_client.lindex(queue, 0)
    assert message is not None
    # that ran to success
    workers(concurrency=1)
    assert first.get(timeout=20) == 31
    # When the broker delivers it again (its ack was lost)
    redis_client.lpush(queue, message)
    wait_for(
        lambda: recorder.delivered("close_campaign").count(first.id) == 2,
        20,
        "the second delivery",
    )
    # Then it did not run again, and the key still holds for its window
    assert [r["task_id"] for r in recorder.runs("close_campaign")] == [first.id]
    wait_for(lambda: queue_length(redis_client, queue) == 0, 10, "an empty queue")
    assert held(redis_client, task, (31, 0.05))["claim"] == first.id.encode()
    again = task.apply_async((31, 0.05), **options)
    assert again.deduplicated and again.id == first.id


# Defect 6: install(app)'s after-publish confirm re-created a freed claim.
def test_a_confirm_after_the_body_started_does_not_claim_again(
    hooks: Any,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    workers(concurrency=1, app_module=HOOKS)
    task_name = hooks.handoff.name

    def body_started(headers: Any = None, **_: Any) -> None:
        # A slow publisher: its worker starts the body (and frees the
        # until_executing claim) before celery-dedup's confirm runs.
        if headers and headers.get("task") == task_name:
            wait_for(lambda: recorder.started("handoff"), 20, "the body to start")

    # Connected before celery-dedup's own receiver, so it runs first.
    uninstall(hooks.app)
    after_task_publish.connect(body_started, weak=False, dispatch_uid="slow")
    install(hooks.app)
    try:
        first = hooks.app.send_task(task_name, (41,), queue=queue)
    finally:
        after_task_publish.disconnect(dispatch_uid="slow")
    assert held(redis_client, hooks.handoff, (41,))["claim"] is None
    second = hooks.app.send_task(task_name, (41,), queue=queue)
    assert first.get(timeout=20) == 41
    assert second.get(timeout=20) == 41
    assert [r["task_id"] for r in recorder.runs("handoff")] == [first.id, second.id]


# Defect 12: send_task of a base=DedupTask task was not stamped by install().
def test_send_task_of_a_dedup_task_is_deduplicated_without_an_entry(
    hooks: Any,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    name = hooks.report.name
    assert name not in hooks.app.conf.dedup_tasks
    first = hooks.app.send_task(name, (5, 0.1), queue=queue)
    assert held(redis_client, hooks.report, (5, 0.1))["claim"] == first.id.encode()
    second = hooks.app.send_task(name, (5, 0.1), queue=queue)
    workers(concurrency=2, app_module=HOOKS)
    assert first.get(timeout=20) == 5
    assert dropped_onto(second) == first.id
    assert [r["task_id"] for r in recorder.runs("report")] == [first.id]


# Defect 15: a revoked countdown task kept its key until its eta.
@pytest.mark.parametrize("how", ["result", "control"])
def test_revoking_a_countdown_task_frees_its_key_long_before_its_eta(
    scenario_app: Any,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
    how: str,
) -> None:
    task = scenario_app.close_campaign
    workers(concurrency=1)
    # Given a task due in 60 s, held by the worker until then
    late = task.apply_async((51, 0.1), queue=queue, countdown=60, dedup_ttl=600)
    wait_for(
        lambda: queue_length(redis_client, queue) == 0, 20, "the worker to hold it"
    )
    assert held(redis_client, task, (51, 0.1))["claim"] == late.id.encode()
    # When it is revoked
    if how == "result":
        late.revoke()
    else:
        scenario_app.app.control.revoke(late.id)
    # Then its key is free within seconds, not at the eta
    wait_for(lambda: held(redis_client, task, (51, 0.1)) == FREE, 10, "a free key")
    again = task.apply_async((51, 0.1), queue=queue)
    assert not again.deduplicated
    assert again.get(timeout=20) == 51
    assert late.id not in recorder.delivered("close_campaign")


# Defect 16: typing=False and pickled arguments failed at the caller.
def test_an_untyped_task_with_wrong_arguments_fails_in_the_worker(
    canvas: Any, workers: Callable[..., Worker], queue: str
) -> None:
    workers(concurrency=1, app_module=CANVAS)
    result = canvas.untyped.apply_async((5,), queue=queue)  # b is missing
    with pytest.raises(TypeError):
        result.get(timeout=20)
    assert canvas.untyped.apply_async((5, 6), queue=queue).get(timeout=20) == 11


def test_a_while_executing_key_is_computed_only_where_it_runs(
    canvas: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    workers(concurrency=1, app_module=CANVAS)
    canvas.KEYED_IN.clear()
    result = canvas.keyed_late.apply_async((3,), queue=queue)
    assert result.get(timeout=20) == 3
    assert os.getpid() not in canvas.KEYED_IN
    assert len(recorder.runs("keyed_late")) == 1


def test_a_pickled_exception_argument_is_keyed_and_runs(
    canvas: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    # A root worker refuses pickle unless forced (the test machine is root).
    workers(
        concurrency=1,
        app_module=CANVAS,
        conf={"accept_content": ["json", "pickle"]},
        env={"C_FORCE_ROOT": "1"},
    )
    error = ValueError(f"bad row {uuid.uuid4().hex[:6]}")
    first = canvas.pickled.apply_async((error,), queue=queue)
    second = canvas.pickled.apply_async((ValueError(*error.args),), queue=queue)
    assert second.deduplicated and second.id == first.id
    assert first.get(timeout=20) == repr(error)
    assert [r["task_id"] for r in recorder.runs("pickled")] == [first.id]


# Defect 5: with dedup_max_running > 1, the older of two live bodies could
# not commit its event once the newer one had written.
def test_two_bodies_allowed_at_once_both_commit_their_events(
    scenario_app: Any,
    outbox: Any,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
    postgres_url: str,
) -> None:
    conf = {"dedup_outbox_url": postgres_url, "dedup_outbox_table": outbox.table_name}
    workers(concurrency=2, conf=conf)
    task = scenario_app.write_report
    # Given a body that took its lease first and writes last
    older = task.apply_async((1,), {"after": 2}, queue=queue)
    wait_for(lambda: recorder.started("write_report"), 20, "the older body")
    # When a second body, allowed beside it, writes first
    newer = task.apply_async((2,), queue=queue)
    assert newer.get(timeout=20) is True
    # Then the older one commits too
    assert older.get(timeout=30) is True
    runs = recorder.runs("write_report")
    assert sorted(r["task_id"] for r in runs) == sorted([older.id, newer.id])
    assert runs[0]["task_id"] == newer.id
    with outbox.engine.connect() as conn:
        aggregates = conn.execute(
            outbox.table.select().with_only_columns(outbox.table.c.aggregate_id)
        ).scalars()
        assert sorted(aggregates) == ["report:1", "report:2"]
