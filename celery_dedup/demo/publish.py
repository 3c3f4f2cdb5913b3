"""A publisher process for S1: one call, made many times.

    python -m celery_dedup.demo.publish TASK KWARGS_JSON COUNT SPAN START_AT

waits until the wall-clock time START_AT, makes COUNT ``apply_async`` calls
spread over SPAN seconds and prints one JSON line per call: the task id it got
back and whether the call was deduplicated. The settings come from the
``CELERY_DEDUP_DEMO`` environment variable, as for the workers.
"""

from __future__ import annotations

import json
import sys
import time

from .app import app


def main(argv: list[str]) -> None:
    name, kwargs, count, span, start_at = argv
    task = app.tasks[name]
    calls = int(count)
    time.sleep(max(0.0, float(start_at) - time.time()))
    for _ in range(calls):
        result = task.apply_async(kwargs=json.loads(kwargs))
        deduplicated = bool(getattr(result, "deduplicated", False))
        print(json.dumps({"id": result.id, "deduplicated": deduplicated}), flush=True)
        time.sleep(float(span) / calls)


if __name__ == "__main__":
    main(sys.argv[1:])
