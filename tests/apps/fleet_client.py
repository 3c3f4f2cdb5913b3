"""One container of seed 002's fleet: at start-up it enqueues the bootstrap
job, then the recurring one every period, on its own phase.

    python -m tests.apps.fleet_client START_AT OFFSET PERIODS

prints one JSON line per call: t0 and t1 around the call, id, deduplicated.
"""

from __future__ import annotations

import json
import os
import sys
import time

from tests.apps import fleet_app


def main(start_at: float, offset: float, periods: int) -> None:
    fleet_app.configure(os.environ["DEDUP_TEST_REDIS_URL"])
    queue = os.environ["DEDUP_TEST_QUEUE"]
    begin = start_at + offset
    for k in range(periods + 1):  # the bootstrap call, then one per period
        time.sleep(max(0.0, begin + k * fleet_app.PERIOD - time.time()))
        t0 = time.time()
        result = fleet_app.fleet_job.apply_async(queue=queue)
        t1 = time.time()
        print(
            json.dumps(
                {"t0": t0, "t1": t1, "id": result.id, "dup": result.deduplicated}
            )
        )


if __name__ == "__main__":
    main(float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))
