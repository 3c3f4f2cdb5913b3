"""``Outbox.add()`` checks its arguments before the database sees them (SQLite).

A payload must be strict JSON: what ``json`` cannot encode, or would encode
as something else (a non-string key, NaN), is refused with where it is. The
ids refuse NUL, and the payload ``max_payload`` bytes of JSON.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.orm import Session

from celery_dedup import ConfigurationError
from celery_dedup.outbox import Outbox
from tests.integration import outbox_fixtures
from tests.integration.outbox_fixtures import Database

pytestmark = pytest.mark.outbox
sqlite_db = outbox_fixtures.sqlite_db


def refused(db: Database, **arguments: Any) -> ConfigurationError:
    """The error of an add() that must fail, after checking nothing was written."""
    arguments = {
        "event_type": "CLOSED",
        "aggregate_id": "order:1",
        "fence": None,
        **arguments,
    }
    with db.engine.begin() as conn, pytest.raises(ConfigurationError) as info:
        db.outbox.add(conn, **arguments)
    assert db.rows() == []
    return info.value


@pytest.mark.parametrize(
    ("payload", "where", "words"),
    [
        (
            {"order": {"at": datetime.datetime(2025, 6, 1, 9, 14)}},
            "payload['order']['at']",
            "datetime is not JSON; convert it (e.g. .isoformat()) before add()",
        ),
        ({"day": datetime.date(2025, 6, 1)}, "payload['day']", "date is not JSON"),
        ({"total": decimal.Decimal("9.99")}, "payload['total']", "Decimal is not JSON"),
        ({"tags": {"a", "b"}}, "payload['tags']", "set is not JSON"),
        ({"blob": b"\x00\x01"}, "payload['blob']", "bytes is not JSON"),
        ({"id": uuid.uuid4()}, "payload['id']", "UUID is not JSON"),
        ([1, [2, object()]], "payload[1][1]", "object is not JSON"),
        ({"ratio": math.nan}, "payload['ratio']", "nan is not JSON"),
        ({"ratio": [math.inf]}, "payload['ratio'][0]", "inf is not JSON"),
        (-math.inf, "payload", "-inf is not JSON"),
        (
            {"lines": {1: "x"}},
            "payload['lines']",
            'key 1 is not a string, and JSON would silently turn it into "1"',
        ),
        ({True: 1}, "payload", 'JSON would silently turn it into "true"'),
        ({None: 1}, "payload", 'JSON would silently turn it into "null"'),
        ({(1, 2): 1}, "payload", "key (1, 2) is not a string"),
    ],
)
def test_a_payload_that_is_not_strict_json_is_refused_with_where(
    sqlite_db: Database, payload: Any, where: str, words: str
) -> None:
    error = refused(sqlite_db, payload=payload)
    assert error.setting == where
    assert words in error.message
    assert str(error).startswith(f"{where}: ")


def test_a_payload_that_contains_itself_is_refused(sqlite_db: Database) -> None:
    loop: dict[str, Any] = {"a": []}
    loop["a"].append(loop)
    error = refused(sqlite_db, payload=loop)
    assert error.setting == "payload['a'][0]"
    assert "circular" in error.message


def test_headers_are_strict_json_too(sqlite_db: Database) -> None:
    error = refused(sqlite_db, headers={"sent": datetime.datetime(2025, 1, 1)})
    assert error.setting == "headers['sent']"


@pytest.mark.parametrize(
    ("arguments", "argument"),
    [
        ({"event_type": "CLOSED\x00"}, "event_type"),
        ({"aggregate_id": "order:\x001"}, "aggregate_id"),
        ({"fence": ("job:\x00", 1)}, "fence"),
    ],
)
def test_a_nul_in_an_id_is_refused(
    sqlite_db: Database, arguments: dict[str, Any], argument: str
) -> None:
    error = refused(sqlite_db, **arguments)
    assert error.setting == argument
    assert "NUL" in error.message and "PostgreSQL" in error.message


def test_a_payload_over_max_payload_is_refused(sqlite_db: Database) -> None:
    # Given an outbox that takes 100 bytes of JSON
    outbox = Outbox(
        sqlite_db.engine, table_name=sqlite_db.outbox.table_name, max_payload=100
    )
    exact = {"text": "x" * (100 - len('{"text": ""}'))}
    over = {"text": "x" * (101 - len('{"text": ""}'))}
    # Then 100 bytes pass and 101 are refused, naming the size and the limit
    with sqlite_db.engine.begin() as conn:
        assert outbox.add(conn, "FITS", aggregate_id="a", payload=exact, fence=None)
        with pytest.raises(ConfigurationError) as info:
            outbox.add(conn, "BIG", aggregate_id="a", payload=over, fence=None)
    assert info.value.setting == "payload"
    assert "101 bytes" in info.value.message
    assert "max_payload (100 bytes)" in info.value.message
    assert [r.event_type for r in sqlite_db.rows()] == ["FITS"]


def test_the_size_is_the_encoded_size(sqlite_db: Database) -> None:
    # One "é" is 6 bytes of JSON ("\u00e9"): the size counted is what is stored.
    outbox = Outbox(
        sqlite_db.engine, table_name=sqlite_db.outbox.table_name, max_payload=20
    )
    with sqlite_db.engine.begin() as conn, pytest.raises(ConfigurationError):
        outbox.add(conn, "A", aggregate_id="a", payload="é" * 4, fence=None)


def test_the_default_limit_is_the_settings_default() -> None:
    assert Outbox().max_payload == 4 * 1024 * 1024


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "4MB"])
def test_a_bad_max_payload_is_named(limit: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        Outbox(max_payload=limit)
    assert info.value.setting == "max_payload"


def test_from_app_takes_the_setting_and_names_it(tmp_path: Any) -> None:
    app = Celery(
        "validation",
        set_as_current=False,
        config_source={
            "dedup_outbox_url": f"sqlite:///{tmp_path / 'app.db'}",
            "dedup_outbox_max_payload": 64,
        },
    )
    outbox = Outbox.from_app(app)
    outbox.create_all()
    try:
        assert outbox.max_payload == 64
        with outbox.engine.begin() as conn, pytest.raises(ConfigurationError) as info:
            outbox.add(conn, "A", aggregate_id="a", payload="x" * 100, fence=None)
        assert "dedup_outbox_max_payload (64 bytes)" in info.value.message
    finally:
        outbox.close()


@pytest.mark.parametrize(
    "url", ["not a url", "nosuchdialect://host/db", "mysql://u:secret@h/db"]
)
def test_from_app_names_a_url_sqlalchemy_cannot_open(url: str) -> None:
    app = Celery(
        "validation", set_as_current=False, config_source={"dedup_outbox_url": url}
    )
    with pytest.raises(ConfigurationError) as info:
        Outbox.from_app(app)
    assert info.value.setting == "dedup_outbox_url"
    assert "secret" not in str(info.value)


ACCEPTED = [
    None,
    0,
    -7,
    [2**70],
    1.5,
    [-0.0, 1.0],  # in a list: SQLite stores a bare -0.0 or 1.0 as the integer
    True,
    "",
    "text with é, ✓, \x00 and a newline\n",
    [],
    {},
    {"nested": {"list": [1, "two", None, False, {"deep": [[]]}]}},
    {"": "an empty key is a string"},
]


@pytest.mark.parametrize("payload", ACCEPTED, ids=repr)
def test_accepted_payloads_round_trip_unchanged(
    sqlite_db: Database, payload: Any
) -> None:
    with Session(sqlite_db.engine) as session, session.begin():
        assert sqlite_db.outbox.add(
            session,
            "CLOSED",
            aggregate_id="order:1",
            payload=payload,
            headers={"h": payload},
            fence=None,
        )
    [row] = sqlite_db.rows()
    assert row.payload == payload
    assert type(row.payload) is type(payload)
    assert row.headers == {"h": payload}


def test_the_stored_text_is_plain_json(sqlite_db: Database) -> None:
    # Encoded once, by add(): the column holds that text, not a re-encoding.
    payload = {"b": [1, 2.5], "a": "é"}
    with sqlite_db.engine.begin() as conn:
        sqlite_db.outbox.add(conn, "A", aggregate_id="a", payload=payload, fence=None)
    table = sqlite_db.outbox.table.name
    with sqlite_db.engine.connect() as conn:
        text, headers = conn.execute(
            sa.text(f"SELECT payload, headers FROM {table}")
        ).one()
    assert text == json.dumps(payload)
    assert headers == "null"


def test_tuples_are_stored_as_lists(sqlite_db: Database) -> None:
    # JSON arrays: a tuple is one too, and comes back as a list
    with sqlite_db.engine.begin() as conn:
        sqlite_db.outbox.add(
            conn, "A", aggregate_id="a", payload={"ids": (1, 2)}, fence=None
        )
    assert sqlite_db.rows()[0].payload == {"ids": [1, 2]}
