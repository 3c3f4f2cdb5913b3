"""``celery -A proj dedup check`` against real worker processes (S11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.rig import ROOT, RedisServer, Worker

pytestmark = pytest.mark.integration

SERVICE_A = "tests.apps.service_a"  # the "API": a stub parse_epub
SERVICE_B = "tests.apps.service_b"  # the "Workers": the real parse_epub


def check(
    redis_server: RedisServer, app_module: str, *args: str, **conf: Any
) -> subprocess.CompletedProcess[str]:
    """Run the command as a user would, against the rig's Redis."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DEDUP_TEST_REDIS_URL": redis_server.url(),
        "DEDUP_TEST_CONF": json.dumps(conf),
    }
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", app_module, "dedup", "check",
         "--timeout", "1", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )  # fmt: skip


@pytest.fixture
def start(
    workers: Callable[..., Worker], redis_client: redis.Redis
) -> Callable[[str], Worker]:
    """A light worker (solo pool) of ``app_module`` on the test's queue."""

    def start_one(app_module: str) -> Worker:
        return workers(app_module=app_module, pool="solo", concurrency=1)

    return start_one


def test_two_services_on_one_queue_are_reported(
    start: Callable[[str], Worker], redis_server: RedisServer, queue: str
) -> None:
    # Given seed 001: the "API" and the "Workers" services consume one queue
    api = start(SERVICE_A)
    parser = start(SERVICE_B)
    # When the check asks the live workers
    done = check(redis_server, SERVICE_B, "--json")
    # Then it fails and names each task only one service registers
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert report["queues"][queue]["workers"] == sorted([api.hostname, parser.hostname])
    assert report["queues"][queue]["conflicts"] == [
        {
            "task": "api.send_welcome_email",
            "served_by": [api.hostname],
            "missing_from": [parser.hostname],
        },
        {
            "task": "workers.generate_audio",
            "served_by": [parser.hostname],
            "missing_from": [api.hostname],
        },
    ]
    # and the job both claim, which the stub swallowed in the incident
    assert report["queues"][queue]["shared"] == ["books.parse_epub"]
    assert report["settings"] == []


def test_a_clean_fleet_passes(
    start: Callable[[str], Worker], redis_server: RedisServer, queue: str
) -> None:
    # Given two workers of the same service on one queue
    first, second = start(SERVICE_B), start(SERVICE_B)
    # When the check asks them (text output)
    done = check(redis_server, SERVICE_B)
    # Then it passes and says which queue and workers it checked
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"queue {queue}: 2 workers ({first.hostname}, {second.hostname}): ok" in (
        done.stdout
    )
    assert "ok: 2 worker(s) on 1 queue(s)" in done.stdout


def test_a_risky_setting_fails_a_clean_fleet(
    start: Callable[[str], Worker], redis_server: RedisServer, queue: str
) -> None:
    # Given one worker, and a local app whose completion memory is shorter
    # than the broker's visibility timeout
    start(SERVICE_B)
    done = check(
        redis_server,
        SERVICE_B,
        "--json",
        dedup_done_ttl=600,
        broker_transport_options={"visibility_timeout": 3600},
    )
    # Then the check fails on the setting alone
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["queues"][queue]["conflicts"] == []
    [sentence] = report["settings"]
    assert sentence.startswith("dedup_done_ttl (600s) is shorter than")
    assert report["ok"] is False


def test_no_worker_is_its_own_exit_code(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    done = check(redis_server, SERVICE_B, "--json")
    assert done.returncode == 69, done.stderr
    assert "No worker replied within 1s" in done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert report["error"].startswith("No worker replied")
