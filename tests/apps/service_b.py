"""Seed 001's "Workers" service: the real ``books.parse_epub``.

The other service of ``tests.apps.service_a``, configured the same way. Its
audio task is a ``DedupTask``, so ``celery dedup check`` reads its settings.
"""

from __future__ import annotations

import json
import os

from celery import Celery

from celery_dedup import DedupTask

app = Celery("service_b")
app.conf.update(
    broker_url=os.environ.get("DEDUP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    task_default_queue=os.environ.get("DEDUP_TEST_QUEUE", "celery"),
    **json.loads(os.environ.get("DEDUP_TEST_CONF", "{}")),
)


@app.task(name="books.parse_epub")
def parse_epub(book_id: int) -> dict[str, object]:
    """The real parser (here: a stand-in that says the book is ready)."""
    return {"book_id": book_id, "status": "READY"}


@app.task(base=DedupTask, name="workers.generate_audio", dedup_key=("book_id",))
def generate_audio(book_id: int) -> int:
    return book_id
