"""Outbox signals and Prometheus metrics move once per event (SQLite,
kombu's in-memory transport: no servers)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from celery_dedup import metrics, signals
from celery_dedup.outbox import Outbox, Relay

pytestmark = pytest.mark.outbox


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(f"sqlite:///{tmp_path / 'events.db'}", table_name="events")
    box.create_all()
    yield box
    box.close()


@pytest.fixture
def registry() -> Iterator[tuple[CollectorRegistry, metrics.Metrics]]:
    registry = CollectorRegistry()
    found = metrics.register(registry)
    yield registry, found
    found.disconnect()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def add(outbox: Outbox, n: int) -> None:
    with outbox.engine.begin() as conn:
        for i in range(n):
            outbox.add(conn, "CLOSED", aggregate_id=f"c{i}", fence=None)


def test_published_events_signal_and_count_once_each(
    outbox: Outbox, registry: tuple[CollectorRegistry, metrics.Metrics]
) -> None:
    seen: list[dict[str, Any]] = []

    def receiver(**kwargs: Any) -> None:
        seen.append(kwargs)

    signals.outbox_published.connect(receiver, weak=False)
    exchange = f"ev.{uuid.uuid4().hex[:6]}"
    relay = Relay(outbox, kombu.Connection("memory://"), exchange=exchange)
    try:
        add(outbox, 3)
        assert relay.run_once().published == 3
        assert relay.run_once().published == 0
    finally:
        relay.close()
        signals.outbox_published.disconnect(receiver)
    assert [s["aggregate_id"] for s in seen] == ["c0", "c1", "c2"]
    assert seen[0]["event_id"] == outbox.event_id("CLOSED", "c0")
    assert seen[0]["sender"] == "events"
    assert value(registry[0], "celery_dedup_relay_published_total") == 3


def test_failures_and_parking_signal_and_count(
    outbox: Outbox, registry: tuple[CollectorRegistry, metrics.Metrics]
) -> None:
    parked: list[dict[str, Any]] = []

    def receiver(**kwargs: Any) -> None:
        parked.append(kwargs)

    signals.outbox_parked.connect(receiver, weak=False)
    relay = Relay(outbox, kombu.Connection("memory://"), max_attempts=2, backoff=0.001)
    relay._publish = _fail  # type: ignore[method-assign]
    try:
        add(outbox, 1)
        assert relay.run_once().failed == 1
        assert relay.run_once().parked == 1
    finally:
        relay.close()
        signals.outbox_parked.disconnect(receiver)
    (event,) = parked
    assert event["attempts"] == 2
    assert "broken payload" in event["error"]
    assert value(registry[0], "celery_dedup_relay_failed_total", parked="false") == 1
    assert value(registry[0], "celery_dedup_relay_failed_total", parked="true") == 1


def _fail(row: Any) -> None:
    raise ValueError("broken payload")


def test_outbox_gauges_count_at_scrape(outbox: Outbox) -> None:
    registry = CollectorRegistry()
    found = metrics.register(registry, outbox=outbox)
    try:
        add(outbox, 2)
        assert value(registry, "celery_dedup_outbox_pending") == 2
        with outbox.engine.begin() as conn:
            conn.execute(sa.update(outbox.table).values(state="parked"))
        assert value(registry, "celery_dedup_outbox_pending") == 0
        assert value(registry, "celery_dedup_outbox_parked") == 2
    finally:
        found.disconnect()


def test_deduplications_and_lost_leases_are_counted(
    registry: tuple[CollectorRegistry, metrics.Metrics],
) -> None:
    signals.task_deduplicated.send(
        sender="t.job", key="k", task_id=None, existing_task_id="a", stage="enqueue"
    )
    signals.lease_lost.send(sender="t.job", key="k", task_id="a", reason="gone")
    reg = registry[0]
    assert (
        value(reg, "celery_dedup_deduplicated_total", task="t.job", stage="enqueue")
        == 1
    )
    assert value(reg, "celery_dedup_leases_lost_total", task="t.job") == 1


def test_the_package_never_imports_prometheus_client() -> None:
    import subprocess
    import sys

    code = "import sys, celery_dedup; print('prometheus_client' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
