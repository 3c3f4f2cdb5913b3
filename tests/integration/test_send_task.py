"""Messages sent by name, past DedupTask.apply_async, still run once at a time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.rig import Recorder, Worker, dropped_onto, wait_for

pytestmark = pytest.mark.integration


def test_send_task_by_name_twice_while_the_first_runs(
    scenario_app: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    workers(concurrency=3)
    name = scenario_app.close_campaign.name
    # Given a job sent by name (another service, say), with no enqueue claim
    first = scenario_app.app.send_task(name, (50, 2.0), queue=queue)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the first body")
    # When the same job is sent by name again while it runs
    second = scenario_app.app.send_task(name, (50, 2.0), queue=queue)
    assert first.get(timeout=20) == 50
    time.sleep(1)
    # Then the second did not run beside it: the default rule (skip) dropped it
    assert [s["task_id"] for s in recorder.started("close_campaign")] == [first.id]
    assert dropped_onto(second) == first.id


def test_send_task_follows_the_reschedule_rule(
    scenario_app: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    workers(
        concurrency=3, conf={"dedup_on_conflict": "reschedule", "dedup_lock_ttl": 5}
    )
    name = scenario_app.close_campaign.name
    first = scenario_app.app.send_task(name, (51, 1.0), queue=queue)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the first body")
    second = scenario_app.app.send_task(name, (51, 1.0), queue=queue)
    assert first.get(timeout=20) == second.get(timeout=30) == 51
    runs = sorted(recorder.runs("close_campaign"), key=lambda r: r["start"])
    assert [r["task_id"] for r in runs] == [first.id, second.id]
    assert runs[0]["end"] <= runs[1]["start"]
