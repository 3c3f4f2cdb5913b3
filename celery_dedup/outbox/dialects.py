"""What differs per database: insert-if-absent, the fence update, row locks.

Every function here runs on the caller's connection, inside the caller's
transaction, and never commits.

Insert-if-absent, per dialect:

- PostgreSQL and SQLite: ``INSERT ... ON CONFLICT DO NOTHING``; rowcount 1
  is a new row. A concurrent insert of the same event waits for the other
  transaction, then does nothing. No conflict target is named: the outbox has
  two unique keys (the event id and the event's (type, aggregate) pair), and a
  target names one, so a racing duplicate could still fail on the other.
- MySQL/MariaDB: a plain ``INSERT``; duplicate-key error 1062 is caught. MySQL
  undoes only the failed statement, not the transaction, so the caller's other
  writes stand. The alternatives are wrong here: ``INSERT IGNORE`` also turns
  truncation and other errors into warnings, and ``ON DUPLICATE KEY UPDATE``
  cannot say whether it inserted, because SQLAlchemy's MySQL drivers set
  ``CLIENT_FOUND_ROWS`` (a no-op update then reports 1 row, like an insert).
- Any other database: the plain ``INSERT`` in a savepoint, rolled back to on
  ``IntegrityError``.

Whenever nothing was inserted, the row with the same unique values is read
back: it must exist, else the conflict was with something else (a broken id
sequence, say) and is an error, not a duplicate. On MySQL that read is a
locking one, which sees the latest commit even in a REPEATABLE READ snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from sqlalchemy import Table, exc, select, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect

from ..exceptions import OutboxError

_MYSQL: Final = frozenset({"mysql", "mariadb"})
_ON_CONFLICT: Final = frozenset({"postgresql", "sqlite"})
_DUPLICATE_KEY: Final = 1062  # MySQL's ER_DUP_ENTRY


def is_mysql(dialect: Dialect) -> bool:
    """MySQL or MariaDB, whatever the driver calls itself."""
    return dialect.name in _MYSQL


def insert_if_absent(
    conn: Connection, table: Table, values: Mapping[str, Any], unique: Sequence[str]
) -> bool:
    """Insert ``values`` unless a row with the same ``unique`` columns exists.

    Returns True if a row was inserted, False if that row was already there.
    """
    name = conn.dialect.name
    if name in _ON_CONFLICT:
        stmt = _upsert(name, table).on_conflict_do_nothing()
        if conn.execute(stmt, dict(values)).rowcount == 1:
            return True
        if _exists(conn, table, values, unique):
            return False
        raise OutboxError(
            f"an INSERT into {table.name} conflicted with a row other than "
            f"the one with the same {', '.join(unique)}"
        )
    if is_mysql(conn.dialect):
        try:
            conn.execute(table.insert(), dict(values))
        except exc.IntegrityError as error:
            code = getattr(error.orig, "args", (None,))[0]
            if code == _DUPLICATE_KEY and _exists(conn, table, values, unique):
                return False
            raise
        return True
    savepoint = conn.begin_nested()
    try:
        conn.execute(table.insert(), dict(values))
    except exc.IntegrityError:
        savepoint.rollback()
        if _exists(conn, table, values, unique):
            return False
        raise
    savepoint.commit()
    return True


def _exists(
    conn: Connection, table: Table, values: Mapping[str, Any], unique: Sequence[str]
) -> bool:
    stmt = select(table.c[unique[0]]).where(
        *(table.c[column] == values[column] for column in unique)
    )
    if is_mysql(conn.dialect):
        stmt = stmt.with_for_update(read=True)
    return conn.execute(stmt).first() is not None


def _upsert(dialect_name: str, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT with ``ON CONFLICT`` clauses, for PostgreSQL or SQLite."""
    if dialect_name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def advance_fence(conn: Connection, table: Table, key: str, token: int) -> bool:
    """Raise the fence of ``key`` to ``token``; False if a newer token passed.

    The row is inserted if absent, then conditionally updated; the row lock
    taken by the update serialises writers of one key until they commit, so a
    lower token that arrives after a higher one has committed matches no row.
    """
    c = table.c
    values = {"dedup_key": key, "token": token}
    name = conn.dialect.name
    if name in _ON_CONFLICT:
        # One statement: insert, or update only where the stored token is not
        # newer. The rowcount is 0 exactly when the WHERE clause rejected it.
        insert = _upsert(name, table)
        stmt = insert.on_conflict_do_update(
            index_elements=[c.dedup_key],
            set_={"token": insert.excluded.token},
            where=c.token <= insert.excluded.token,
        )
        return conn.execute(stmt, values).rowcount == 1
    if is_mysql(conn.dialect):
        # A no-op on a duplicate; its rowcount is ambiguous, so it is not read.
        ensure = mysql.insert(table).on_duplicate_key_update(token=c.token)
        conn.execute(ensure, values)
    elif conn.execute(table.select().where(c.dedup_key == key)).first() is None:
        insert_if_absent(conn, table, values, ["dedup_key"])
    # With CLIENT_FOUND_ROWS (set by SQLAlchemy's MySQL drivers) the rowcount
    # is rows matched, so an equal token counts as passing, as it should.
    raise_it = update(table).where(c.dedup_key == key, c.token <= token)
    return conn.execute(raise_it.values(token=token)).rowcount == 1


def skip_locked(dialect: Dialect) -> bool:
    """Whether ``SELECT ... FOR UPDATE SKIP LOCKED`` is available."""
    if dialect.name == "postgresql":
        return True  # since 9.5
    if is_mysql(dialect):
        version = tuple(dialect.server_version_info or ())
        if getattr(dialect, "is_mariadb", False):
            return version >= (10, 6)
        return version >= (8, 0, 1)
    return False


def row_locks(dialect: Dialect) -> bool:
    """Whether ``SELECT ... FOR UPDATE`` locks rows (SQLite has no row locks)."""
    return dialect.name != "sqlite"


def read_committed(dialect: Dialect) -> dict[str, str]:
    """Execution options for the relay's short transactions.

    READ COMMITTED: every statement sees the latest commits, and InnoDB takes
    no gap locks, so two relays do not block each other's scans.
    """
    if dialect.name == "postgresql" or is_mysql(dialect):
        return {"isolation_level": "READ COMMITTED"}
    return {}
