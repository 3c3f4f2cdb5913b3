"""Django: the outbox written in the ORM's own transaction.

:func:`sqlalchemy_connection` lends a Django database's connection to
SQLAlchemy, inside the current ``transaction.atomic()`` block, so that
``Outbox.add()`` (or ``Inbox.first_time()``) writes with the ORM's writes:
Django commits both, or rolls both back. Needs Django and the ``outbox``
extra; PostgreSQL only (Django's backend on psycopg 3 or psycopg2).

Django owns the transaction, and SQLAlchemy never ends it. Its engine here
is one per Django connection, on that DBAPI connection, with a dialect that
never commits (a COMMIT asked of it raises), never closes the connection,
and skips the rollbacks SQLAlchemy makes on its own (after its first look at
the database, when a connection is given back). A rollback asked for while
the connection is lent (the outbox's fence refusing a stale execution, or
``connection.rollback()``) is done, on the whole transaction, and marks the
atomic block for rollback: the ORM refuses further queries until the block
ends, and Django rolls back then.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any, Final

import sqlalchemy
from django.db import (  # type: ignore[import-not-found,import-untyped,unused-ignore]
    DEFAULT_DB_ALIAS,
    connections,
    transaction,
)
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from .exceptions import OutboxError

__all__ = ["sqlalchemy_connection"]


class _InDjangosTransaction:
    """Mixed into a PostgreSQL dialect: the engine's one connection is
    Django's, inside Django's transaction."""

    alias: str = DEFAULT_DB_ALIAS
    lent = False  # inside the with block of sqlalchemy_connection()
    rolled_back = False

    def do_commit(self, dbapi_connection: Any) -> None:
        raise OutboxError(
            "Django commits this transaction: leave transaction.atomic() rather "
            "than committing the SQLAlchemy connection"
        )

    def do_rollback(self, dbapi_connection: Any) -> None:
        if self.lent and not self.rolled_back:
            dbapi_connection.rollback()
            self.rolled_back = True
            transaction.set_rollback(True, using=self.alias)

    def do_close(self, dbapi_connection: Any) -> None:
        """Django closes its own connection."""


class Psycopg2Dialect(_InDjangosTransaction, PGDialect_psycopg2):
    """``postgresql+psycopg2`` on a Django connection."""

    supports_statement_cache = True  # compiles as PGDialect_psycopg2 does


registry.register("postgresql.celery_dedup_psycopg2", __name__, "Psycopg2Dialect")
#: The SQLAlchemy driver for each DBAPI module of Django's PostgreSQL backend.
DRIVERS: Final = {"psycopg2": "celery_dedup_psycopg2"}

try:  # SQLAlchemy 2.0 and later
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
except ImportError:  # pragma: no cover - SQLAlchemy 1.4
    pass
else:

    class PsycopgDialect(_InDjangosTransaction, PGDialect_psycopg):
        """``postgresql+psycopg`` (psycopg 3) on a Django connection."""

        supports_statement_cache = True  # compiles as PGDialect_psycopg does

    registry.register("postgresql.celery_dedup_psycopg", __name__, "PsycopgDialect")
    DRIVERS["psycopg"] = "celery_dedup_psycopg"

#: The engine of each Django connection, with the DBAPI connection it was
#: made on (Django may reconnect); gone with the connection's wrapper.
_engines: weakref.WeakKeyDictionary[Any, tuple[Any, Engine]] = (
    weakref.WeakKeyDictionary()
)


def _engine(wrapper: Any, alias: str) -> Engine:
    """The engine of Django's connection ``wrapper`` (made on first use)."""
    dbapi_connection = wrapper.connection
    known = _engines.get(wrapper)
    if known is not None and known[0] is dbapi_connection:
        return known[1]
    module = wrapper.Database.__name__
    if wrapper.vendor != "postgresql" or module not in DRIVERS:
        raise OutboxError(
            "sqlalchemy_connection() supports PostgreSQL through "
            f"{' or '.join(sorted(DRIVERS))} (with SQLAlchemy "
            f"{sqlalchemy.__version__}); database {alias!r} is {wrapper.vendor} "
            f"through {module}"
        )
    engine = sqlalchemy.create_engine(
        f"postgresql+{DRIVERS[module]}://",
        creator=lambda: dbapi_connection,
        poolclass=StaticPool,
        pool_reset_on_return=None,
        # No hstore lookup on Django's connection; the dialect's setup still
        # runs on it once: psycopg2's registers the UUID type (Django does
        # too), psycopg 3's a handler logging the server's notices.
        use_native_hstore=False,
    )
    engine.dialect.alias = alias  # type: ignore[attr-defined]
    _engines[wrapper] = (dbapi_connection, engine)
    return engine


@contextlib.contextmanager
def sqlalchemy_connection(using: str | None = None) -> Iterator[Connection]:
    """A SQLAlchemy ``Connection`` in the transaction of Django's database
    ``using`` (``"default"``), for the block of a ``with`` statement.

    Call it inside ``transaction.atomic(using=...)``: outside, where Django
    commits each statement on its own, it raises
    :class:`~celery_dedup.exceptions.OutboxError`, as it does on a database
    other than PostgreSQL::

        with transaction.atomic(), sqlalchemy_connection() as conn:
            order.save()
            outbox.add(conn, "order.fulfilled", aggregate_id=f"order:{order.pk}")
    """
    alias = using or DEFAULT_DB_ALIAS
    wrapper = connections[alias]
    if not wrapper.in_atomic_block:
        raise OutboxError(
            "sqlalchemy_connection() writes in Django's transaction: call it "
            f"inside transaction.atomic(using={alias!r})"
        )
    wrapper.validate_no_broken_transaction()
    wrapper.ensure_connection()
    engine = _engine(wrapper, alias)
    dialect: Any = engine.dialect
    dialect.rolled_back = False
    with engine.connect() as conn:  # (the first time, SQLAlchemy looks around)
        conn.begin()  # nothing for the database; SQLAlchemy 1.4 needs it
        dialect.lent = True
        try:
            yield conn
        finally:
            dialect.lent = False
