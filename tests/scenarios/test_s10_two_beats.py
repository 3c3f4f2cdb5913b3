"""S10: two ``celery beat`` processes run the same schedule (2 s) for 10 s."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.apps import fleet_app
from tests.rig import Beat, Recorder, RedisServer, Worker

pytestmark = pytest.mark.scenario

APP = "tests.apps.fleet_app"
PERIOD = fleet_app.PERIOD


@pytest.fixture
def beats(
    redis_server: RedisServer, queue: str, tmp_path: Path
) -> Iterator[list[Beat]]:
    schedule = {
        "beat_schedule": {
            "fleet": {
                "task": fleet_app.fleet_job.name,
                "schedule": PERIOD,
                "options": {"queue": queue},
            }
        }
    }
    env = {
        "DEDUP_TEST_REDIS_URL": redis_server.url(),
        "DEDUP_TEST_QUEUE": queue,
        "DEDUP_TEST_CONF": json.dumps(schedule),
    }
    started = [Beat(APP, env, tmp_path, f"beat{n}") for n in (1, 2)]
    yield started
    for beat in started:
        beat.stop()


def test_each_tick_runs_once(
    redis_server: RedisServer,
    workers: Callable[..., Worker],
    beats: list[Beat],
    recorder: Recorder,
) -> None:
    fleet_app.configure(redis_server.url())
    workers(concurrency=3, app_module=APP)
    # Given two beats with the same 2 s schedule, started 0.7 s apart
    beats[0].start()
    time.sleep(0.7)
    beats[1].start()
    # When they run for 10 s
    time.sleep(10)
    for beat in beats:
        beat.stop()
    ticks = sorted(beats[0].ticks() + beats[1].ticks())
    assert len(beats[0].ticks()) >= 4
    assert len(beats[1].ticks()) >= 4
    time.sleep(1)  # the last tick's run
    runs = recorder.runs("fleet_job")

    # Then each tick's period ran once: as many runs as periods ticked in
    # (a tick within 0.2 s of a period's end may be keyed in the next one)
    def periods(delay: float) -> set[int]:
        return {int((t + delay) // PERIOD) for t in ticks}

    low = min(len(periods(0.0)), len(periods(0.2)))
    high = len(periods(0.0) | periods(0.2))
    assert low <= len(runs) <= high
    assert len(runs) < len(ticks)
