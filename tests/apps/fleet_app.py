"""A fleet's app: DedupTask as the app-wide default (``task_cls``), so only
tasks that opt in deduplicate; and a job meant to run once per period.

Configured like ``scenario_app`` from ``DEDUP_TEST_REDIS_URL``; the dedup keys
may live elsewhere (``DEDUP_TEST_DEDUP_REDIS_URL``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery

from celery_dedup import once_per_period
from tests.apps.scenario_app import record

app = Celery("fleet_app", task_cls="celery_dedup:DedupTask")
PERIOD = 2.0


def configure(url: str, dedup_url: str | None = None, **extra: Any) -> None:
    base = url.rsplit("/", 1)[0]
    app.conf.update(
        broker_url=f"{base}/0",
        result_backend=f"{base}/1",
        dedup_redis_url=dedup_url or f"{base}/0",
        broker_connection_retry_on_startup=True,
        task_default_queue=os.environ.get("DEDUP_TEST_QUEUE", "celery"),
        dedup_tasks={
            "tests.apps.fleet_app.listed_job": {"dedup_lock": "until_expired"}
        },
        task_annotations={
            "tests.apps.fleet_app.annotated_job": {"dedup_lock": "until_expired"}
        },
        **extra,
    )
    from celery_dedup.connection import reset

    reset(app)


if "DEDUP_TEST_REDIS_URL" in os.environ:
    configure(
        os.environ["DEDUP_TEST_REDIS_URL"],
        os.environ.get("DEDUP_TEST_DEDUP_REDIS_URL"),
        **json.loads(os.environ.get("DEDUP_TEST_CONF", "{}")),
    )


@app.task
def plain_job(n: int) -> int:
    """No dedup option: a plain Celery task, even on this app."""
    record("plain_job", None, time.time(), n=n)
    return n


@app.task(dedup_lock="until_expired")
def opted_job(n: int) -> int:
    record("opted_job", None, time.time(), n=n)
    return n


@app.task
def listed_job(n: int) -> int:
    """Opted in by its ``dedup_tasks`` entry."""
    return n


@app.task
def annotated_job(n: int) -> int:
    """Opted in by ``task_annotations``."""
    return n


@app.task(bind=True, **once_per_period(PERIOD))
def fleet_job(self: Any) -> None:
    """Seed 002's job: enqueued by every container and every beat."""
    record("fleet_job", self.request.id, time.time())
