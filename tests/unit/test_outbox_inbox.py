"""``Inbox``: the consumer records each event id once, in its transaction."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from celery_dedup import ConfigurationError
from celery_dedup.outbox import Inbox
from celery_dedup.outbox.table import utcnow

pytestmark = pytest.mark.outbox


@pytest.fixture
def inbox(tmp_path: Path) -> Iterator[Inbox]:
    inbox = Inbox(f"sqlite:///{tmp_path / 'consumer.db'}", table_name="seen")
    inbox.create_all()
    yield inbox
    inbox.drop_all()
    inbox.close()


def test_an_event_id_is_new_once(inbox: Inbox) -> None:
    with Session(inbox.engine) as session, session.begin():
        assert inbox.first_time(session, "e-1")
        assert not inbox.first_time(session, "e-1")
        assert inbox.first_time(session, "e-2")
    with inbox.engine.begin() as conn:
        assert not inbox.first_time(conn, "e-1")


def test_a_rolled_back_consumer_sees_the_event_again(inbox: Inbox) -> None:
    with inbox.engine.connect() as conn:
        transaction = conn.begin()
        assert inbox.first_time(conn, "e-1")
        transaction.rollback()
    with inbox.engine.begin() as conn:
        assert inbox.first_time(conn, "e-1")


def test_consumers_are_independent(inbox: Inbox) -> None:
    billing = Inbox(table_name="seen", consumer="billing")
    with inbox.engine.begin() as conn:
        assert inbox.first_time(conn, "e-1")
        assert billing.first_time(conn, "e-1")
        assert not billing.first_time(conn, "e-1")


def test_prune_forgets_old_ids_of_this_consumer(inbox: Inbox) -> None:
    with inbox.engine.begin() as conn:
        inbox.first_time(conn, "old")
        inbox.first_time(conn, "new")
        conn.execute(
            sa.update(inbox.table)
            .where(inbox.table.c.event_id == "old")
            .values(processed_at=utcnow() - datetime.timedelta(days=2))
        )
    with inbox.engine.begin() as conn:
        assert inbox.prune(conn, older_than=86400) == 1
        assert inbox.first_time(conn, "old")
        assert not inbox.first_time(conn, "new")


def test_arguments_are_checked_by_name(inbox: Inbox) -> None:
    with pytest.raises(ConfigurationError) as info:
        Inbox(consumer="")
    assert info.value.setting == "consumer"
    with inbox.engine.begin() as conn, pytest.raises(ConfigurationError) as info:
        inbox.first_time(conn, "")
    assert info.value.setting == "event_id"
