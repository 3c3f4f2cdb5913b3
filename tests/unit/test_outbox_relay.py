"""The relay on SQLite and kombu's in-process ``memory://`` broker."""

from __future__ import annotations

import datetime
import threading
from typing import Any

import pytest
import sqlalchemy as sa

from celery_dedup import ConfigurationError
from celery_dedup.outbox import Outbox, Relay, RelayCounts, event_id
from celery_dedup.outbox.claims import Claimed, claim
from celery_dedup.outbox.table import utcnow
from tests.integration import outbox_fixtures
from tests.integration.outbox_fixtures import Database, EventQueue
from tests.rig import free_port, wait_for

pytestmark = pytest.mark.outbox
sqlite_db = outbox_fixtures.sqlite_db
memory_events = outbox_fixtures.memory_events


def add_events(db: Database, *pairs: tuple[str, str], payload: Any = None) -> None:
    with db.engine.begin() as conn:
        for event_type, aggregate in pairs:
            db.outbox.add(conn, event_type, aggregate_id=aggregate, payload=payload)


def relay_for(db: Database, events: EventQueue, **options: Any) -> Relay:
    return Relay(db.outbox, "memory://", exchange=events.exchange_name, **options)


class FailingRelay(Relay):
    """Every publish of an event type starting with POISON fails."""

    def _publish(self, row: Claimed) -> None:
        if row.event_type.startswith("POISON"):
            raise ValueError(f"cannot publish {row.event_type}")
        super()._publish(row)


def test_a_pass_publishes_and_marks_rows(
    sqlite_db: Database, memory_events: EventQueue
) -> None:
    with sqlite_db.engine.begin() as conn:
        sqlite_db.outbox.add(
            conn, "CLOSED", aggregate_id="c:1", payload={"id": 1}, headers={"who": "me"}
        )
    relay = relay_for(sqlite_db, memory_events)
    counts = relay.run_once()
    assert (counts.claimed, counts.published) == (1, 1)
    [message] = memory_events.drain()
    assert message.properties["message_id"] == event_id("CLOSED", "c:1")
    assert message.delivery_info["routing_key"] == "CLOSED"
    assert message.payload == {"id": 1}
    assert message.headers == {
        "who": "me",
        "event_id": event_id("CLOSED", "c:1"),
        "event_type": "CLOSED",
        "aggregate_id": "c:1",
    }
    [row] = sqlite_db.rows()
    assert row.state == "published" and row.published_at is not None
    assert row.claim_token is None
    assert relay.run_once().claimed == 0
    assert memory_events.drain() == []
    relay.close()


def test_each_aggregate_keeps_insertion_order_across_small_batches(
    sqlite_db: Database, memory_events: EventQueue
) -> None:
    pairs = [(f"E{n}", f"agg:{n % 3}") for n in range(30)]
    add_events(sqlite_db, *pairs)
    relay = relay_for(sqlite_db, memory_events, batch_size=4)
    passes = 0
    while relay.run_once().claimed:
        passes += 1
    assert passes >= 30 // 4
    seen: dict[str, list[str]] = {}
    for message in memory_events.drain():
        seen.setdefault(message.headers["aggregate_id"], []).append(
            message.headers["event_type"]
        )
    for aggregate in ("agg:0", "agg:1", "agg:2"):
        expected = [t for t, a in pairs if a == aggregate]
        assert seen[aggregate] == expected
    relay.close()


def test_rows_behind_a_head_go_in_the_same_pass(
    sqlite_db: Database, memory_events: EventQueue
) -> None:
    add_events(sqlite_db, *[(f"E{n}", "hot") for n in range(10)])
    relay = relay_for(sqlite_db, memory_events, batch_size=100)
    assert relay.run_once().published == 10
    order = [m.headers["event_type"] for m in memory_events.drain()]
    assert order == [f"E{n}" for n in range(10)]
    relay.close()


