"""Seed 001's "API" service: it only coordinates ``books.parse_epub``.

One of two services (with ``tests.apps.service_b``) that consume one queue:
both register ``books.parse_epub``, and each registers a task the other does
not. Its broker comes from ``DEDUP_TEST_REDIS_URL``, its queue from
``DEDUP_TEST_QUEUE`` and extra settings from ``DEDUP_TEST_CONF`` (JSON), as
the rig sets them for worker processes and the tests for ``celery dedup``.
"""

from __future__ import annotations

import json
import os

from celery import Celery

app = Celery("service_a")
app.conf.update(
    broker_url=os.environ.get("DEDUP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    task_default_queue=os.environ.get("DEDUP_TEST_QUEUE", "celery"),
    **json.loads(os.environ.get("DEDUP_TEST_CONF", "{}")),
)


@app.task(name="books.parse_epub")
def parse_epub(book_id: int) -> dict[str, object]:
    """The stub: "coordinates" in milliseconds and never parses the book."""
    return {"book_id": book_id, "note": "job coordinated"}


@app.task(name="api.send_welcome_email")
def send_welcome_email(user_id: int) -> int:
    return user_id
