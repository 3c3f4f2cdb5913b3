"""The Celery app of the outbox's worker and CLI tests, configured from env.

It imports nothing of the outbox at module level: a user who sets
``dedup_outbox_relay = True`` and uses ``base=DedupTask`` gets the in-worker
relay from ``import celery_dedup`` alone.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_dedup import DedupTask

app = Celery("outbox_app")
_base = os.environ["DEDUP_TEST_REDIS_URL"].rsplit("/", 1)[0]
app.conf.update(
    broker_url=f"{_base}/0",
    dedup_redis_url=f"{_base}/0",
    broker_connection_retry_on_startup=True,
    task_default_queue=os.environ.get("DEDUP_TEST_QUEUE", "celery"),
    dedup_outbox_url=os.environ["DEDUP_TEST_OUTBOX_URL"],
    dedup_outbox_table=os.environ["DEDUP_TEST_OUTBOX_TABLE"],
    dedup_outbox_exchange=os.environ["DEDUP_TEST_OUTBOX_EXCHANGE"],
    dedup_outbox_relay=os.environ.get("DEDUP_TEST_OUTBOX_RELAY") == "1",
)


@app.task(base=DedupTask, bind=True, dedup_key=("campaign_id",))
def close_campaign(self: Any, campaign_id: int) -> None:
    """Close a campaign and say so through the outbox, in one transaction."""
    from sqlalchemy.orm import Session

    from celery_dedup.outbox import Outbox

    outbox = Outbox.from_app(app)
    with Session(outbox.engine) as session, session.begin():
        outbox.add(
            session,
            "CAMPAIGN_CLOSED",
            aggregate_id=f"campaign:{campaign_id}",
            payload={"campaign_id": campaign_id},
        )
