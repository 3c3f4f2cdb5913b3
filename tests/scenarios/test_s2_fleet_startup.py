"""S2 (seed 002): every container enqueues the same bootstrap and recurring job.

Five processes start on different phases; each enqueues the job at start-up
and then once a period (2 s), for 3 periods. The job must run once a period.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.apps import fleet_app
from tests.rig import ROOT, Recorder, RedisServer, Worker, wait_for

pytestmark = pytest.mark.scenario

APP = "tests.apps.fleet_app"
PERIOD = fleet_app.PERIOD


def test_one_execution_per_period(
    redis_server: RedisServer,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    fleet_app.configure(redis_server.url())
    workers(concurrency=3, app_module=APP)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DEDUP_TEST_REDIS_URL": redis_server.url(),
        "DEDUP_TEST_QUEUE": queue,
    }
    start_at = time.time() + 1.5
    client = [sys.executable, "-m", "tests.apps.fleet_client", str(start_at)]
    containers = [
        subprocess.Popen(
            [*client, str(offset), "3"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for offset in (0.0, 0.3, 0.7, 1.1, 1.6)
    ]
    calls: list[dict[str, Any]] = []
    for container in containers:
        out, _ = container.communicate(timeout=60)
        assert container.returncode == 0
        calls += [json.loads(line) for line in out.splitlines()]
    assert len(calls) == 20  # 5 containers x (bootstrap + 3 periods)
    published = [c for c in calls if not c["dup"]]
    wait_for(lambda: len(recorder.runs("fleet_job")) == len(published), 20, "the runs")
    # Every published call ran once; together they ran once per period
    runs = recorder.runs("fleet_job")
    assert sorted(r["task_id"] for r in runs) == sorted(c["id"] for c in published)
    per_period = Counter(
        int(c["t0"] // PERIOD)
        for c in published
        if int(c["t0"] // PERIOD) == int(c["t1"] // PERIOD)  # not on a boundary
    )
    assert set(per_period.values()) == {1}
    periods = {int(c["t0"] // PERIOD) for c in calls}
    assert len(periods) - 1 <= len(published) <= len(periods) + 1
    assert len(published) < len(calls) / 3  # the fleet's 10x writes are gone
