"""What the demo's task bodies say about their runs, kept in Redis lists.

Bodies append JSON entries to ``<namespace>:record:<run>:<kind>``; the runner
reads them back to count executions and find overlaps after the fact.
"""

from __future__ import annotations

import json
from typing import Any, Final

import redis

from .settings import DemoSettings

#: A body began (task_id, pid, start).
STARTED: Final = "started"
#: A body ended (task_id, pid, start, end, outcome, created).
FINISHED: Final = "finished"
#: A delivery reached a worker process, run or not (task_id).
DELIVERED: Final = "delivered"
#: A delivery was dropped by celery-dedup before its body (task_id).
DROPPED: Final = "dropped"


def append(
    client: redis.Redis, settings: DemoSettings, run: str, kind: str, entry: Any
) -> None:
    """Record one ``entry`` of ``kind`` for ``run``."""
    client.rpush(settings.record_key(run, kind), json.dumps(entry))


def entries(
    client: redis.Redis, settings: DemoSettings, run: str, kind: str
) -> list[dict[str, Any]]:
    """Everything recorded as ``kind`` for ``run``, oldest first."""
    raw = client.lrange(settings.record_key(run, kind), 0, -1)
    return [json.loads(item) for item in raw]


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most (start, end) spans that were open at the same moment."""
    events = sorted(
        [(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans]
    )
    running = most = 0
    for _, step in events:  # at equal times an end (-1) sorts before a start
        running += step
        most = max(most, running)
    return most
