"""``add()`` and fencing on PostgreSQL and MariaDB (SQLite: tests/unit)."""

from __future__ import annotations

import multiprocessing
import queue

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from celery_dedup import LockLostError
from celery_dedup.outbox import event_id
from tests.apps.outbox_workers import add_same_event
from tests.integration import outbox_fixtures
from tests.integration.outbox_fixtures import Database

pytestmark = pytest.mark.outbox
server_db = outbox_fixtures.server_db
any_db = outbox_fixtures.any_db

WRITERS = 8


def test_eight_processes_add_one_event_at_once(server_db: Database) -> None:
    # Given 8 processes, each inside a transaction with a business write done
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WRITERS)
    results = ctx.Queue()
    processes = [
        ctx.Process(
            target=add_same_event,
            args=(server_db.url, server_db.outbox.table_name, n, barrier, results),
        )
        for n in range(WRITERS)
    ]
    for process in processes:
        process.start()
    # When they all add the same event at the same moment
    outcomes = []
    try:
        for _ in processes:
            outcomes.append(results.get(timeout=120))
    except queue.Empty:
        pytest.fail(f"only {len(outcomes)} of {WRITERS} writers reported")
    finally:
        for process in processes:
            process.join(30)
    # Then one row, one True, seven False, no error, every business row kept
    assert [error for _, _, error in outcomes] == [None] * WRITERS
    assert sorted(created for _, created, _ in outcomes) == [False] * 7 + [True]
    rows = server_db.rows()
    assert [(r.event_type, r.aggregate_id) for r in rows] == [
        ("CAMPAIGN_CLOSED", "campaign:42")
    ]
    assert rows[0].event_id == event_id("CAMPAIGN_CLOSED", "campaign:42")
    assert server_db.count(server_db.business) == WRITERS
    results.close()


def test_add_returns_true_then_false_and_never_commits(server_db: Database) -> None:
    outbox = server_db.outbox
    with Session(server_db.engine) as session:
        session.begin()
        session.execute(server_db.business.insert(), {"id": 1, "note": "x"})
        assert outbox.add(session, "CLOSED", aggregate_id="c:1", payload={"n": 1})
        assert not outbox.add(session, "CLOSED", aggregate_id="c:1")
        # a duplicate left the transaction usable
        session.execute(server_db.business.insert(), {"id": 2, "note": "y"})
        session.rollback()
    assert server_db.rows() == []
    assert server_db.count(server_db.business) == 0
    with server_db.engine.connect() as conn, conn.begin():
        assert outbox.add(conn, "CLOSED", aggregate_id="c:1", payload={"n": 1})
        assert not outbox.add(conn, "CLOSED", aggregate_id="c:1")
        conn.execute(server_db.business.insert(), {"id": 3, "note": "z"})
    with Session(server_db.engine) as session, session.begin():
        assert not outbox.add(session, "CLOSED", aggregate_id="c:1")
    [row] = server_db.rows()
    assert row.payload == {"n": 1}
    assert server_db.count(server_db.business) == 1


def test_a_duplicate_of_an_uncommitted_event_that_rolls_back_is_new(
    server_db: Database,
) -> None:
    with server_db.engine.connect() as first:
        transaction = first.begin()
        assert server_db.outbox.add(first, "CLOSED", aggregate_id="c:1")
        transaction.rollback()
    with server_db.engine.begin() as conn:
        assert server_db.outbox.add(conn, "CLOSED", aggregate_id="c:1")


def fenced_write(db: Database, note_id: int, token: int, aggregate: str) -> bool:
    with Session(db.engine) as session, session.begin():
        session.execute(db.business.insert(), {"id": note_id, "note": "work"})
        return db.outbox.add(
            session, "CLOSED", aggregate_id=aggregate, fence=("job:1", token)
        )


def test_fencing_on_every_dialect(any_db: Database) -> None:
    # Given token 7 wrote and committed
    assert fenced_write(any_db, 1, 7, "a")
    # When a zombie holding token 6 writes, it is rejected and rolled back
    with pytest.raises(LockLostError) as info:
        fenced_write(any_db, 2, 6, "b")
    assert info.value.key == "job:1"
    with any_db.engine.connect() as conn:
        notes = conn.execute(sa.select(any_db.business.c.id)).scalars().all()
    assert sorted(notes) == [1]
    assert [r.aggregate_id for r in any_db.rows()] == ["a"]
    # Then the same token again, and a newer one, still pass
    assert fenced_write(any_db, 3, 7, "c")
    assert fenced_write(any_db, 4, 2**53, "d")
    with pytest.raises(LockLostError):
        fenced_write(any_db, 5, 7, "e")
    assert [r.aggregate_id for r in any_db.rows()] == ["a", "c", "d"]
    with any_db.engine.connect() as conn:
        fences = conn.execute(sa.select(any_db.outbox.fence_table)).all()
    assert [tuple(f) for f in fences] == [("job:1", 2**53)]


def test_a_zombie_waiting_on_the_newer_writer_is_rejected(server_db: Database) -> None:
    # Given the newer holder (token 2) has written but not committed yet
    with Session(server_db.engine) as newer:
        newer.begin()
        assert server_db.outbox.add(
            newer, "CLOSED", aggregate_id="new", fence=("job:1", 2)
        )
        newer.commit()
    # When the zombie (token 1) arrives afterwards, its transaction is void
    with Session(server_db.engine) as zombie:
        zombie.begin()
        zombie.execute(server_db.business.insert(), {"id": 9, "note": "zombie"})
        with pytest.raises(LockLostError):
            server_db.outbox.add(
                zombie, "CLOSED", aggregate_id="old", fence=("job:1", 1)
            )
        zombie.commit()
    assert server_db.count(server_db.business) == 0
    assert [r.aggregate_id for r in server_db.rows()] == ["new"]


def test_a_duplicate_committed_after_the_callers_snapshot_is_false(
    server_db: Database,
) -> None:
    # Given a caller whose transaction has already read (MariaDB's REPEATABLE
    # READ snapshot is taken there)
    with server_db.engine.connect() as caller, caller.begin():
        caller.execute(sa.select(server_db.business.c.id)).all()
        # When another transaction commits the same event meanwhile
        with server_db.engine.begin() as other:
            assert server_db.outbox.add(other, "CLOSED", aggregate_id="c:1")
        # Then the caller's add sees it as existing, without an error
        assert not server_db.outbox.add(caller, "CLOSED", aggregate_id="c:1")
        caller.execute(server_db.business.insert(), {"id": 1, "note": "kept"})
    assert server_db.count(server_db.business) == 1
    assert len(server_db.rows()) == 1
