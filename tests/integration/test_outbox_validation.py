"""``add()``'s checks on PostgreSQL (psycopg2, psycopg 3) and MariaDB.

PostgreSQL cannot store NUL in text: its drivers fail with their own errors
(a ValueError, a DataError). ``add()`` refuses a NUL id first, with a
ConfigurationError, and the database never sees the statement, so the
caller's transaction goes on. The payload, encoded once by ``add()``, reaches
every driver as JSON text.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from celery_dedup import ConfigurationError
from tests.integration import outbox_fixtures
from tests.integration.outbox_fixtures import Database

pytestmark = pytest.mark.outbox
server_db = outbox_fixtures.server_db


@pytest.fixture
def statements(server_db: Database) -> Iterator[list[str]]:
    """Every statement the engine sends to the database, as it sends it."""
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    sa.event.listen(server_db.engine, "before_cursor_execute", record)
    yield sent
    sa.event.remove(server_db.engine, "before_cursor_execute", record)


@pytest.mark.parametrize(
    ("arguments", "argument"),
    [
        ({"event_type": "CLOSED\x00"}, "event_type"),
        ({"aggregate_id": "order:\x001"}, "aggregate_id"),
        ({"fence": ("job:7\x00", 3)}, "fence"),
    ],
)
def test_a_nul_id_is_refused_before_the_database_sees_it(
    server_db: Database,
    statements: list[str],
    arguments: dict[str, Any],
    argument: str,
) -> None:
    outbox = server_db.outbox
    call = {"event_type": "CLOSED", "aggregate_id": "order:1", **arguments}
    with server_db.engine.connect() as conn, conn.begin():
        # Given a transaction with a business write done
        conn.execute(server_db.business.insert(), {"id": 1, "note": "kept"})
        statements.clear()
        # When add() gets a NUL in an id
        with pytest.raises(ConfigurationError) as info:
            outbox.add(conn, **call)
        # Then it names the argument, and nothing reached the database
        assert info.value.setting == argument
        assert "NUL" in info.value.message
        assert statements == []
        # And the transaction goes on: a good event and the write commit
        assert outbox.add(conn, "CLOSED", aggregate_id="order:1", fence=None)
    assert server_db.count(server_db.business) == 1
    assert [(r.event_type, r.aggregate_id) for r in server_db.rows()] == [
        ("CLOSED", "order:1")
    ]


def test_an_encoded_payload_is_stored_as_json(server_db: Database) -> None:
    # A NUL inside a payload string is fine: JSON spells it \u0000.
    payload = {"note": "a \x00 and é", "n": [1, 2.5, None, True], "empty": {}}
    with server_db.engine.begin() as conn:
        server_db.outbox.add(
            conn,
            "CLOSED",
            aggregate_id="order:1",
            payload=payload,
            headers={"h": [1]},
            fence=None,
        )
        server_db.outbox.add(conn, "OPENED", aggregate_id="order:1", fence=None)
    first, second = server_db.rows()
    assert (first.payload, first.headers) == (payload, {"h": [1]})
    assert (second.payload, second.headers) == (None, None)
