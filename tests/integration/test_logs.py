"""One log line per decision, with extra fields; no warning on the happy path."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from tests.rig import Recorder, Worker, wait_for

pytestmark = pytest.mark.integration


def test_decisions_are_logged_with_their_fields(
    scenario_app: Any, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    task = scenario_app.close_campaign
    with caplog.at_level(logging.DEBUG, logger="celery_dedup"):
        first = task.apply_async((60,), queue=queue)
        task.apply_async((60,), queue=queue)
    (line,) = [r for r in caplog.records if r.name.startswith("celery_dedup")]
    assert line.levelno == logging.INFO
    assert line.getMessage().startswith(f"Deduplicated {task.name} at enqueue")
    assert line.task_name == task.name  # type: ignore[attr-defined]
    assert line.dedup_key == task.dedup_key_for((60,))  # type: ignore[attr-defined]
    assert line.stage == "enqueue"  # type: ignore[attr-defined]
    assert first.id in line.getMessage()


def test_the_happy_path_warns_nothing(
    scenario_app: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    worker = workers(concurrency=2)
    task = scenario_app.close_campaign
    first = task.apply_async((61, 0.3), queue=queue)
    task.apply_async((61, 0.3), queue=queue)  # deduplicated
    assert first.get(timeout=20) == 61
    # The worker logs "succeeded" just after it stores the result.
    wait_for(lambda: "succeeded" in worker.logfile.read_text(), 10, "the success line")
    logged = worker.logfile.read_text().splitlines()
    assert not [line for line in logged if "WARNING" in line or "ERROR" in line]
