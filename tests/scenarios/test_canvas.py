"""Workflows whose members share a dedup key: chain, group, chord, link.

A workflow waits for each member's own result, so a member is never
deduplicated away: it is published even when its key is held, and waits at
execution until the key is free. Never two bodies of one key at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery, chain, chord, group

from celery_dedup import install, uninstall
from tests.rig import Recorder, RedisServer, Worker, max_overlap, wait_for

pytestmark = pytest.mark.scenario

APP = "tests.apps.canvas_app"
HOOKS = "tests.apps.hooks_app"


@pytest.fixture
def canvas(scenario_app: Any) -> Any:
    from tests.apps import canvas_app

    return canvas_app


def test_a_chain_whose_first_key_is_held_completes(
    canvas: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    workers(concurrency=2, app_module=APP)
    # Given member(1) is claimed and running, from a plain call
    plain = canvas.member.apply_async((1, 1.5), queue=queue)
    wait_for(lambda: recorder.started("member"), 20, "the plain call's body")
    # When a chain starts with the same call
    workflow = chain(canvas.member.s(1, 0.1), canvas.after.s()).apply_async(queue=queue)
    # Then it completes with its own result, after the plain call's body
    assert workflow.get(timeout=60) == ["after", 1]
    assert plain.get(timeout=10) == 1
    runs = recorder.runs("member")
    assert len(runs) == 2
    assert max_overlap(runs) == 1


def test_a_chord_with_duplicate_header_members_fires_with_every_result(
    canvas: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    workers(concurrency=3, app_module=APP)
    header = [canvas.member.s(5), canvas.member.s(5), canvas.member.s(6)]
    result = chord(header, canvas.after.s()).apply_async(queue=queue)
    assert result.get(timeout=60) == ["after", [5, 5, 6]]
    fives = [r for r in recorder.runs("member") if r["value"] == 5]
    assert len(fives) == 2
    assert max_overlap(fives) == 1


def test_a_group_of_identical_members_completes_with_every_result(
    canvas: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    workers(concurrency=3, app_module=APP)
    result = group([canvas.member.s(7)] * 3).apply_async(queue=queue)
    assert result.get(timeout=60) == [7, 7, 7]
    runs = recorder.runs("member")
    assert len(runs) == 3
    assert max_overlap(runs) == 1


def test_a_call_with_a_link_runs_its_callback_though_its_key_is_held(
    canvas: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    workers(concurrency=2, app_module=APP)
    # Given member(8) is claimed by a plain call, and running
    plain = canvas.member.apply_async((8, 1.0), queue=queue)
    wait_for(lambda: recorder.started("member"), 20, "the plain call's body")
    # When the same call is made with a link callback
    linked = canvas.member.apply_async(
        (8, 0.1), queue=queue, link=canvas.after.s().set(queue=queue)
    )
    # Then it is not deduplicated onto the plain call, and its callback runs
    assert not linked.deduplicated
    assert linked.id != plain.id
    assert linked.get(timeout=60) == 8
    wait_for(lambda: recorder.runs("after"), 30, "the link callback")
    assert [r["value"] for r in recorder.runs("after")] == [8]
    assert plain.get(timeout=10) == 8
    assert max_overlap(recorder.runs("member")) == 1


@pytest.mark.parametrize("shape", ["group", "chord"])
def test_identical_while_executing_members_run_one_at_a_time(
    shape: str,
    canvas: Any,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    # Given four free processes, and four identical while_executing members
    workers(concurrency=4, app_module=APP)
    members = [canvas.solo.s(9, 0.5)] * 4
    # When they are all delivered at once
    if shape == "group":
        result = group(members).apply_async(queue=queue)
        expected: Any = [9] * 4
    else:
        result = chord(members, canvas.after.s()).apply_async(queue=queue)
        expected = ["after", [9] * 4]
    # Then the workflow completes, each member having run, one at a time
    assert result.get(timeout=90) == expected
    runs = recorder.runs("solo")
    assert len(runs) == 4
    assert max_overlap(runs) == 1


def test_a_chord_sent_by_name_through_install_is_not_marked_duplicate(
    redis_server: RedisServer,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    """The publish hook (``install``) stamps a message it cannot stop; a
    chord header member must never be stamped ``duplicate_of``."""
    from tests.apps import hooks_app

    hooks_app.configure(redis_server.url())
    name = hooks_app.nightly.name  # until_expired, 60 s, in dedup_tasks
    # Given a publisher that knows the task only by name, with install(app)
    base = redis_server.url().rsplit("/", 1)[0]
    publisher = Celery("by-name", set_as_current=False)
    publisher.conf.update(
        broker_url=f"{base}/0",
        result_backend=f"{base}/1",
        dedup_redis_url=f"{base}/0",
        dedup_tasks={name: {"dedup_lock": "until_expired", "dedup_ttl": 60}},
    )
    install(publisher)
    try:
        _chord_by_name(publisher, name, workers, recorder, queue)
    finally:
        uninstall(publisher)  # publish signals are global to the process
        publisher.close()


def _chord_by_name(
    publisher: Celery,
    name: str,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    workers(concurrency=2, app_module=HOOKS)
    # and nightly(7) already claimed by a plain send_task, which ran
    first = publisher.send_task(name, (7,), queue=queue)
    assert first.get(timeout=30) == 7
    # When a chord of nightly(7), nightly(7), nightly(8) is sent by name
    header = [publisher.signature(name, (n,), queue=queue) for n in (7, 7, 8)]
    body = publisher.signature(name, queue=queue)
    result = chord(header, body).apply_async()
    # Then it fires with every header result (none was dropped as a duplicate)
    assert result.get(timeout=60) == [7, 7, 8]
    time.sleep(0.5)
    assert len(recorder.runs("nightly")) == 5  # 1 plain, 3 members, the body
