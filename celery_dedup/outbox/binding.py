"""Engines, and the caller's transaction: shared by ``Outbox`` and ``Inbox``."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy
import sqlalchemy.future
from sqlalchemy import MetaData, Table, event, exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, scoped_session

from ..exceptions import ConfigurationError, OutboxError
from .table import MAX_NAME, MAX_TABLE_NAME

if TYPE_CHECKING:
    from typing import TypeAlias

    #: What ``add()`` and ``first_time()`` accept as the caller's transaction.
    Executor: TypeAlias = Connection | Session | scoped_session[Any]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_table_name(name: Any, argument: str = "table_name") -> str:
    """An SQL identifier short enough for the names derived from it."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ConfigurationError(argument, f"expected an SQL identifier, got {name!r}")
    if len(name) > MAX_TABLE_NAME:
        raise ConfigurationError(
            argument, f"at most {MAX_TABLE_NAME} characters, got {name!r}"
        )
    return name


def check_name(argument: str, value: Any) -> str:
    """A non-empty string that fits the tables' ``VARCHAR(255)`` columns."""
    if not isinstance(value, str) or not value:
        raise ConfigurationError(
            argument, f"expected a non-empty string, got {value!r}"
        )
    if len(value) > MAX_NAME:
        raise ConfigurationError(argument, f"at most {MAX_NAME} characters")
    return check_no_nul(argument, value)


def check_no_nul(argument: str, value: str) -> str:
    """A string without NUL: PostgreSQL cannot store one in text (its drivers
    fail with a bare ValueError or DataError), so no database gets one."""
    position = value.find("\x00")
    if position >= 0:
        raise ConfigurationError(
            argument,
            f"contains a NUL character (\\x00) at index {position}, which "
            f"PostgreSQL cannot store in text; got {value!r}",
        )
    return value


class TableOwner:
    """What ``Outbox`` and ``Inbox`` share: an engine (theirs to dispose if
    they made it from a URL), a ``MetaData`` and the tables they create."""

    #: The tables :meth:`create_all` creates; set by the subclass.
    tables: tuple[Table, ...] = ()

    def __init__(
        self,
        engine_or_url: Engine | str | None,
        metadata: MetaData | None,
        engine_options: Mapping[str, Any] | None,
    ) -> None:
        if metadata is not None and not isinstance(metadata, MetaData):
            raise ConfigurationError("metadata", f"expected MetaData, got {metadata!r}")
        self._engine = make_engine(engine_or_url, engine_options)
        self._owns_engine = isinstance(engine_or_url, str)
        self.metadata = metadata if metadata is not None else MetaData()

    @property
    def engine(self) -> Engine:
        """The engine given or made from the URL (needed to create tables)."""
        if self._engine is None:
            name = type(self).__name__
            raise OutboxError(f"this {name} has no engine: pass {name}(engine_or_url)")
        return self._engine

    def create_all(self) -> None:
        """Create the tables if missing (tests and demos; use Alembic in
        production, with ``metadata``)."""
        self.metadata.create_all(self.engine, tables=list(self.tables))

    def drop_all(self) -> None:
        """Drop the tables."""
        self.metadata.drop_all(self.engine, tables=list(self.tables))

    def close(self) -> None:
        """Close the pooled connections of an engine made from a URL."""
        if self._owns_engine and self._engine is not None:
            self._engine.dispose()


def make_engine(
    engine_or_url: Engine | str | None, options: Mapping[str, Any] | None
) -> Engine | None:
    """The engine given, or one created from a URL (with ``options``)."""
    if engine_or_url is None or isinstance(engine_or_url, Engine):
        if options:
            raise ConfigurationError(
                "engine_options", "only used when engine_or_url is a URL"
            )
        return engine_or_url
    if not isinstance(engine_or_url, str):
        raise ConfigurationError(
            "engine_or_url", f"expected an Engine or a URL, got {engine_or_url!r}"
        )
    engine = sqlalchemy.create_engine(engine_or_url, **dict(options or {}))
    _forget_pool_in_child(engine)
    return engine


def _forget_pool_in_child(engine: Engine) -> None:
    """Never hand a forked child a pooled connection its parent opened.

    A prefork worker forks children from the process whose relay thread uses
    this engine; a connection checked out in another process is discarded
    (without closing the parent's socket) and a new one opened.
    """

    @event.listens_for(engine, "connect")
    def remember_pid(dbapi_connection: Any, record: Any) -> None:
        record.info["pid"] = os.getpid()

    @event.listens_for(engine, "checkout")
    def check_pid(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.get("pid", os.getpid()) != os.getpid():
            record.dbapi_connection = proxy.dbapi_connection = None
            raise exc.DisconnectionError("connection opened by another process")


def transaction_connection(executor: Executor, table: Table) -> Connection:
    """The connection of the caller's transaction (beginning one on a Session)."""
    if isinstance(executor, Connection):
        # SQLAlchemy 2.x and 1.4's "future" connections begin a transaction on
        # first use and never commit by themselves; 1.4's legacy ones would
        # commit our INSERT at once.
        if not executor.in_transaction() and not isinstance(
            executor, sqlalchemy.future.Connection
        ):
            raise OutboxError(
                "the outbox writes only inside the caller's transaction: call "
                "connection.begin() first"
            )
        return executor
    if isinstance(executor, Session | scoped_session):
        return executor.connection(bind_arguments={"clause": table})
    raise ConfigurationError(
        "session_or_connection",
        f"expected a SQLAlchemy Session or Connection, got {executor!r}",
    )
