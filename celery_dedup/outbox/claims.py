"""The relay's claim: pending rows taken in one short transaction.

A row is claimable when it is pending, due (``next_attempt_at`` has passed),
not claimed or claimed longer than the claim timeout ago (its relay died),
and no earlier row of its aggregate is unpublished. That last rule keeps each
aggregate in order whatever the number of relays: only the earliest
unpublished row of an aggregate (its *head*) is ever claimable, and the next
becomes claimable only once the head's ``published`` state has committed,
which happens after it was published.

One claim transaction:

1. Select heads in id order, locked ``FOR UPDATE SKIP LOCKED`` where the
   database has it (PostgreSQL, MariaDB 10.6+, MySQL 8), so relays skip each
   other's rows instead of waiting; a blocking ``FOR UPDATE`` on older
   MySQL/MariaDB, which serialises relays; and no lock on SQLite, whose single
   writer serialises the next step. On MySQL/MariaDB the heads are found by a
   plain read and then only they are locked (see ``_select_heads``).
2. Behind each head it owns (every locked head; on SQLite, the heads its
   guarded stamp took), take the aggregate's next pending rows (its
   *followers*, up to the batch size, stopping at the first that is not due
   or is claimed by another): no other relay can claim them while the head is
   unpublished, so a hot aggregate moves a batch per pass, not a row.
3. Stamp heads and followers with this pass's claim token, guarded by the
   claimable test, and read back every row carrying it.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table, and_, exists, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from . import dialects
from .table import PENDING, UNPUBLISHED


@dataclasses.dataclass(frozen=True)
class Claimed:
    """One claimed row, as the relay publishes it."""

    id: int
    event_id: str
    event_type: str
    aggregate_id: str
    payload: Any
    headers: dict[str, Any] | None
    attempts: int
    created_at: datetime.datetime


def claim(
    engine: Engine,
    table: Table,
    *,
    token: str,
    now: datetime.datetime,
    claim_timeout: float,
    limit: int,
) -> tuple[list[Claimed], int]:
    """Claim up to ``limit`` rows; returns them in id order, and how many were
    taken over from a relay whose claim had expired."""
    stale = now - datetime.timedelta(seconds=claim_timeout)
    with engine.connect() as plain:
        conn = plain.execution_options(**dialects.read_committed(plain.dialect))
        with conn.begin():
            heads = _select_heads(conn, table, now, stale, limit)
            if not heads:
                return [], 0
            ids = [r.id for r in heads]
            if dialects.row_locks(conn.dialect):
                owned = {r.id: r.aggregate_id for r in heads}  # locked: ours
            else:
                _stamp(conn, table, ids, token, now, stale)
                owned = _owned(conn, table, ids, token)
                ids = []
            followers = _followers(conn, table, owned, now, stale, limit - len(owned))
            ids += [r.id for r in followers]
            if ids:
                _stamp(conn, table, ids, token, now, stale)
            c = table.c
            rows = conn.execute(
                select(
                    c.id,
                    c.event_id,
                    c.event_type,
                    c.aggregate_id,
                    c.payload,
                    c.headers,
                    c.attempts,
                    c.created_at,
                )
                .where(c.claim_token == token)
                .order_by(c.id)
            ).all()
    previous = {r.id: r.claim_token for r in [*heads, *followers]}
    claimed = [Claimed(*row) for row in rows]
    return claimed, sum(1 for r in claimed if previous.get(r.id))


def _claimable(
    t: Any, now: datetime.datetime, stale: datetime.datetime
) -> ColumnElement[bool]:
    return and_(
        t.c.state == PENDING,
        t.c.next_attempt_at <= now,
        or_(t.c.claim_token.is_(None), t.c.claimed_at < stale),
    )


def _select_heads(
    conn: Connection,
    table: Table,
    now: datetime.datetime,
    stale: datetime.datetime,
    limit: int,
) -> Sequence[Any]:
    earlier = table.alias("earlier")
    no_earlier = ~exists(
        select(earlier.c.id).where(
            earlier.c.aggregate_id == table.c.aggregate_id,
            earlier.c.state.in_(UNPUBLISHED),
            earlier.c.id < table.c.id,
        )
    )
    stmt = (
        select(table.c.id, table.c.aggregate_id, table.c.claim_token)
        .where(_claimable(table, now, stale), no_earlier)
        .order_by(table.c.id)
        .limit(limit)
    )
    skip = dialects.skip_locked(conn.dialect)
    if conn.dialect.name == "postgresql":
        # An outbox's statistics rarely know how many rows are pending (a new
        # table, or a backlog after a broker outage). Guessing "few",
        # PostgreSQL anti-joins and sorts every pending row to return the
        # first hundred, slower as the backlog grows. Without sorts, it walks
        # the pending index in id order and stops at the limit.
        conn.exec_driver_sql("SET LOCAL enable_sort = off")
        heads = conn.execute(stmt.with_for_update(skip_locked=skip)).all()
        conn.exec_driver_sql("SET LOCAL enable_sort = on")
        return heads
    if not dialects.row_locks(conn.dialect):
        return conn.execute(stmt).all()  # SQLite: the guarded stamp decides
    # MySQL/MariaDB: InnoDB keeps a lock on every row a locking scan reads,
    # heads or not, until the transaction ends, and another relay's UPDATE
    # that meets those locks can deadlock with it. So find the heads with a
    # plain read, then lock only them, re-checking that they are claimable.
    candidates = conn.execute(stmt).all()
    if not candidates:
        return []
    lock = (
        select(table.c.id)
        .where(
            table.c.id.in_([r.id for r in candidates]), _claimable(table, now, stale)
        )
        .with_for_update(skip_locked=skip)
    )
    locked = set(conn.execute(lock).scalars())
    return [r for r in candidates if r.id in locked]


def _stamp(
    conn: Connection,
    table: Table,
    ids: list[int],
    token: str,
    now: datetime.datetime,
    stale: datetime.datetime,
) -> None:
    """Claim those of ``ids`` that are still claimable."""
    conn.execute(
        update(table)
        .where(table.c.id.in_(ids), _claimable(table, now, stale))
        .values(claim_token=token, claimed_at=now)
    )


def _owned(
    conn: Connection, table: Table, ids: list[int], token: str
) -> dict[int, str]:
    """{id: aggregate} of those of ``ids`` that carry ``token``."""
    c = table.c
    rows = conn.execute(
        select(c.id, c.aggregate_id).where(c.id.in_(ids), c.claim_token == token)
    ).all()
    return {row.id: row.aggregate_id for row in rows}


def _followers(
    conn: Connection,
    table: Table,
    heads: dict[int, str],
    now: datetime.datetime,
    stale: datetime.datetime,
    limit: int,
) -> list[Any]:
    """The claimable rows right behind the heads this pass owns, in id order."""
    if limit <= 0 or not heads:
        return []
    c = table.c
    rows = conn.execute(
        select(
            c.id,
            c.aggregate_id,
            c.state,
            c.next_attempt_at,
            c.claim_token,
            c.claimed_at,
        )
        .where(
            c.aggregate_id.in_(set(heads.values())),
            c.state.in_(UNPUBLISHED),
            c.id.not_in(list(heads)),
        )
        .order_by(c.id)
        .limit(limit)
    ).all()
    head_of = {aggregate: head for head, aggregate in heads.items()}
    stopped: set[str] = set()
    taken = []
    for row in rows:
        if row.aggregate_id in stopped or row.id < head_of[row.aggregate_id]:
            continue
        free = row.claim_token is None or row.claimed_at < stale
        if row.state == PENDING and row.next_attempt_at <= now and free:
            taken.append(row)
        else:
            stopped.add(row.aggregate_id)
    return taken
