"""The same outcomes on every driver: sqlite3, psycopg2, psycopg 3 and PyMySQL.

Issue 9: on psycopg 3 every ``add()`` returned False and every fenced one
raised ``LockLostError``, because the outcome was read from an INSERT's
``rowcount``, which SQLAlchemy reads only after closing the cursor, and which
psycopg 3 resets to -1 on close. The outcomes now come from what the database
returns, so they hold on any driver, even one whose rowcount says nothing.
"""

from __future__ import annotations

import datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from celery_dedup import LockLostError
from celery_dedup.outbox import Inbox, Relay, dialects
from celery_dedup.outbox.claims import Claimed
from tests.integration import outbox_fixtures
from tests.integration.outbox_fixtures import Database, EventQueue, unique_table

pytestmark = pytest.mark.outbox
any_db = outbox_fixtures.any_db
sqlite_db = outbox_fixtures.sqlite_db
memory_events = outbox_fixtures.memory_events


def check_fence_and_insert(db: Database) -> None:
    fence = db.outbox.fence_table
    with db.engine.begin() as conn:
        # A fresh fence table: the first token passes, and is stored
        assert dialects.advance_fence(conn, fence, "k", 100) is True
        assert dialects.advance_fence(conn, fence, "k", 100) is True  # same again
        assert dialects.advance_fence(conn, fence, "k", 50) is False  # older
        assert dialects.advance_fence(conn, fence, "k", 200) is True  # newer
        assert dialects.advance_fence(conn, fence, "other", 1) is True
    with db.engine.begin() as conn:
        # Across transactions, the committed token decides
        assert dialects.advance_fence(conn, fence, "k", 199) is False
        assert dialects.advance_fence(conn, fence, "k", 200) is True
        values = {"dedup_key": "new", "token": 7}
        assert dialects.insert_if_absent(conn, fence, values, ["dedup_key"]) is True
        again = {"dedup_key": "new", "token": 8}
        assert dialects.insert_if_absent(conn, fence, again, ["dedup_key"]) is False
    with db.engine.connect() as conn:
        stored = dict(conn.execute(sa.select(fence.c.dedup_key, fence.c.token)).all())
    assert stored == {"k": 200, "other": 1, "new": 7}


def check_add(db: Database) -> None:
    def add(note: int, token: int, aggregate: str) -> bool:
        with Session(db.engine) as session, session.begin():
            session.execute(db.business.insert(), {"id": note, "note": "work"})
            return db.outbox.add(
                session, "CLOSED", aggregate_id=aggregate, fence=("job:1", token)
            )

    # A new event is True, the same event again False (same token is fine)
    assert add(1, 5, "a") is True
    assert add(2, 5, "a") is False
    # A newer token after an older one passes
    assert add(3, 6, "b") is True
    # An older token after a newer one is rejected, with its business write
    with pytest.raises(LockLostError) as info:
        add(4, 5, "c")
    assert info.value.key == "job:1"
    assert "fencing token 5 is older than 6" in str(info.value)
    with db.engine.connect() as conn:
        notes = conn.execute(sa.select(db.business.c.id)).scalars().all()
    assert sorted(notes) == [1, 2, 3]
    assert [(r.aggregate_id, r.fence_token) for r in db.rows()] == [
        ("a", 5),
        ("b", 6),
    ]
    # Unfenced, the same: True once, then False
    with db.engine.begin() as conn:
        assert db.outbox.add(conn, "OPENED", aggregate_id="x", fence=None) is True
        assert db.outbox.add(conn, "OPENED", aggregate_id="x", fence=None) is False


def test_advance_fence_and_insert_if_absent_on_every_driver(any_db: Database) -> None:
    check_fence_and_insert(any_db)


def test_fenced_add_on_every_driver(any_db: Database) -> None:
    check_add(any_db)


def test_the_inbox_on_every_driver(any_db: Database) -> None:
    inbox = Inbox(any_db.engine, table_name=unique_table(), consumer="c")
    inbox.create_all()
    try:
        with any_db.engine.begin() as conn:
            assert inbox.first_time(conn, "e1") is True
            assert inbox.first_time(conn, "e1") is False
        with any_db.engine.begin() as conn:
            assert inbox.first_time(conn, "e1") is False
            assert inbox.first_time(conn, "e2") is True
        with any_db.engine.begin() as conn:
            assert inbox.prune(conn, older_than=-3600) == 2
            assert inbox.prune(conn, older_than=-3600) == 0
    finally:
        inbox.metadata.drop_all(any_db.engine)


@pytest.fixture
def blind_rowcount(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every result's rowcount is -1, as an INSERT's is on psycopg 3."""
    monkeypatch.setattr(sa.engine.CursorResult, "rowcount", property(lambda _: -1))


def test_add_does_not_read_rowcount(any_db: Database, blind_rowcount: None) -> None:
    # Fails on any driver if an outcome of add() is read from a rowcount.
    check_fence_and_insert(any_db)
    check_add(any_db)


def test_sqlite_without_returning_reads_changes(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite before 3.35, or SQLAlchemy 1.4: no RETURNING, changes() instead
    monkeypatch.setattr(
        sqlite_db.engine.dialect, "insert_returning", False, raising=False
    )
    assert not dialects._returning(sqlite_db.engine.dialect)
    check_fence_and_insert(sqlite_db)
    check_add(sqlite_db)


class PoisonRelay(Relay):
    """Every publish of an event type starting with POISON fails."""

    def _publish(self, row: Claimed) -> None:
        if row.event_type.startswith("POISON"):
            raise ValueError(f"cannot publish {row.event_type}")
        super()._publish(row)


def test_relay_counts_on_every_driver(
    any_db: Database, memory_events: EventQueue
) -> None:
    # The relay's counts come from UPDATE and DELETE rowcounts, which every
    # driver reports alike (SQLAlchemy keeps them before closing the cursor).
    with any_db.engine.begin() as conn:
        for event_type, aggregate in [("A", "1"), ("B", "2"), ("POISON", "3")]:
            any_db.outbox.add(conn, event_type, aggregate_id=aggregate)
    relay = PoisonRelay(
        any_db.outbox, "memory://", exchange=memory_events.exchange_name, max_attempts=1
    )
    try:
        counts = relay.run_once()
        assert (counts.claimed, counts.published, counts.lost) == (3, 2, 0)
        assert counts.parked == 1
        assert len(memory_events.drain()) == 2
        with any_db.engine.begin() as conn:
            assert any_db.outbox.requeue_parked(conn) == 1
            assert any_db.outbox.requeue_parked(conn) == 0
        t = any_db.outbox.table
        long_ago = datetime.datetime(2000, 1, 1)  # naive UTC, as stored
        with any_db.engine.begin() as conn:
            conn.execute(
                sa.update(t)
                .where(t.c.state == "published")
                .values(published_at=long_ago)
            )
        assert relay.prune() == 2
        assert relay.prune() == 0
        assert [r.event_type for r in any_db.rows()] == ["POISON"]
    finally:
        relay.close()
