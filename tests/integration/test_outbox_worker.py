"""The relay as ``celery dedup relay`` and inside a real ``celery worker``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_dedup.outbox import event_id
from tests.integration import outbox_fixtures
from tests.integration.outbox_fixtures import Database, EventQueue
from tests.rig import ROOT, Worker, wait_for

pytestmark = pytest.mark.outbox
postgres_db = outbox_fixtures.postgres_db
broker_url = outbox_fixtures.broker_url
events = outbox_fixtures.events

APP = "tests.apps.outbox_app"


@pytest.fixture
def app_env(
    postgres_db: Database, broker_url: str, events: EventQueue
) -> dict[str, str]:
    """What tests/apps/outbox_app.py reads: this test's database and broker."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DEDUP_TEST_REDIS_URL": broker_url,
        "DEDUP_TEST_OUTBOX_URL": postgres_db.url,
        "DEDUP_TEST_OUTBOX_TABLE": postgres_db.outbox.table_name,
        "DEDUP_TEST_OUTBOX_EXCHANGE": events.exchange_name,
        "DEDUP_TEST_QUEUE": f"q-{uuid.uuid4().hex[:8]}",
    }


def add_events(db: Database, count: int) -> list[str]:
    with db.engine.begin() as conn:
        for n in range(count):
            db.outbox.add(conn, "CLOSED", aggregate_id=f"campaign:{n}")
    return [event_id("CLOSED", f"campaign:{n}") for n in range(count)]


def receive(queue: EventQueue, expected: int) -> list[Any]:
    received: list[Any] = []
    wait_for(
        lambda: received.extend(queue.drain()) or len(received) >= expected,
        30,
        f"{expected} events",
    )
    return received


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.apps.outbox_cli", "-A", APP, "dedup", *args]


def test_relay_once_publishes_and_prints_its_counts(
    postgres_db: Database, events: EventQueue, app_env: dict[str, str]
) -> None:
    ids = add_events(postgres_db, 3)
    done = subprocess.run(
        cli("relay", "--once"),
        cwd=ROOT,
        env=app_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "claimed=3 published=3" in done.stdout
    assert sorted(m.properties["message_id"] for m in events.drain()) == sorted(ids)


def test_relay_runs_until_sigterm(
    postgres_db: Database, events: EventQueue, app_env: dict[str, str]
) -> None:
    process = subprocess.Popen(
        cli("relay", "--poll-interval", "0.1"),
        cwd=ROOT,
        env=app_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ids = add_events(postgres_db, 2)
        received = receive(events, 2)
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "stopping after the current pass" in out
    assert sorted(m.properties["message_id"] for m in received) == sorted(ids)


def test_relay_needs_the_outbox_url(app_env: dict[str, str]) -> None:
    done = subprocess.run(
        cli("relay", "--once"),
        cwd=ROOT,
        env={**app_env, "DEDUP_TEST_OUTBOX_URL": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "dedup_outbox_url" in done.stderr


@pytest.fixture
def worker(app_env: dict[str, str], tmp_path: Path) -> Iterator[Worker]:
    relay_on = {**app_env, "DEDUP_TEST_OUTBOX_RELAY": "1"}
    started = Worker(
        APP,
        app_env["DEDUP_TEST_QUEUE"],
        relay_on,
        tmp_path,
        name="outbox-relay",
        concurrency=1,
    ).start()
    yield started
    started.stop()


def test_a_worker_with_the_setting_relays_what_its_tasks_write(
    worker: Worker,
    broker_url: str,
    events: EventQueue,
    app_env: dict[str, str],
    postgres_db: Database,
) -> None:
    # Given a worker whose app only sets dedup_outbox_relay = True
    sender = Celery("sender", broker=broker_url)
    try:
        # When a DedupTask writes an event through the outbox
        sender.send_task(
            f"{APP}.close_campaign", (7,), queue=app_env["DEDUP_TEST_QUEUE"]
        )
        # Then the worker's own relay publishes it
        [message] = receive(events, 1)
    finally:
        sender.close()
    assert message.properties["message_id"] == event_id("CAMPAIGN_CLOSED", "campaign:7")
    assert message.payload == {"campaign_id": 7}
    wait_for(
        lambda: [r.state for r in postgres_db.rows()] == ["published"],
        10,
        "the row to be marked",
    )
    assert postgres_db.rows()[0].task_id is not None  # written by the task
    worker.stop()
    log = worker.log()
    assert "Outbox relay started" in log
    assert "Outbox relay stopped" in log