def test_failures_back_off_then_park_and_hold_back_their_aggregate(
    sqlite_db: Database, memory_events: EventQueue
) -> None:
    add_events(sqlite_db, ("POISON", "a"), ("AFTER", "a"), ("OTHER", "b"))
    relay = FailingRelay(
        sqlite_db.outbox,
        "memory://",
        exchange=memory_events.exchange_name,
        max_attempts=3,
        backoff=0.05,
        max_backoff=0.2,
    )
    # Given a first pass: the other aggregate goes out, the poisoned one fails
    counts = relay.run_once()
    assert (counts.published, counts.failed, counts.parked) == (1, 1, 0)
    assert [m.headers["event_type"] for m in memory_events.drain()] == ["OTHER"]
    poison = sqlite_db.rows(event_type="POISON")[0]
    assert poison.attempts == 1 and poison.state == "pending"
    assert "cannot publish POISON" in poison.last_error
    assert poison.next_attempt_at > poison.created_at
    assert poison.claim_token is None
    # When it is not due yet, nothing is claimed (AFTER waits behind it)
    assert relay.run_once().claimed == 0
    # Then each due retry bumps attempts and pushes next_attempt_at further
    attempts_seen = [poison]
    while attempts_seen[-1].state != "parked":
        wait_for(
            lambda: relay.run_once().claimed,
            5,
            "the poisoned row to be due again",
            every=0.02,
        )
        attempts_seen.append(sqlite_db.rows(event_type="POISON")[0])
    assert [r.attempts for r in attempts_seen] == [1, 2, 3]
    # next_attempt_at is set after the claim, so it is at least the backoff
    # (0.05 s, doubled per attempt, capped at 0.2 s) past claimed_at
    backoffs = [r.next_attempt_at - r.claimed_at for r in attempts_seen]
    for backoff, seconds in zip(backoffs, [0.05, 0.1, 0.2], strict=True):
        assert backoff >= datetime.timedelta(seconds=seconds)
    # A parked row holds back the later rows of its aggregate
    assert relay.run_once().claimed == 0
    assert sqlite_db.rows(event_type="AFTER")[0].state == "pending"
    assert memory_events.drain() == []
    relay.close()

    # Requeued (once the cause is fixed), the aggregate drains in order
    fixed = relay_for(sqlite_db, memory_events)
    with sqlite_db.engine.begin() as conn:
        assert sqlite_db.outbox.requeue_parked(conn) == 1
    assert fixed.run_once().published == 2
    assert [m.headers["event_type"] for m in memory_events.drain()] == [
        "POISON",
        "AFTER",
    ]
    fixed.close()


def test_an_unreachable_broker_parks_nothing(sqlite_db: Database) -> None:
    add_events(sqlite_db, ("A", "1"), ("B", "2"))
    relay = Relay(
        sqlite_db.outbox,
        f"redis://127.0.0.1:{free_port()}/0",
        max_attempts=1,
    )
    counts = relay.run_once()
    assert (counts.claimed, counts.published, counts.failed, counts.parked) == (
        2,
        0,
        0,
        0,
    )
    assert counts.broker_unreachable
    for row in sqlite_db.rows():
        assert (row.state, row.attempts, row.claim_token) == ("pending", 0, None)
    relay.close()


def test_a_dead_relays_claim_is_taken_over_after_the_timeout(
    sqlite_db: Database, memory_events: EventQueue
) -> None:
    add_events(sqlite_db, ("A", "1"), ("B", "1"))
    # Given a relay that claimed both rows and died
    dead, _ = claim(
        sqlite_db.engine,
        sqlite_db.outbox.table,
        token="dead-relay",
        now=utcnow(),
        claim_timeout=60,
        limit=10,
    )
    assert [r.event_type for r in dead] == ["A", "B"]
    relay = relay_for(sqlite_db, memory_events, claim_timeout=0.3)
    # When its claim is fresh, nobody else takes the rows
    assert relay.run_once().claimed == 0
    # Then after the claim timeout they are reclaimed and published
    passes: list[RelayCounts] = []
    wait_for(
        lambda: passes.append(relay.run_once()) or passes[-1].claimed,
        5,
        "a reclaim",
        every=0.05,
    )
    assert (passes[-1].reclaimed, passes[-1].published) == (2, 2)
    assert [m.headers["event_type"] for m in memory_events.drain()] == ["A", "B"]
    relay.close()


class SlowRelay(Relay):
    """Lets another relay take its claim over between publishing and marking."""

    other: Relay

    def _finish(self, *args: Any) -> None:
        wait_for(lambda: self.other.run_once().reclaimed, 5, "the takeover")
        super()._finish(*args)


