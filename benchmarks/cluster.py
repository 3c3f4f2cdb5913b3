"""Lock operations per second: one Redis node against a 3-master Redis Cluster.

    python3 -m benchmarks.cluster [--ops 3000] [--rounds 5] [--json PATH]

Starts a private redis-server and a Redis Cluster of three masters on free
loopback ports (the test rig's helpers). A lock operation is what one task
does to Redis: claim, acquire and release a key, through the Store of
``get_backend(app)`` for an app whose ``dedup_redis_url`` names the node or
the cluster. Every operation has a key of its own, so a cluster's operations
spread over its slots. Each round times ``--ops`` operations on each (the
order alternating, so both see the same machine); prints the median
operations per second of the rounds, their spread, and the ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery

from celery_dedup.connection import get_backend, reset
from celery_dedup.lease import member
from celery_dedup.model import ClaimStatus, LeaseStatus
from celery_dedup.store import Store
from tests.redis_topologies import Cluster
from tests.rig import RedisServer


def ops_per_second(store: Store, n: int) -> float:
    """Time ``n`` claim + acquire + release cycles, each on a fresh key."""
    keys = [uuid.uuid4().hex for _ in range(n)]
    start = time.perf_counter()
    for key in keys:
        held_by = member(key, "bench", 1, None)
        if store.claim(key, key, 60).status is not ClaimStatus.NEW:
            raise SystemExit(f"claim of {key} was not NEW")
        acquired = store.acquire(
            key, held_by, key, ttl=30, max_running=1, fence_ttl=90, free_claim=True
        )
        if acquired.status is not LeaseStatus.ACQUIRED:
            raise SystemExit(f"acquire of {key}: {acquired.status.name}")
        store.release(key, held_by, key, free_claim=True, done_ttl=0)
    return n / (time.perf_counter() - start)


def app_for(url: str) -> Celery:
    app = Celery("bench-cluster", broker="memory://", set_as_current=False)
    app.conf.dedup_redis_url = url
    return app


def measure(urls: dict[str, str], ops: int, rounds: int) -> dict[str, list[float]]:
    apps = {name: app_for(url) for name, url in urls.items()}
    try:
        backends = {name: get_backend(app) for name, app in apps.items()}
        for backend in backends.values():  # connections, scripts, slot map
            ops_per_second(backend.store, min(ops, 200))
        figures: dict[str, list[float]] = {name: [] for name in urls}
        names = list(urls)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                backends[name].redis.flushall()  # every primary of a cluster
                figures[name].append(ops_per_second(backends[name].store, ops))
        return figures
    finally:
        for app in apps.values():
            reset(app)


def table(figures: dict[str, list[float]], ops: int) -> str:
    rounds = len(next(iter(figures.values())))
    lines = [
        f"claim + acquire + release, {ops} keys per round, median of {rounds} rounds",
        f"  {'Redis':<18} {'ops/s':>8} {'min':>8} {'max':>8} {'us/op':>8}",
    ]
    for name, values in figures.items():
        median = statistics.median(values)
        lines.append(
            f"  {name:<18} {median:8.0f} {min(values):8.0f} {max(values):8.0f}"
            f" {1e6 / median:8.1f}"
        )
    single, cluster = (statistics.median(v) for v in figures.values())
    lines.append(f"  ratio cluster/single {cluster / single:.3f}")
    return "\n".join(lines)


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # runs the clean-up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, metavar="PATH")
    options = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    single, cluster = RedisServer(workdir), Cluster(masters=3)
    try:
        single.start()
        cluster.start()
        urls = {"1 node": single.url(), "cluster, 3 masters": cluster.url}
        figures = measure(urls, options.ops, options.rounds)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        cluster.stop()
        single.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(figures, options.ops))
    if options.json is not None:
        medians = {name: statistics.median(v) for name, v in figures.items()}
        single_ops, cluster_ops = medians.values()
        result = {
            "ops_per_round": options.ops,
            "rounds": figures,
            "median_ops_per_second": medians,
            "ratio_cluster_single": cluster_ops / single_ops,
            "cores": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
        }
        options.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
