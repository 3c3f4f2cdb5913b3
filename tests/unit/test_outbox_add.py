"""``Outbox.add()`` on SQLite: the caller's transaction, dedup and fencing."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from celery_dedup import ConfigurationError, LockLostError
from celery_dedup.exceptions import OutboxError
from celery_dedup.outbox import Outbox, event_id
from celery_dedup.outbox import writer as writer_module
from tests.integration import outbox_fixtures
from tests.integration.outbox_fixtures import Database

pytestmark = pytest.mark.outbox
sqlite_db = outbox_fixtures.sqlite_db


def test_a_new_event_is_true_and_a_repeat_false(sqlite_db: Database) -> None:
    outbox = sqlite_db.outbox
    with Session(sqlite_db.engine) as session, session.begin():
        assert outbox.add(session, "CLOSED", aggregate_id="c:1", payload={"a": 1})
        assert not outbox.add(session, "CLOSED", aggregate_id="c:1", payload={"a": 2})
        assert outbox.add(session, "CLOSED", aggregate_id="c:2")
        assert outbox.add(session, "OPENED", aggregate_id="c:1")
    rows = sqlite_db.rows()
    assert [(r.event_type, r.aggregate_id) for r in rows] == [
        ("CLOSED", "c:1"),
        ("CLOSED", "c:2"),
        ("OPENED", "c:1"),
    ]
    assert rows[0].payload == {"a": 1}  # the first write wins
    assert rows[0].event_id == event_id("CLOSED", "c:1")
    assert rows[0].state == "pending" and rows[0].attempts == 0
    assert rows[0].claim_token is None and rows[0].published_at is None


def test_add_never_commits_with_a_session(sqlite_db: Database) -> None:
    with Session(sqlite_db.engine) as session:
        session.begin()
        session.execute(sqlite_db.business.insert(), {"id": 1, "note": "x"})
        assert sqlite_db.outbox.add(session, "CLOSED", aggregate_id="c:1")
        session.rollback()
    assert sqlite_db.rows() == []
    assert sqlite_db.count(sqlite_db.business) == 0


def test_add_never_commits_with_a_connection(sqlite_db: Database) -> None:
    with sqlite_db.engine.connect() as conn:
        transaction = conn.begin()
        assert sqlite_db.outbox.add(conn, "CLOSED", aggregate_id="c:1")
        transaction.rollback()
    assert sqlite_db.rows() == []
    with sqlite_db.engine.connect() as conn, conn.begin():
        assert sqlite_db.outbox.add(conn, "CLOSED", aggregate_id="c:1")
    assert len(sqlite_db.rows()) == 1


def test_the_row_is_visible_to_the_caller_before_commit(sqlite_db: Database) -> None:
    with Session(sqlite_db.engine) as session, session.begin():
        sqlite_db.outbox.add(session, "CLOSED", aggregate_id="c:1", headers={"h": 1})
        table = sqlite_db.outbox.table
        row = session.execute(sa.select(table)).one()
        assert row.headers == {"h": 1}
        assert row.task_id is None and row.fence_key is None


def test_event_ids_are_stable_and_distinct() -> None:
    assert event_id("A", "1") == event_id("A", "1")
    assert len({event_id("A", "1"), event_id("A", "2"), event_id("B", "1")}) == 3
    # the pair is encoded unambiguously
    assert event_id("A:", "1") != event_id("A", ":1")


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"event_type": "", "aggregate_id": "1"}, "event_type"),
        ({"event_type": "A", "aggregate_id": 1}, "aggregate_id"),
        ({"event_type": "A", "aggregate_id": "x" * 256}, "aggregate_id"),
        ({"event_type": "A", "aggregate_id": "1", "headers": [1]}, "headers"),
        ({"event_type": "A", "aggregate_id": "1", "fence": ("k", -1)}, "fence"),
        ({"event_type": "A", "aggregate_id": "1", "fence": ("k", True)}, "fence"),
        ({"event_type": "A", "aggregate_id": "1", "fence": "k"}, "fence"),
    ],
)
def test_bad_arguments_are_named(
    sqlite_db: Database, kwargs: dict[str, object], argument: str
) -> None:
    with sqlite_db.engine.begin() as conn, pytest.raises(ConfigurationError) as info:
        sqlite_db.outbox.add(conn, **kwargs)  # type: ignore[arg-type]
    assert info.value.setting == argument


def test_add_rejects_what_is_not_a_transaction(sqlite_db: Database) -> None:
    with pytest.raises(ConfigurationError) as info:
        sqlite_db.outbox.add(sqlite_db.engine, "A", aggregate_id="1")  # type: ignore[arg-type]
    assert info.value.setting == "session_or_connection"


# -- fencing -----------------------------------------------------------------


def write(db: Database, note_id: int, fence: object, aggregate: str) -> bool:
    with Session(db.engine) as session, session.begin():
        session.execute(db.business.insert(), {"id": note_id, "note": "work"})
        return db.outbox.add(session, "CLOSED", aggregate_id=aggregate, fence=fence)


def test_a_lower_token_after_a_higher_one_is_rejected(sqlite_db: Database) -> None:
    assert write(sqlite_db, 1, ("job:7", 5), "a")
    with pytest.raises(LockLostError) as info:
        write(sqlite_db, 2, ("job:7", 4), "b")
    assert info.value.key == "job:7"
    assert "4" in info.value.reason and "5" in info.value.reason
    # the zombie's business write went with it
    with sqlite_db.engine.connect() as conn:
        ids = conn.execute(sa.select(sqlite_db.business.c.id)).scalars().all()
    assert ids == [1]
    assert [r.aggregate_id for r in sqlite_db.rows()] == ["a"]
    # equal and higher tokens pass; other keys are independent
    assert write(sqlite_db, 3, ("job:7", 5), "c")
    assert write(sqlite_db, 4, ("job:7", 9), "d")
    assert write(sqlite_db, 5, ("job:8", 1), "e")
    assert [(r.fence_key, r.fence_token) for r in sqlite_db.rows()][-1] == ("job:8", 1)


def test_a_zombie_that_swallows_the_error_still_commits_nothing(
    sqlite_db: Database,
) -> None:
    write(sqlite_db, 1, ("job:7", 5), "a")
    with Session(sqlite_db.engine) as session:
        session.begin()
        session.execute(sqlite_db.business.insert(), {"id": 2, "note": "zombie"})
        with pytest.raises(LockLostError):
            sqlite_db.outbox.add(
                session, "CLOSED", aggregate_id="b", fence=("job:7", 1)
            )
        session.commit()  # a careless zombie
    assert sqlite_db.count(sqlite_db.business) == 1
    assert len(sqlite_db.rows()) == 1


def test_a_lower_token_is_rejected_on_a_connection_too(sqlite_db: Database) -> None:
    with sqlite_db.engine.begin() as conn:
        sqlite_db.outbox.add(conn, "CLOSED", aggregate_id="a", fence=("k", 10))
    with sqlite_db.engine.connect() as conn, conn.begin():
        conn.execute(sqlite_db.business.insert(), {"id": 1, "note": "zombie"})
        with pytest.raises(LockLostError):
            sqlite_db.outbox.add(conn, "CLOSED", aggregate_id="b", fence=("k", 3))
    assert sqlite_db.count(sqlite_db.business) == 0


def test_the_running_tasks_fence_is_the_default(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(sqlite_db, 1, ("task-key", 100), "a")
    monkeypatch.setattr(writer_module, "current_fence", lambda: ("task-key", 99))
    with pytest.raises(LockLostError):
        write_default(sqlite_db, 2, "b")
    # fence=None turns fencing off, even inside a fenced task
    assert write(sqlite_db, 3, None, "c")
    monkeypatch.setattr(writer_module, "current_fence", lambda: ("task-key", 101))
    assert write_default(sqlite_db, 4, "d")
    assert sqlite_db.rows()[-1].fence_token == 101


def write_default(db: Database, note_id: int, aggregate: str) -> bool:
    with Session(db.engine) as session, session.begin():
        session.execute(db.business.insert(), {"id": note_id, "note": "work"})
        return db.outbox.add(session, "CLOSED", aggregate_id=aggregate)


def test_outside_a_task_the_default_is_unfenced(sqlite_db: Database) -> None:
    assert write_default(sqlite_db, 1, "a")
    assert sqlite_db.rows()[0].fence_key is None
    with sqlite_db.engine.connect() as conn:
        fences = conn.execute(sa.select(sqlite_db.outbox.fence_table)).all()
    assert fences == []


def test_an_outbox_without_engine_still_adds(sqlite_db: Database) -> None:
    detached = Outbox(table_name=sqlite_db.outbox.table_name)
    with sqlite_db.engine.begin() as conn:
        assert detached.add(conn, "CLOSED", aggregate_id="a")
    with pytest.raises(OutboxError):
        detached.create_all()


LEGACY = sa.__version__.startswith("1.")


@pytest.mark.skipif(LEGACY, reason="SQLAlchemy 2 connections begin on first use")
def test_a_connection_without_begin_commits_only_when_told(
    sqlite_db: Database,
) -> None:
    with sqlite_db.engine.connect() as conn:
        assert sqlite_db.outbox.add(conn, "A", aggregate_id="1")
        conn.rollback()
        assert sqlite_db.outbox.add(conn, "A", aggregate_id="1")
        conn.commit()
    assert len(sqlite_db.rows()) == 1


@pytest.mark.skipif(not LEGACY, reason="SQLAlchemy 1.4 legacy connections only")
def test_a_legacy_autocommit_connection_is_refused(sqlite_db: Database) -> None:
    with sqlite_db.engine.connect() as conn, pytest.raises(OutboxError):
        sqlite_db.outbox.add(conn, "A", aggregate_id="1")
    assert sqlite_db.rows() == []
