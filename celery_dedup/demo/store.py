"""The demo's SQLite database: a business table, a naive event table, the outbox.

Each body ends by writing one business row and its event in one transaction.
The plain Celery variant does what code without celery-dedup does: a plain
``INSERT`` into an event table (or a direct publish) per run. The DedupTask
variant writes through :class:`~celery_dedup.outbox.Outbox`: unique per event
and fenced by the execution lease.
"""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa
from sqlalchemy.orm import Session

from celery_dedup.outbox import Outbox

EVENT_TYPE: Final = "CAMPAIGN_CLOSED"
OUTBOX_TABLE: Final = "celery_dedup_outbox"


class Store:
    """The tables of one demo database (a SQLite file in the demo's folder)."""

    def __init__(self, url: str) -> None:
        # Up to six processes write at once: let SQLite wait for its lock.
        self.outbox = Outbox(
            url,
            table_name=OUTBOX_TABLE,
            engine_options={"connect_args": {"timeout": 30}},
        )
        self.engine = self.outbox.engine
        metadata = self.outbox.metadata
        self.business = sa.Table(
            "demo_winners",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("aggregate_id", sa.String(255), nullable=False),
            sa.Column("task_id", sa.String(64), nullable=False),
        )
        self.plain_events = sa.Table(
            "demo_plain_events",  # what code without an outbox writes: no key
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("event_type", sa.String(255), nullable=False),
            sa.Column("aggregate_id", sa.String(255), nullable=False),
            sa.Column("task_id", sa.String(64), nullable=False),
        )

    def create(self) -> None:
        """Create the tables, in WAL mode so readers never wait for writers."""
        with self.engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        self.outbox.metadata.create_all(self.engine)

    def write(self, *, dedup: bool, aggregate_id: str, task_id: str) -> bool:
        """One business row and its event, in one transaction.

        Returns whether the event is new. Inside a DedupTask the outbox write
        is fenced: a body whose lease was taken over raises ``LockLostError``
        and the whole transaction, business row included, is rolled back.
        """
        with Session(self.engine) as session, session.begin():
            session.execute(
                self.business.insert().values(
                    aggregate_id=aggregate_id, task_id=task_id
                )
            )
            if dedup:
                return self.outbox.add(
                    session,
                    EVENT_TYPE,
                    aggregate_id=aggregate_id,
                    payload={"aggregate_id": aggregate_id},
                )
            session.execute(
                self.plain_events.insert().values(
                    event_type=EVENT_TYPE, aggregate_id=aggregate_id, task_id=task_id
                )
            )
            return True

    def counts(self, aggregate_id: str) -> tuple[int, int]:
        """(events in either event table, business rows) of one aggregate."""
        with self.engine.connect() as conn:
            events = sum(
                conn.execute(
                    sa.select(sa.func.count()).where(
                        table.c.aggregate_id == aggregate_id
                    )
                ).scalar_one()
                for table in (self.outbox.table, self.plain_events)
            )
            rows = conn.execute(
                sa.select(sa.func.count()).where(
                    self.business.c.aggregate_id == aggregate_id
                )
            ).scalar_one()
        return int(events), int(rows)

    def close(self) -> None:
        self.outbox.close()
