"""S6: a retry overlaps the original, or is dropped as a duplicate of itself.

A task fails twice and succeeds on its third attempt (``autoretry_for``),
while the same job keeps being enqueued and two workers wait for work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from celery_dedup.connection import get_backend
from tests.rig import Recorder, Worker, max_overlap, wait_for

pytestmark = pytest.mark.scenario


def test_retries_never_overlap_and_none_is_dropped(
    scenario_app: Any,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    workers(concurrency=3)
    workers(concurrency=3)
    flaky = scenario_app.flaky
    args = ("s6", 2, 1.0)
    result = flaky.apply_async(args, queue=queue)
    # While it runs and retries, the same job is enqueued again and again
    duplicates = []
    while not result.ready():
        duplicates.append(flaky.apply_async(args, queue=queue))
        time.sleep(0.25)
    assert result.get(timeout=30) == "s6"
    # Then every duplicate folded into the running task: the key was held
    # across its retries
    assert duplicates
    assert {d.id for d in duplicates} == {result.id}
    # and its three attempts ran one after another, none dropped
    runs = recorder.runs("flaky")
    assert [(r["task_id"], r["retries"]) for r in runs] == [
        (result.id, 0),
        (result.id, 1),
        (result.id, 2),
    ]
    assert max_overlap(runs) == 1
    # and the key is free after the success
    backend = get_backend(scenario_app.app)
    claim = backend.store.names(flaky.dedup_key_for(args)).claim
    wait_for(lambda: backend.redis.get(claim) is None, 5, "the claim's release")
