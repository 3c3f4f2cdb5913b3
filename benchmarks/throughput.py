"""Worker throughput with DedupTask against plain Celery, on a local Redis.

    python3 benchmarks/throughput.py [--tasks 2000] [--runs 3] [--redis-url URL]

Each run enqueues N no-op tasks (distinct arguments, so nothing is
deduplicated), then starts one prefork worker with concurrency 2 and times
the drain from the moment it is ready until the queue and its unacked set are
empty. Plain and DedupTask runs alternate. Prints the median tasks/s, their
ratio, and Redis commands per task from INFO commandstats deltas.

The broker is a private redis-server on a free port, and so is the lock
store unless ``--redis-url`` names one (``dedup_redis_url``: a server, a
``redis+cluster://`` or a ``redis+sentinel://`` URL). That one is not
flushed (the tasks' arguments are fresh in every run), and its commands are
counted too (on every primary of a cluster).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# throughput_app sits beside this script; the worker imports it as
# benchmarks.throughput_app.
import redis
import throughput_app
from common import private_redis
from redis.cluster import RedisCluster

from celery_dedup.connection import get_backend, masked

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "bench-throughput"


def commands(servers: list[redis.Redis]) -> collections.Counter[str]:
    """Calls per command so far (INFO commandstats), summed over servers."""
    total: collections.Counter[str] = collections.Counter()
    for server in servers:
        for name, v in server.info("commandstats").items():
            total[name.removeprefix("cmdstat_")] += int(v["calls"])
    return total


def servers_of(client: redis.Redis | RedisCluster) -> list[redis.Redis]:
    """The servers behind a client: a cluster's primaries, else the client."""
    if isinstance(client, RedisCluster):
        return [client.get_redis_connection(n) for n in client.get_primaries()]
    return [client]


def one_run(
    kind: str, n: int, url: str, workdir: str, lock_store: list[redis.Redis]
) -> tuple[float, dict[str, int]]:
    os.environ["BENCH_REDIS_URL"] = url
    throughput_app.app.conf.broker_url = url
    task = throughput_app.plain_noop if kind == "plain" else throughput_app.dedup_noop
    client = redis.Redis.from_url(url)
    client.flushall()
    base = int(time.time() * 1000) * 10 * n  # fresh arguments: no dedup hits
    for i in range(n):
        task.apply_async((base + i,))
    servers = [client, *lock_store]  # a lock store of yours is not flushed
    before = commands(servers)
    log = Path(workdir) / f"worker-{kind}-{time.monotonic_ns()}.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "benchmarks.throughput_app", "worker",
         "--pool", "prefork", "--concurrency", "2", "--loglevel", "INFO",
         "--logfile", str(log), "--without-mingle", "--without-gossip",
         "--without-heartbeat", "--queues", QUEUE],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while not (log.exists() and " ready." in log.read_text()):
            time.sleep(0.005)
        started = time.perf_counter()
        while client.llen(QUEUE) or client.hlen("unacked"):
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        stats = dict(commands(servers) - before)
    finally:
        worker.terminate()
        worker.wait(30)
    client.close()
    return n / elapsed, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--redis-url", help="the lock store (dedup_redis_url)")
    options = parser.parse_args()
    lock_store: list[redis.Redis] = []
    if options.redis_url:
        os.environ["BENCH_DEDUP_URL"] = options.redis_url  # for the worker
        throughput_app.app.conf.dedup_redis_url = options.redis_url
        lock_store = servers_of(get_backend(throughput_app.app).redis)
    workdir = tempfile.mkdtemp(prefix="bench-throughput-")
    url, stop_redis = private_redis()
    rates: dict[str, list[float]] = {"plain": [], "dedup": []}
    stats: dict[str, list[dict[str, int]]] = {"plain": [], "dedup": []}
    try:
        for _ in range(options.runs):
            for kind in ("plain", "dedup"):
                rate, counted = one_run(kind, options.tasks, url, workdir, lock_store)
                rates[kind].append(rate)
                stats[kind].append(counted)
                print(f"  {kind:<6} {rate:8.1f} tasks/s", flush=True)
    finally:
        stop_redis()
        shutil.rmtree(workdir, ignore_errors=True)
    plain, dedup = (statistics.median(rates[k]) for k in ("plain", "dedup"))
    n = options.tasks
    print(f"\n{n} no-op tasks, 1 worker x 2 processes, median of {options.runs} runs")
    if options.redis_url:
        print(f"  lock store: {masked(options.redis_url)}, broker: its own Redis")
    print(f"  plain Task   {plain:8.1f} tasks/s")
    print(f"  DedupTask    {dedup:8.1f} tasks/s   ratio {dedup / plain:.3f}"
          "  (target >= 0.92)")  # fmt: skip
    where = "broker and lock store" if lock_store else "one Redis"
    print(f"Redis commands per task during the drain ({where}, median run):")
    for kind in ("plain", "dedup"):
        runs = stats[kind]
        total = statistics.median(sum(s.values()) for s in runs) / n
        top = sorted(runs[0].items(), key=lambda kv: -kv[1])[:6]
        shown = ", ".join(f"{name} {calls / n:.2f}" for name, calls in top)
        print(f"  {kind:<6} {total:5.2f}  ({shown})")
    extra = statistics.median(
        sum(s.values()) for s in stats["dedup"]
    ) - statistics.median(sum(s.values()) for s in stats["plain"])
    print(
        f"  DedupTask adds {extra / n:.2f} Redis commands per task, scripts' included"
    )


if __name__ == "__main__":
    main()
