"""What DedupTask adds to apply_async, against plain Celery on the same broker.

    python3 benchmarks/enqueue.py [--calls 3000] [--rounds 5] [--redis-url URL]

Starts a private redis-server on a free port unless --redis-url is given: the
broker and the lock store (``dedup_redis_url``). A cluster or Sentinel URL
(``redis+cluster://``, ``redis+sentinel://``) is the lock store only, with a
private broker. Both are flushed (FLUSHDB) before each round. Each
round times N distinct calls of a plain task and of a DedupTask (alternating,
so both see the same machine), then N identical calls of the DedupTask (all
but the first deduplicated). Prints the median microseconds per call and the
ratio, and a round trip to the lock store (PING) for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import redis
from celery import Celery
from common import private_redis

from celery_dedup import DedupTask
from celery_dedup.connection import get_backend, parse_url


def per_call_us(call: Callable[[int], object], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        call(i)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis-url")
    options = parser.parse_args()
    stop = None
    url = broker_url = options.redis_url
    if url is None or parse_url(url).kind != "server":
        broker_url, stop = private_redis()
    try:
        app = Celery("bench", broker=broker_url, set_as_current=False)
        app.conf.update(
            task_default_queue="bench-enqueue",
            dedup_ttl=600,
            dedup_redis_url=url or broker_url,
        )

        @app.task(name="bench.plain", shared=False)
        def plain(n: int) -> None: ...

        @app.task(base=DedupTask, name="bench.dedup", shared=False)
        def dedup(n: int) -> None: ...

        broker = redis.Redis.from_url(broker_url)
        client = get_backend(app).redis  # the lock store

        def plain_and_ping(i: int) -> None:
            """Plain apply_async plus one Redis round trip: what 1 RTT costs here."""
            client.ping()
            plain.apply_async((i,))

        # warm up: connections, script cache, task classes
        for i in range(200):
            plain.apply_async((i,))
            dedup.apply_async((-1 - i,))
        plain_us, dedup_us, same_us, ping_us, one_rtt_us = [], [], [], [], []
        n = options.calls
        for r in range(options.rounds):
            broker.flushdb()
            client.flushdb()
            base = (r + 1) * 10 * n
            plain_us.append(per_call_us(lambda i: plain.apply_async((i,)), n))
            one_rtt_us.append(per_call_us(plain_and_ping, n))
            dedup_us.append(
                per_call_us(lambda i, base=base: dedup.apply_async((base + i,)), n)
            )
            same_us.append(per_call_us(lambda i: dedup.apply_async((0,)), n))
            ping_us.append(per_call_us(lambda i: client.ping(), n))
        broker.flushdb()
        client.flushdb()
        broker.close()
        client.close()
    finally:
        if stop is not None:
            stop()

    p, d, s, rt, p1 = (
        statistics.median(x) for x in (plain_us, dedup_us, same_us, ping_us, one_rtt_us)
    )
    print(f"apply_async, {n} distinct calls, median of {options.rounds} rounds")
    print(f"  plain Task               {p:8.1f} us/call")
    print(f"  plain Task + 1 PING      {p1:8.1f} us/call   ratio {p1 / p:.3f}")
    print(f"  DedupTask                {d:8.1f} us/call   ratio {d / p:.3f}")
    print(f"  DedupTask - plain        {d - p:8.1f} us/call")
    print(f"  one round trip in place  {p1 - p:8.1f} us (a PING alone: {rt:.1f} us)")
    print(
        f"  overhead / one round trip {(d - p) / (p1 - p):6.2f}  (target <= 1, "
        "plus the key's hashing)"
    )
    print(f"identical calls (all but the first deduplicated): {s:.1f} us/call"
          " (target < 150)")  # fmt: skip


if __name__ == "__main__":
    main()
