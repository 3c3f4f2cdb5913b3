"""Code the outbox tests run in other processes (spawned, so kept light)."""

from __future__ import annotations

import multiprocessing.synchronize
from typing import Any

import sqlalchemy as sa

from celery_dedup.outbox import Outbox


def business_table(metadata: sa.MetaData, outbox_table: str) -> sa.Table:
    """A table standing for the caller's own data, written with each event."""
    return sa.Table(
        f"{outbox_table}_biz",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("note", sa.String(100), nullable=False),
    )


def add_same_event(
    url: str,
    table_name: str,
    index: int,
    barrier: multiprocessing.synchronize.Barrier,
    results: Any,
) -> None:
    """Write a business row, wait for the others, then add the shared event."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    outbox = Outbox(engine, table_name=table_name)
    business = business_table(outbox.metadata, table_name)
    try:
        with engine.begin() as conn:
            conn.execute(business.insert(), {"id": index, "note": f"writer {index}"})
            barrier.wait(timeout=60)
            created = outbox.add(
                conn, "CAMPAIGN_CLOSED", aggregate_id="campaign:42", payload={"n": 42}
            )
        results.put((index, created, None))
    except Exception as exc:
        results.put((index, None, repr(exc)))
    finally:
        engine.dispose()