def test_a_relay_whose_claim_was_taken_over_marks_nothing(
    sqlite_db: Database, memory_events: EventQueue
) -> None:
    add_events(sqlite_db, ("A", "1"))
    slow = SlowRelay(
        sqlite_db.outbox, "memory://", exchange=memory_events.exchange_name
    )
    slow.other = relay_for(sqlite_db, memory_events, claim_timeout=0.2)
    counts = slow.run_once()
    assert (counts.published, counts.lost) == (0, 1)
    # published twice (at least once), marked once, by the relay that owned it
    ids = [m.properties["message_id"] for m in memory_events.drain()]
    assert ids == [event_id("A", "1")] * 2
    [row] = sqlite_db.rows()
    assert row.state == "published" and row.claim_token is None
    slow.close()
    slow.other.close()


def test_retention_deletes_old_published_rows_only(
    sqlite_db: Database, memory_events: EventQueue
) -> None:
    add_events(sqlite_db, ("OLD", "1"), ("NEW", "2"))
    relay = relay_for(sqlite_db, memory_events, retention=3600)
    assert relay.run_once().published == 2
    add_events(sqlite_db, ("PENDING", "3"))
    table = sqlite_db.outbox.table
    with sqlite_db.engine.begin() as conn:
        conn.execute(
            sa.update(table)
            .where(table.c.event_type == "OLD")
            .values(published_at=utcnow() - datetime.timedelta(hours=2))
        )
    assert relay.prune() == 1
    assert [r.event_type for r in sqlite_db.rows()] == ["NEW", "PENDING"]
    # a deleted event can be added again, under the same event id
    add_events(sqlite_db, ("OLD", "1"))
    assert sqlite_db.rows()[-1].event_id == event_id("OLD", "1")
    keep_all = relay_for(sqlite_db, memory_events, retention=None)
    assert keep_all.prune() == 0
    relay.close()
    keep_all.close()


def test_run_forever_publishes_until_stopped(
    sqlite_db: Database, memory_events: EventQueue
) -> None:
    relay = relay_for(sqlite_db, memory_events, poll_interval=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run_forever, args=(stop,))
    thread.start()
    try:
        add_events(sqlite_db, ("A", "1"), ("B", "1"))
        received: list[Any] = []
        wait_for(
            lambda: received.extend(memory_events.drain()) or len(received) == 2,
            10,
            "two events",
        )
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert [m.headers["event_type"] for m in received] == ["A", "B"]
    relay.close()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("batch_size", 0),
        ("batch_size", 1.5),
        ("max_attempts", 0),
        ("backoff", 0),
        ("max_backoff", 0.5),  # below the default backoff of 1 s
        ("claim_timeout", -1),
        ("retention", 0),
        ("poll_interval", "1"),
        ("exchange", ""),
    ],
)
def test_relay_arguments_are_checked_by_name(
    sqlite_db: Database, option: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Relay(sqlite_db.outbox, "memory://", **{option: value})
    assert info.value.setting == option


def test_a_relay_needs_an_outbox_with_an_engine() -> None:
    with pytest.raises(ConfigurationError) as info:
        Relay("not an outbox", "memory://")  # type: ignore[arg-type]
    assert info.value.setting == "outbox"
    from celery_dedup.exceptions import OutboxError

    with pytest.raises(OutboxError):
        Relay(Outbox(), "memory://")


def test_no_row_is_claimed_while_an_earlier_row_of_its_aggregate_is_unpublished(
    sqlite_db: Database, memory_events: EventQueue
) -> None:
    add_events(sqlite_db, ("FIRST", "a"), ("SECOND", "a"), ("OTHER", "b"))
    # Given another relay holding the head of aggregate "a" (and nothing else)
    held, _ = claim(
        sqlite_db.engine,
        sqlite_db.outbox.table,
        token="other-relay",
        now=utcnow(),
        claim_timeout=60,
        limit=1,
    )
    assert [r.event_type for r in held] == ["FIRST"]
    # When this relay runs, it takes only the other aggregate
    relay = relay_for(sqlite_db, memory_events)
    assert relay.run_once().published == 1
    assert [m.headers["event_type"] for m in memory_events.drain()] == ["OTHER"]
    assert sqlite_db.rows(event_type="SECOND")[0].claim_token is None
    relay.close()
