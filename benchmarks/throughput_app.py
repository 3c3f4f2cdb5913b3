"""The app `benchmarks/throughput.py` runs in its worker: two no-op tasks."""

from __future__ import annotations

import os

from celery import Celery

from celery_dedup import DedupTask

app = Celery("throughput_app", broker=os.environ.get("BENCH_REDIS_URL", "redis://"))
app.conf.update(
    task_ignore_result=True,
    worker_prefetch_multiplier=16,
    task_default_queue="bench-throughput",
    broker_connection_retry_on_startup=True,
)
if os.environ.get("BENCH_DEDUP_URL"):  # the lock store; else the broker's Redis
    app.conf.dedup_redis_url = os.environ["BENCH_DEDUP_URL"]


@app.task(name="bench.plain_noop")
def plain_noop(n: int) -> None:
    """Nothing: the cost measured is Celery's own."""


@app.task(base=DedupTask, name="bench.dedup_noop")
def dedup_noop(n: int) -> None:
    """Nothing, under a claim and a lease."""
