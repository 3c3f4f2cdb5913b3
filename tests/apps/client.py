"""A client process for the scenarios: publishes one call many times.

    python -m tests.apps.client TASK ARGS_JSON OPTIONS_JSON COUNT SPAN START_AT

waits until the wall-clock time START_AT, then calls ``apply_async`` COUNT
times spread over SPAN seconds and prints one JSON line per call.
"""

from __future__ import annotations

import json
import os
import sys
import time

from tests.apps import scenario_app


def main(argv: list[str]) -> None:
    task_name, args, options, count, span, start_at = argv
    scenario_app.configure(os.environ["DEDUP_TEST_REDIS_URL"])
    task = scenario_app.app.tasks[task_name]
    n = int(count)
    time.sleep(max(0.0, float(start_at) - time.time()))
    for _ in range(n):
        result = task.apply_async(json.loads(args), **json.loads(options))
        print(json.dumps({"id": result.id, "deduplicated": result.deduplicated}))
        time.sleep(float(span) / n)


if __name__ == "__main__":
    main(sys.argv[1:])
