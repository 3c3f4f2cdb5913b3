"""The log line and the signal of each dedup decision, in one place."""

from __future__ import annotations

import logging
from typing import Any

from . import signals

logger = logging.getLogger("celery_dedup")


def extra(
    task_name: str | None, key: str | None, task_id: str | None
) -> dict[str, Any]:
    """The ``extra`` fields of every log line about a decision."""
    return {"task_name": task_name, "dedup_key": key, "task_id": task_id}


def deduplicated(
    name: str, key: str, task_id: str | None, holder: str | None, stage: str
) -> None:
    """A call or a delivery was deduplicated onto ``holder``: log, signal."""
    logger.info(
        "Deduplicated %s at %s: key %s is held by task %s",
        name,
        stage,
        key,
        holder,
        extra={**extra(name, key, task_id), "stage": stage},
    )
    signals.task_deduplicated.send(
        sender=name, key=key, task_id=task_id, existing_task_id=holder, stage=stage
    )
