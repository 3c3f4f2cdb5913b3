"""What ``dedup_lease_replicas = 1`` costs: a lease cycle with and without WAIT.

    python3 benchmarks/replicas.py [--cycles 3000] [--rounds 5]

Starts a private master and a replica of it on free ports. Each round times
N lease cycles (acquire, renew, release: what one task run does in Redis)
through the store without WAIT and with ``WAIT 1`` after the acquire and the
renewal (alternating, so both see the same machine). Prints the median
microseconds per cycle and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import redis
from common import private_redis

from celery_dedup.lease import member
from celery_dedup.store import Store


def per_cycle_us(store: Store, n: int) -> float:
    keys = [uuid.uuid4().hex for _ in range(n)]
    start = time.perf_counter()
    for key in keys:
        held_by = member(key, "bench", 1, None)
        store.acquire(
            key, held_by, key, ttl=30, max_running=1, fence_ttl=90, free_claim=True
        )
        store.renew(key, held_by, 30)
        store.release(key, held_by, key, free_claim=True, done_ttl=0)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    master_url, stop_master = private_redis()
    replica_url, stop_replica = private_redis()
    try:
        master = redis.Redis.from_url(master_url)
        replica = redis.Redis.from_url(replica_url)
        port = master.connection_pool.connection_kwargs["port"]
        replica.replicaof("127.0.0.1", port)
        for _ in range(200):
            if replica.info("replication").get("master_link_status") == "up":
                break
            time.sleep(0.05)
        else:
            raise SystemExit("the replica did not sync")
        plain = Store(master, "bench")
        waiting = Store(master, "bench", replicas=1, replica_timeout=1.0)
        figures: dict[str, list[float]] = {"no WAIT": [], "WAIT 1": []}
        for _ in range(options.rounds):
            figures["no WAIT"].append(per_cycle_us(plain, options.cycles))
            figures["WAIT 1"].append(per_cycle_us(waiting, options.cycles))
        medians = {name: statistics.median(v) for name, v in figures.items()}
        for name, value in medians.items():
            print(f"{name:>8}: {value:8.1f} us per lease cycle (median)")
        print(f"   ratio: {medians['WAIT 1'] / medians['no WAIT']:.2f}x")
    finally:
        stop_replica()
        stop_master()


if __name__ == "__main__":
    main()
