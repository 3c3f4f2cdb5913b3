"""The app of the standard layout: ``imports`` names ``tasks.py``.

Its Redis comes from ``DEDUP_TEST_REDIS_URL`` (the rig's, for the worker and
CLI processes) or from :func:`configure` (in the test process); settings in
the JSON of ``DEDUP_TEST_CONF`` go on top.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery

from celery_dedup.connection import reset

app = Celery("proj")
app.conf.imports = ("tests.apps.proj.tasks",)


def configure(url: str, **extra: Any) -> None:
    """Point the app (broker, dedup keys) at the Redis of ``url``."""
    app.conf.update(
        broker_url=url,
        broker_connection_retry_on_startup=True,
        task_default_queue=os.environ.get("DEDUP_TEST_QUEUE", "celery"),
        **extra,
    )
    reset(app)


if "DEDUP_TEST_REDIS_URL" in os.environ:
    configure(
        os.environ["DEDUP_TEST_REDIS_URL"],
        **json.loads(os.environ.get("DEDUP_TEST_CONF", "{}")),
    )
