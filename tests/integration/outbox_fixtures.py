"""Databases and a broker for the outbox tests.

Every database test runs once per driver: SQLite (sqlite3) in the test's
tmp_path; PostgreSQL through psycopg2 (``DEDUP_TEST_POSTGRES_URL``) and
through psycopg 3 (``DEDUP_TEST_PSYCOPG_URL``, by default the same server as
``postgresql+psycopg``); MariaDB through PyMySQL (``DEDUP_TEST_MYSQL_URL``).
Every test gets its own table names (so parallel runs and leftovers never
collide), dropped after. A server that cannot be reached skips its tests,
unless ``CI`` is set. The psycopg 3 runs are skipped, with the reason, under
SQLAlchemy 1.4, which has no psycopg 3 dialect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.dialects import registry

from celery_dedup.outbox import Outbox
from tests.apps.outbox_workers import business_table
from tests.rig import RedisServer

POSTGRES_URL = os.environ.get(
    "DEDUP_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
PSYCOPG_URL = os.environ.get(
    "DEDUP_TEST_PSYCOPG_URL",
    sa.engine.make_url(POSTGRES_URL)
    .set(drivername="postgresql+psycopg")
    .render_as_string(hide_password=False),
)
MYSQL_URL = os.environ.get(
    "DEDUP_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"
)
#: The parameter of the psycopg 3 runs (the psycopg2 ones are "postgresql").
PSYCOPG = "postgresql+psycopg"


def psycopg_unavailable() -> str | None:
    """Why the psycopg 3 runs cannot happen here, or None if they can."""
    try:
        registry.load("postgresql.psycopg")
    except sa.exc.NoSuchModuleError:
        return (
            f"SQLAlchemy {sa.__version__} has no postgresql+psycopg (psycopg 3) "
            "dialect; it came with SQLAlchemy 2.0"
        )
    if importlib.util.find_spec("psycopg") is None and not os.environ.get("CI"):
        return "psycopg 3 is not installed (pip install 'psycopg[binary]')"
    return None


def _psycopg_param() -> Any:
    reason = psycopg_unavailable()
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(PSYCOPG, id=PSYCOPG, marks=marks)


#: PostgreSQL through psycopg2, then through psycopg 3.
POSTGRES_DRIVERS = ("postgresql", _psycopg_param())
SERVERS = (*POSTGRES_DRIVERS, "mysql")


def database_url(dialect: str, tmp_path: Path) -> str:
    if dialect == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.db'}"
    return {"postgresql": POSTGRES_URL, PSYCOPG: PSYCOPG_URL, "mysql": MYSQL_URL}[
        dialect
    ]


def unique_table() -> str:
    return f"ob_{uuid.uuid4().hex[:12]}"


@dataclasses.dataclass
class Database:
    """One database with a fresh outbox and a business table in it."""

    #: The fixture parameter: sqlite, postgresql (psycopg2),
    #: postgresql+psycopg (psycopg 3) or mysql.
    dialect: str
    url: str
    engine: sa.engine.Engine
    outbox: Outbox
    business: sa.Table

    def new_engine(self) -> sa.engine.Engine:
        """Another engine on the same database (another relay, say)."""
        return sa.create_engine(self.url)

    def rows(self, **where: Any) -> list[Any]:
        """The outbox rows in id order, optionally filtered by column values."""
        t = self.outbox.table
        stmt = sa.select(t).order_by(t.c.id)
        for column, value in where.items():
            stmt = stmt.where(t.c[column] == value)
        with self.engine.connect() as conn:
            return list(conn.execute(stmt).all())

    def count(self, table: sa.Table) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            )


@contextlib.contextmanager
def open_database(dialect: str, tmp_path: Path) -> Iterator[Database]:
    url = database_url(dialect, tmp_path)
    engine = sa.create_engine(url)
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as exc:
        engine.dispose()
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{dialect} is not reachable at {url}: {exc.orig}")
    table = unique_table()
    outbox = Outbox(engine, table_name=table)
    business = business_table(outbox.metadata, table)
    outbox.metadata.create_all(engine)
    try:
        yield Database(dialect, url, engine, outbox, business)
    finally:
        outbox.metadata.drop_all(engine)
        engine.dispose()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    with open_database("sqlite", tmp_path) as db:
        yield db


@pytest.fixture(params=SERVERS)
def server_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """PostgreSQL (psycopg2, then psycopg 3), then MariaDB."""
    with open_database(request.param, tmp_path) as db:
        yield db


@pytest.fixture(params=("sqlite", *SERVERS))
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """SQLite, PostgreSQL (psycopg2, then psycopg 3), then MariaDB."""
    with open_database(request.param, tmp_path) as db:
        yield db


@pytest.fixture(params=POSTGRES_DRIVERS)
def postgres_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """PostgreSQL through psycopg2, then through psycopg 3."""
    with open_database(request.param, tmp_path) as db:
        yield db


@pytest.fixture(params=POSTGRES_DRIVERS)
def postgres_url(request: pytest.FixtureRequest) -> str:
    """The PostgreSQL URL of psycopg2, then of psycopg 3 (for worker processes)."""
    return {"postgresql": POSTGRES_URL, PSYCOPG: PSYCOPG_URL}[request.param]


class EventQueue:
    """A queue bound to the outbox exchange with ``#``: every event lands here."""

    def __init__(self, broker_url: str, exchange: str) -> None:
        self.exchange_name = exchange
        self.connection = kombu.Connection(broker_url)
        topic = kombu.Exchange(exchange, type="topic", durable=True)
        self.queue = kombu.Queue(f"{exchange}.all", topic, routing_key="#")
        self.queue(self.connection.default_channel).declare()

    def drain(self) -> list[kombu.Message]:
        """Every message waiting in the queue, oldest first (removed from it)."""
        bound = self.queue(self.connection.default_channel)
        messages = []
        while (message := bound.get(no_ack=True)) is not None:
            messages.append(message)
        return messages

    def close(self) -> None:
        self.connection.release()


@pytest.fixture
def broker_url(redis_server: RedisServer, redis_client: redis.Redis) -> str:
    """The test rig's redis-server (flushed before the test) as a kombu broker."""
    return redis_server.url()


@pytest.fixture
def events(broker_url: str) -> Iterator[EventQueue]:
    queue = EventQueue(broker_url, f"events.{uuid.uuid4().hex[:8]}")
    yield queue
    queue.close()


@pytest.fixture
def memory_events() -> Iterator[EventQueue]:
    """The same on kombu's in-process ``memory://`` transport (no server)."""
    queue = EventQueue("memory://", f"events.{uuid.uuid4().hex[:8]}")
    yield queue
    queue.close()
