"""The tasks of the standard layout, imported through the app's ``imports``."""

from __future__ import annotations

import time

from celery_dedup import DedupTask

from .celery import app


@app.task(base=DedupTask, bind=True, dedup_lock="until_executed")
def build_report(self: DedupTask, report_id: int, pause: float) -> int:
    """Hold the key of ``report_id`` for ``pause`` seconds."""
    time.sleep(pause)
    return report_id
