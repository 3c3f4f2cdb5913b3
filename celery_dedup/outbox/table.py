"""The outbox and fence tables: columns, named constraints and indexes.

Timestamps are naive UTC (``DATETIME(6)`` on MySQL/MariaDB, for microseconds),
written by the application's clock, so every dialect stores and compares
them the same way.
"""

from __future__ import annotations

import datetime
from typing import Final

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql

#: A row waiting to be published (possibly claimed by a relay, or backing off).
PENDING: Final = "pending"
#: A row published to the broker; deleted after the relay's retention.
PUBLISHED: Final = "published"
#: A row that failed ``max_attempts`` times; it holds back its aggregate.
PARKED: Final = "parked"
STATES: Final = (PENDING, PUBLISHED, PARKED)
UNPUBLISHED: Final = (PENDING, PARKED)

#: Longest event type, aggregate id and dedup key accepted (and stored).
MAX_NAME: Final = 255
#: Longest table name: the derived names (``ix_<table>_published``, ...) must
#: stay within PostgreSQL's 63 and MySQL's 64 characters.
MAX_TABLE_NAME: Final = 48

_ID = BigInteger().with_variant(Integer(), "sqlite")  # SQLite: the rowid alias
_TIMESTAMP = (
    DateTime()
    .with_variant(mysql.DATETIME(fsp=6), "mysql")
    .with_variant(mysql.DATETIME(fsp=6), "mariadb")
)


def utcnow() -> datetime.datetime:
    """Now, as the naive UTC datetime the tables store."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def outbox_table(metadata: MetaData, name: str) -> Table:
    """The outbox table ``name``: one row per event, unique per type and aggregate."""
    state = Column("state", String(16), nullable=False, default=PENDING)
    published_at = Column("published_at", _TIMESTAMP, nullable=True)
    # The same expression as the relay's query, so each planner (SQLite
    # needs the very terms) matches the partial index.
    pending = state == PENDING
    return Table(
        name,
        metadata,
        Column("id", _ID, autoincrement=True, nullable=False),
        Column("event_id", String(36), nullable=False),
        Column("event_type", String(MAX_NAME), nullable=False),
        Column("aggregate_id", String(MAX_NAME), nullable=False),
        Column("payload", JSON(), nullable=True),
        Column("headers", JSON(), nullable=True),
        Column("fence_key", String(MAX_NAME), nullable=True),
        Column("fence_token", BigInteger(), nullable=True),
        Column("task_id", String(MAX_NAME), nullable=True),
        Column("created_at", _TIMESTAMP, nullable=False),
        state,
        Column("attempts", Integer(), nullable=False, default=0),
        Column("next_attempt_at", _TIMESTAMP, nullable=False),
        Column("claim_token", String(36), nullable=True),
        Column("claimed_at", _TIMESTAMP, nullable=True),
        published_at,
        Column("last_error", Text(), nullable=True),
        PrimaryKeyConstraint("id", name=f"pk_{name}"),
        UniqueConstraint("event_id", name=f"uq_{name}_event_id"),
        # The event's identity: add() inserts a pair at most once.
        UniqueConstraint("event_type", "aggregate_id", name=f"uq_{name}_event"),
        CheckConstraint(
            "state IN ({})".format(", ".join(f"'{s}'" for s in STATES)),
            name=f"ck_{name}_state",
        ),
        # The relay's scan: pending rows in id order. Partial where the
        # dialect has it (PostgreSQL, SQLite), so published rows cost nothing;
        # on MySQL/MariaDB the same columns as a composite index.
        Index(
            f"ix_{name}_pending",
            "state",
            "id",
            postgresql_where=pending,
            sqlite_where=pending,
        ),
        # "Is there an earlier unpublished row of this aggregate?": equality,
        # IN-list and range on the three columns. Not partial: with a partial
        # index, PostgreSQL's planner may scan all of it (no index condition)
        # when its statistics are missing or stale.
        Index(f"ix_{name}_aggregate", "aggregate_id", "state", "id"),
        # Retention: published rows by age.
        Index(
            f"ix_{name}_published",
            "published_at",
            postgresql_where=published_at.is_not(None),
            sqlite_where=published_at.is_not(None),
        ),
    )


def fence_table(metadata: MetaData, name: str) -> Table:
    """The fence table: the newest fencing token that wrote, per dedup key."""
    return Table(
        name,
        metadata,
        Column("dedup_key", String(MAX_NAME), nullable=False),
        Column("token", BigInteger(), nullable=False),
        PrimaryKeyConstraint("dedup_key", name=f"pk_{name}"),
    )


def inbox_table(metadata: MetaData, name: str) -> Table:
    """The consumer's inbox: one row per (consumer, event id) it processed."""
    return Table(
        name,
        metadata,
        Column("consumer", String(MAX_NAME), nullable=False),
        Column("event_id", String(MAX_NAME), nullable=False),
        Column("processed_at", _TIMESTAMP, nullable=False),
        PrimaryKeyConstraint("consumer", "event_id", name=f"pk_{name}"),
        Index(f"ix_{name}_processed_at", "processed_at"),
    )
