"""A body killed by its hard time limit keeps its key until its process is gone.

billiard reports the hard time limit (``Request.on_timeout``) before it kills
the child: a copy of the key waiting to run must not start in between.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from celery.exceptions import TimeLimitExceeded

from tests.rig import Recorder, Worker, wait_for

pytestmark = pytest.mark.scenario

APP = "tests.apps.canvas_app"


def spans(recorder: Recorder, name: str) -> dict[str, tuple[float, float]]:
    """(first tick, last tick) of every body of ``name``, by task id."""
    ticks: dict[str, list[float]] = defaultdict(list)
    for entry in recorder.client.lrange(f"ticks:{name}", 0, -1):
        item = json.loads(entry)
        ticks[item["task_id"]].append(item["at"])
    return {task_id: (min(at), max(at)) for task_id, at in ticks.items()}


def test_no_waiting_copy_starts_before_the_killed_body_is_gone(
    scenario_app: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    from tests.apps import canvas_app

    workers(concurrency=4, app_module=APP)
    task = canvas_app.ticking
    options = {
        "dedup_lock": "while_executing",
        "dedup_on_conflict": "reschedule",
        "dedup_lock_ttl": 2,  # copies look again every 0.5 s
    }
    # Given a body that runs past its 1 s hard time limit
    killed = task.apply_async((1, 3.0), queue=queue, **options)
    wait_for(lambda: recorder.started("ticking"), 20, "the long body")
    # and eight copies of its key waiting for it (rescheduled)
    copies = [task.apply_async((1, 0.1), queue=queue, **options) for _ in range(8)]
    # When the pool kills it
    # (read by polling: Celery 5.3's result consumer, on a get() that raises,
    # leaves a socket and a deprecated call to the garbage collector)
    wait_for(lambda: killed.state == "FAILURE", 30, "the hard time limit")
    assert isinstance(killed.result, TimeLimitExceeded)
    # Then every copy runs, and none of them while another body still ran
    assert [c.get(timeout=90) for c in copies] == [1] * 8
    bodies = spans(recorder, "ticking")
    assert len(bodies) == 9
    for (a, (a0, a1)), (b, (b0, b1)) in itertools.combinations(bodies.items(), 2):
        assert a1 < b0 or b1 < a0, f"{a} and {b} ran at once"
