"""Tasks celery-dedup cannot edit: another library's base class, covered only
by ``dedup_tasks`` and ``install(app)``. Configured from the environment like
``scenario_app``."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery, Task

from celery_dedup import DedupTask, install
from tests.apps.scenario_app import mark_started, record

app = Celery("hooks_app")


class VendorTask(Task):  # type: ignore[type-arg]
    """A base class of someone else's: not a DedupTask."""


def configure(url: str, **extra: Any) -> None:
    base = url.rsplit("/", 1)[0]
    app.conf.update(
        broker_url=f"{base}/0",
        result_backend=f"{base}/1",
        broker_connection_retry_on_startup=True,
        task_default_queue=os.environ.get("DEDUP_TEST_QUEUE", "celery"),
        dedup_tasks={
            f"{__name__}.vendor_job": {"dedup_lock": "while_executing"},
            f"{__name__}.nightly": {"dedup_lock": "until_expired", "dedup_ttl": 60},
            f"{__name__}.handoff": {"dedup_lock": "until_executing", "dedup_ttl": 600},
        },
        **extra,
    )
    from celery_dedup.connection import reset

    reset(app)


if "DEDUP_TEST_REDIS_URL" in os.environ:
    configure(
        os.environ["DEDUP_TEST_REDIS_URL"],
        **json.loads(os.environ.get("DEDUP_TEST_CONF", "{}")),
    )


@app.task(base=VendorTask, bind=True)
def vendor_job(self: Any, n: int, pause: float = 1.0) -> int:
    started = time.time()
    mark_started("vendor_job", self.request.id)
    time.sleep(pause)
    record("vendor_job", self.request.id, started)
    return n


@app.task(base=VendorTask, bind=True)
def nightly(self: Any, n: int) -> int:
    record("nightly", self.request.id, time.time())
    return n


@app.task(base=VendorTask, bind=True)
def handoff(self: Any, n: int, pause: float = 0.5) -> int:
    """Holds its key until its body starts (``until_executing``)."""
    started = time.time()
    mark_started("handoff", self.request.id)
    time.sleep(pause)
    record("handoff", self.request.id, started)
    return n


@app.task(base=DedupTask, bind=True)
def report(self: Any, n: int, pause: float = 1.0) -> int:
    """A DedupTask that no ``dedup_tasks`` entry lists."""
    started = time.time()
    mark_started("report", self.request.id)
    time.sleep(pause)
    record("report", self.request.id, started)
    return n


if "DEDUP_TEST_REDIS_URL" in os.environ:  # a worker; the tests install it
    install(app)
