"""What differs per database: insert-if-absent, the fence update, row locks.

Every function here runs on the caller's connection, inside the caller's
transaction, and never commits.

Outcomes are decided from what the database returns, never from an INSERT's
``rowcount``. SQLAlchemy closes the cursor of an ``insert()`` construct
(upserts included) before anything reads its rowcount (it keeps the rowcount
of UPDATE, DELETE and textual SQL), and psycopg 3 resets ``rowcount`` to -1 on
close, unlike psycopg2, sqlite3 and PyMySQL: there every such INSERT reports
-1, whatever it did. Where SQLite has no ``RETURNING`` (before 3.35, or under
SQLAlchemy 1.4, whose SQLite dialect cannot compile it), SQLite's own
``changes()`` is read instead.

Insert-if-absent, per dialect:

- PostgreSQL and SQLite: ``INSERT ... ON CONFLICT DO NOTHING RETURNING``; a
  returned row is a new row. A concurrent insert of the same event waits for
  the other transaction, then does nothing. No conflict target is named: the
  outbox has two unique keys (the event id and the event's (type, aggregate)
  pair), and a target names one, so a racing duplicate could still fail on
  the other.
- MySQL/MariaDB: a plain ``INSERT``; duplicate-key error 1062 is caught. MySQL
  undoes only the failed statement, not the transaction, so the caller's other
  writes stand. It works on MySQL and MariaDB alike: MySQL has no ``INSERT
  ... RETURNING``, and on MariaDB (10.5+) only ``INSERT IGNORE ... RETURNING``
  would turn a duplicate into an empty result. The alternatives are wrong
  here: ``INSERT IGNORE`` also turns truncation and other errors into
  warnings, and ``ON DUPLICATE KEY UPDATE`` cannot say whether it inserted,
  because SQLAlchemy's MySQL drivers set ``CLIENT_FOUND_ROWS`` (a no-op update
  then reports 1 row, like an insert).
- Any other database: the plain ``INSERT`` in a savepoint, rolled back to on
  ``IntegrityError``.

Whenever nothing was inserted, the row with the same unique values is read
back: it must exist, else the conflict was with something else (a broken id
sequence, say) and is an error, not a duplicate. On MySQL that read is a
locking one, which sees the latest commit even in a REPEATABLE READ snapshot.

The fence, per dialect:

- PostgreSQL and SQLite: one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE``
  the stored token is not newer, ``RETURNING`` the token (or ``changes()``):
  a row written means the token passed (inserted, raised or kept), none that a
  newer one had.
- MySQL/MariaDB and any other database: the row is made to exist (``INSERT
  ... ON DUPLICATE KEY UPDATE`` as a no-op on MySQL), its token read with
  ``SELECT ... FOR UPDATE`` (the latest commit, locked until the caller's
  transaction ends), compared, and raised if older.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from sqlalchemy import Table, exc, func, select, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.elements import ColumnElement

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
    ``values`` may hold SQL expressions (such as an already encoded JSON value),
    so it goes into the statement, not into the execution's parameters.
    """
    name = conn.dialect.name
    if name in _ON_CONFLICT:
        stmt = _upsert(name, table).values(dict(values)).on_conflict_do_nothing()
        if _wrote(conn, stmt, table.c[unique[0]]):
            return True
        if _exists(conn, table, values, unique):
            return False
        raise OutboxError(
            f"an INSERT into {table.name} conflicted with a row other than "
            f"the one with the same {', '.join(unique)}"
        )
    if is_mysql(conn.dialect):
        try:
            conn.execute(table.insert().values(dict(values)))
        except exc.IntegrityError as error:
            code = getattr(error.orig, "args", (None,))[0]
            if code == _DUPLICATE_KEY and _exists(conn, table, values, unique):
                return False
            raise
        return True
    savepoint = conn.begin_nested()
    try:
        conn.execute(table.insert().values(dict(values)))
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


def _returning(dialect: Dialect) -> bool:
    """Whether an ``INSERT ... ON CONFLICT`` can take a ``RETURNING`` clause.

    PostgreSQL always can. SQLite can from 3.35, which SQLAlchemy 2 detects
    (``insert_returning``); SQLAlchemy 1.4 has no such flag, nor RETURNING on
    SQLite.
    """
    if dialect.name == "postgresql":
        return True
    return bool(getattr(dialect, "insert_returning", False))


def _wrote(
    conn: Connection,
    stmt: postgresql.Insert | sqlite.Insert,
    column: ColumnElement[Any],
) -> bool:
    """Run an ``INSERT ... ON CONFLICT``; whether it inserted or updated a row.

    Read from the row ``RETURNING`` gives back, or, on SQLite without it, from
    ``changes()`` (rows written by this connection's last statement), never
    from the driver's rowcount (see the module docstring).
    """
    if _returning(conn.dialect):
        return conn.execute(stmt.returning(column)).first() is not None
    conn.execute(stmt)
    return bool(conn.execute(select(func.changes())).scalar_one())


def advance_fence(conn: Connection, table: Table, key: str, token: int) -> bool:
    """Raise the fence of ``key`` to ``token``; False if a newer token passed.

    True when ``token`` is at least the stored one (which is then ``token``).
    The row stays locked until the caller's transaction ends, which serialises
    writers of one key: a lower token that arrives after a higher one has
    committed is rejected. The outcome is what the database returned (a row
    from ``RETURNING``, ``changes()``, or the locked token), never a rowcount.
    """
    c = table.c
    values = {"dedup_key": key, "token": token}
    name = conn.dialect.name
    if name in _ON_CONFLICT:
        # One statement: insert, or update only where the stored token is not
        # newer. It writes (and returns) a row unless the WHERE rejected it.
        insert = _upsert(name, table).values(values)
        stmt = insert.on_conflict_do_update(
            index_elements=[c.dedup_key],
            set_={"token": insert.excluded.token},
            where=c.token <= insert.excluded.token,
        )
        return _wrote(conn, stmt, c.token)
    if is_mysql(conn.dialect):
        # Insert, or a no-op on a duplicate (its rowcount is not read); either
        # way InnoDB now holds the row's exclusive lock.
        ensure = mysql.insert(table).on_duplicate_key_update(token=c.token)
        conn.execute(ensure, values)
    elif conn.execute(table.select().where(c.dedup_key == key)).first() is None:
        insert_if_absent(conn, table, values, ["dedup_key"])
    # A locking read sees the latest commit, even in a REPEATABLE READ
    # snapshot, and keeps other writers of the key out until we commit.
    stored = select(c.token).where(c.dedup_key == key).with_for_update()
    newest = int(conn.execute(stored).scalar_one())
    if newest > token:
        return False
    if newest < token:
        conn.execute(
            update(table).where(c.dedup_key == key, c.token < token).values(token=token)
        )
    return True


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
