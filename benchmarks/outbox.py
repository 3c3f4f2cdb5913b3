"""What the outbox costs: add() against a plain INSERT, and relay throughput.

    python3 benchmarks/outbox.py [--calls 2000] [--rounds 5] [--rows 10000]
        [--batch-size 200] [--postgres-url URL] [--redis-url URL] [--mysql-url URL]

add(): each round opens one transaction and times N plain INSERTs of an
outbox row (values built the way add() builds them), N unfenced add() calls
and N fenced add() calls (one dedup key, rising tokens), in turn; it prints
the median microseconds per call and each add()'s ratio to the INSERT.
PostgreSQL always, MariaDB with --mysql-url.

Relay: --rows rows (over 1,000 aggregates) are written, then one relay
publishes them to Redis; it prints events per second (wall time of the
passes, from the first claim to the last mark), checks that every message
reached a bound queue, and for scale times kombu publishing as many messages
with no database at all. Starts a private redis-server on a free port unless
--redis-url is given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

import kombu
import redis
import sqlalchemy as sa
from common import private_redis

from celery_dedup.outbox import Outbox, Relay
from celery_dedup.outbox.table import utcnow

POSTGRES_URL = os.environ.get(
    "DEDUP_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


def _fresh_outbox(url: str) -> Outbox:
    engine = sa.create_engine(url)
    outbox = Outbox(engine, table_name=f"bench_{uuid.uuid4().hex[:8]}")
    outbox.create_all()
    return outbox


def _drop(outbox: Outbox) -> None:
    outbox.drop_all()
    outbox.engine.dispose()


def bench_add(url: str, calls: int, rounds: int) -> None:
    outbox = _fresh_outbox(url)
    table = outbox.table
    results: dict[str, list[float]] = {"insert": [], "add": [], "fenced": []}
    token = 0
    try:
        for r in range(rounds):
            with outbox.engine.begin() as conn:

                def plain(i: int, r: int = r) -> None:
                    now = utcnow()
                    conn.execute(
                        table.insert(),
                        {
                            "event_id": str(uuid.uuid4()),
                            "event_type": "PLAIN",
                            "aggregate_id": f"{r}:{i}",
                            "payload": {"campaign_id": i},
                            "headers": None,
                            "fence_key": None,
                            "fence_token": None,
                            "task_id": None,
                            "created_at": now,
                            "state": "pending",
                            "attempts": 0,
                            "next_attempt_at": now,
                        },
                    )

                def add(i: int, r: int = r) -> None:
                    outbox.add(
                        conn, "ADD", aggregate_id=f"{r}:{i}", payload={"campaign_id": i}
                    )

                def fenced(i: int, r: int = r) -> None:
                    nonlocal token
                    token += 1
                    outbox.add(
                        conn,
                        "FENCED",
                        aggregate_id=f"{r}:{i}",
                        payload={"campaign_id": i},
                        fence=("bench-key", token),
                    )

                for name, call in (("insert", plain), ("add", add), ("fenced", fenced)):
                    start = time.perf_counter()
                    for i in range(calls):
                        call(i)
                    elapsed = time.perf_counter() - start
                    results[name].append(elapsed / calls * 1e6)
    finally:
        _drop(outbox)
    insert = statistics.median(results["insert"])
    add_us = statistics.median(results["add"])
    fenced_us = statistics.median(results["fenced"])
    dialect = sa.engine.make_url(url).get_backend_name()
    print(f"add() on {dialect} ({calls} calls x {rounds} rounds, median):")
    print(f"  plain INSERT    {insert:8.1f} us/call")
    print(f"  add() unfenced  {add_us:8.1f} us/call   ratio {add_us / insert:.2f}x")
    print(
        f"  add() fenced    {fenced_us:8.1f} us/call   ratio {fenced_us / insert:.2f}x"
    )


def bench_relay(url: str, broker: str, rows: int, batch_size: int) -> None:
    outbox = _fresh_outbox(url)
    exchange = f"bench.{uuid.uuid4().hex[:8]}"
    queue_name = f"{exchange}.all"
    connection = kombu.Connection(broker)
    topic = kombu.Exchange(exchange, type="topic", durable=True)
    kombu.Queue(queue_name, topic, routing_key="#")(
        connection.default_channel
    ).declare()
    client = redis.Redis.from_url(broker)
    relay = Relay(outbox, broker, exchange=exchange, batch_size=batch_size)
    try:
        with outbox.engine.begin() as conn:
            outbox.add(conn, "WARM", aggregate_id="warm-up")
        relay.run_once()  # connect and declare outside the timing
        client.delete(queue_name)
        with outbox.engine.begin() as conn:
            for n in range(rows):
                # 1,000 aggregates, 10 events each (of 10 types)
                outbox.add(
                    conn,
                    f"BENCH.{n // 1000}",
                    aggregate_id=f"agg:{n % 1000}",
                    payload={"n": n},
                )
        passes = 0
        start = time.perf_counter()
        while relay.run_once().claimed:
            passes += 1
        elapsed = time.perf_counter() - start
        delivered = int(client.llen(queue_name))
        with outbox.engine.connect() as conn:
            published = conn.execute(
                sa.select(sa.func.count())
                .select_from(outbox.table)
                .where(
                    outbox.table.c.state == "published",
                    outbox.table.c.event_type != "WARM",
                )
            ).scalar_one()
        print(
            f"relay on {sa.engine.make_url(url).get_backend_name()} -> Redis: "
            f"{rows} events in {elapsed:.2f} s = {rows / elapsed:,.0f} events/s "
            f"(batch {batch_size}, {passes} passes; {delivered} delivered, "
            f"{published} marked)"
        )
        if delivered != rows or published != rows:
            raise SystemExit("not every event was delivered and marked")
        # For scale: kombu publishing the same messages with no database
        producer = kombu.Producer(connection)
        start = time.perf_counter()
        for n in range(rows):
            producer.publish(
                {"n": n},
                exchange=topic,
                routing_key="BENCH",
                serializer="json",
                message_id=str(n),
                headers={"event_type": "BENCH"},
                delivery_mode=2,
            )
        alone = rows / (time.perf_counter() - start)
        print(f"  kombu publish alone (no database): {alone:,.0f} messages/s")
    finally:
        relay.close()
        connection.release()
        client.delete(queue_name)
        client.close()
        _drop(outbox)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--postgres-url", default=POSTGRES_URL)
    parser.add_argument("--mysql-url")
    parser.add_argument("--redis-url")
    options = parser.parse_args()
    stop = None
    broker = options.redis_url
    if broker is None:
        broker, stop = private_redis()
    try:
        bench_add(options.postgres_url, options.calls, options.rounds)
        if options.mysql_url:
            bench_add(options.mysql_url, options.calls, options.rounds)
        bench_relay(options.postgres_url, broker, options.rows, options.batch_size)
    finally:
        if stop is not None:
            stop()


if __name__ == "__main__":
    main()
