"""The relay against PostgreSQL, MariaDB and a real Redis broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from celery_dedup.outbox import Inbox, Outbox, Relay, RelayCounts, event_id
from celery_dedup.outbox.claims import Claimed
from tests.integration import outbox_fixtures
from tests.integration.outbox_fixtures import Database, EventQueue
from tests.rig import ROOT, wait_for

pytestmark = pytest.mark.outbox
server_db = outbox_fixtures.server_db
postgres_db = outbox_fixtures.postgres_db
broker_url = outbox_fixtures.broker_url
events = outbox_fixtures.events

ROWS = 1000
BLOCK = 100  # rows of one aggregate, inserted one after the other


def add_rows(db: Database, count: int, block: int) -> list[tuple[str, str]]:
    pairs = [(f"E{n:04d}", f"agg:{n // block}") for n in range(count)]
    with db.engine.begin() as conn:
        for event_type, aggregate in pairs:
            db.outbox.add(conn, event_type, aggregate_id=aggregate, payload={"n": 1})
    return pairs


def pending(engine: sa.engine.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        count = sa.select(sa.func.count()).where(table.c.state == "pending")
        return int(conn.execute(count.select_from(table)).scalar_one())


def test_two_relays_publish_every_row_once_in_order(
    server_db: Database, broker_url: str, events: EventQueue
) -> None:
    # Given 1000 rows of 10 aggregates, each aggregate's rows one after the
    # other, and two relays, each with its engine. A batch (8) holds the heads
    # of 8 aggregates, so the other relay gets the last 2 and their followers;
    # a relay that ignored the order rule would take rows 8-15 of aggregate 0
    # while the first publishes rows 0-7.
    pairs = add_rows(server_db, ROWS, BLOCK)
    table = server_db.outbox.table_name
    outboxes = [Outbox(server_db.new_engine(), table_name=table) for _ in range(2)]
    relays = [
        Relay(o, broker_url, exchange=events.exchange_name, batch_size=8)
        for o in outboxes
    ]
    totals = [RelayCounts(), RelayCounts()]
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        relay = relays[index]
        try:
            start.wait(10)
            while pending(relay.outbox.engine, relay.outbox.table):
                counts = relay.run_once()
                totals[index].claimed += counts.claimed
                totals[index].published += counts.published
                totals[index].reclaimed += counts.reclaimed
        except BaseException as exc:
            errors.append(exc)

    # When both run at once until nothing is pending
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for relay, outbox in zip(relays, outboxes, strict=True):
        relay.close()
        outbox.engine.dispose()
    assert errors == []
    # Then every row was published exactly once, by one relay or the other
    messages = events.drain()
    ids = Counter(m.properties["message_id"] for m in messages)
    assert len(ids) == ROWS and set(ids.values()) == {1}
    assert ids.keys() == {event_id(t, a) for t, a in pairs}
    assert sum(t.published for t in totals) == ROWS
    assert all(t.published > 0 for t in totals), totals
    assert sum(t.reclaimed for t in totals) == 0
    assert {r.state for r in server_db.rows()} == {"published"}
    # And each aggregate's events arrived in insertion order
    arrived: dict[str, list[str]] = {}
    for message in messages:
        arrived.setdefault(message.headers["aggregate_id"], []).append(
            message.headers["event_type"]
        )
    for aggregate, received in arrived.items():
        assert received == [t for t, a in pairs if a == aggregate]


class FailingRelay(Relay):
    """Publishes through Redis, except events whose type starts with POISON."""

    def _publish(self, row: Claimed) -> None:
        if row.event_type.startswith("POISON"):
            raise ValueError("rejected")
        super()._publish(row)


def test_a_failing_publish_backs_off_then_parks(
    server_db: Database, broker_url: str, events: EventQueue
) -> None:
    with server_db.engine.begin() as conn:
        for event_type, aggregate in [("POISON", "a"), ("NEXT", "a"), ("FINE", "b")]:
            server_db.outbox.add(conn, event_type, aggregate_id=aggregate)
    relay = FailingRelay(
        server_db.outbox,
        broker_url,
        exchange=events.exchange_name,
        max_attempts=2,
        backoff=0.05,
        max_backoff=0.05,
    )
    first = relay.run_once()
    assert (first.published, first.failed, first.parked) == (1, 1, 0)
    after_first = server_db.rows(event_type="POISON")[0]
    assert after_first.attempts == 1 and after_first.state == "pending"
    passes: list[RelayCounts] = []
    wait_for(
        lambda: passes.append(relay.run_once()) or passes[-1].claimed,
        5,
        "the retry",
        every=0.02,
    )
    assert passes[-1].parked == 1
    parked = server_db.rows(event_type="POISON")[0]
    assert (parked.state, parked.attempts) == ("parked", 2)
    assert parked.next_attempt_at > after_first.next_attempt_at
    assert "rejected" in parked.last_error
    assert server_db.rows(event_type="NEXT")[0].state == "pending"
    assert relay.run_once().claimed == 0
    assert [m.headers["event_type"] for m in events.drain()] == ["FINE"]
    relay.close()


def test_a_relay_killed_between_publish_and_mark(
    postgres_db: Database, broker_url: str, events: EventQueue, tmp_path: Path
) -> None:
    db = postgres_db
    with db.engine.begin() as conn:
        db.outbox.add(conn, "CLOSED", aggregate_id="campaign:7", payload={"id": 7})
    # Given a relay process that published the row and hangs before marking it
    marker = tmp_path / "published"
    relay_process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.apps.outbox_relay_proc",
            db.url,
            db.outbox.table_name,
            broker_url,
            events.exchange_name,
            str(marker),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        wait_for(marker.exists, 30, "the relay process to publish")
    finally:
        # When it is killed there
        relay_process.send_signal(signal.SIGKILL)
        relay_process.wait(10)
    delivered = events.drain()
    assert len(delivered) == 1
    [row] = db.rows()
    assert row.state == "pending" and row.claim_token is not None

    # Then another relay leaves the row alone while the claim is fresh...
    relay = Relay(db.outbox, broker_url, exchange=events.exchange_name, claim_timeout=2)
    assert relay.run_once().claimed == 0
    # ...and publishes it again once the claim timed out
    passes: list[RelayCounts] = []
    wait_for(
        lambda: passes.append(relay.run_once()) or passes[-1].claimed,
        15,
        "the claim to time out",
        every=0.1,
    )
    assert (passes[-1].reclaimed, passes[-1].published) == (1, 1)
    relay.close()
    delivered += events.drain()
    assert [m.properties["message_id"] for m in delivered] == [
        event_id("CLOSED", "campaign:7")
    ] * 2

    # And the consumer's Inbox applies it once
    inbox = Inbox(db.engine, table_name=f"{db.outbox.table_name}_in")
    effects = sa.Table(
        f"{db.outbox.table_name}_fx",
        inbox.metadata,
        sa.Column("campaign_id", sa.Integer, nullable=False),
    )
    inbox.metadata.create_all(db.engine)
    try:
        applied = []
        for message in delivered:
            with Session(db.engine) as session, session.begin():
                first = inbox.first_time(session, message.properties["message_id"])
                if first:
                    session.execute(effects.insert(), {"campaign_id": 7})
                applied.append(first)
        assert applied == [True, False]
        assert db.count(effects) == 1
    finally:
        inbox.metadata.drop_all(db.engine)


def consume_all(queue: EventQueue, expected: int) -> list[Any]:
    received: list[Any] = []
    wait_for(
        lambda: received.extend(queue.drain()) or len(received) >= expected,
        30,
        f"{expected} events",
    )
    return received
