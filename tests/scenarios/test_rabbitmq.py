"""The guarantees with a RabbitMQ broker; Redis stays the lock store.

S1, S4 (RabbitMQ's own redelivery after it lost the consumer), S5 and the
outbox relay with publisher confirms, on the local RabbitMQ
(``DEDUP_TEST_RABBITMQ``, by default ``amqp://guest:guest@127.0.0.1:5672``),
in a vhost of this module's own, created with ``rabbitmqctl`` and deleted
with all it holds at the end. A RabbitMQ that cannot be reached skips the
module, unless ``CI`` is set. The workers run :mod:`tests.apps.rabbitmq_app`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import kombu
import pytest
import redis
from celery import Celery

from celery_dedup.outbox import Outbox, Relay, event_id
from tests.integration.outbox_fixtures import EventQueue
from tests.rig import FREE, ROOT, Recorder, RedisServer, Worker, held, wait_for

pytestmark = [pytest.mark.scenario, pytest.mark.rabbitmq]

APP = "tests.apps.rabbitmq_app"
SERVER = os.environ.get("DEDUP_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672")
LOCK_TTL = 10


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"rabbitmqctl {args[0]}: {done.stderr.strip()}")
    return done.stdout


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@dataclasses.dataclass
class VHost:
    name: str
    url: str

    def queue_counts(self, queue: str) -> tuple[int, int]:
        """Messages of ``queue``: (ready, unacknowledged)."""
        columns = ("name", "messages_ready", "messages_unacknowledged")
        out = rabbitmqctl(
            "list_queues", "-p", self.name, "--no-table-headers", *columns
        )
        for line in out.splitlines():
            name, ready, unacked = line.split("\t")
            if name == queue:
                return int(ready), int(unacked)
        raise AssertionError(f"no queue {queue} in {self.name}")

    def settled(self, queue: str) -> bool:
        """No message of ``queue`` is waiting or unacknowledged."""
        return self.queue_counts(queue) == (0, 0)

    def close_connections(self, connection_name: str) -> int:
        """Close the connections of this vhost named so; returns how many."""
        columns = ("pid", "vhost", "client_properties")
        out = rabbitmqctl("list_connections", "--no-table-headers", *columns)
        tag = f'{{"connection_name","{connection_name}"}}'
        rows = [line.split("\t") for line in out.splitlines()]
        pids = [
            pid for pid, vhost, props in rows if vhost == self.name and tag in props
        ]
        for pid in pids:
            rabbitmqctl("close_connection", pid, "test: consumer connection dropped")
        return len(pids)


@pytest.fixture(scope="module")
def rabbitmq() -> Iterator[VHost]:
    """A private vhost on the local RabbitMQ, deleted with all it holds."""
    if shutil.which("rabbitmqctl") is None:
        unavailable("rabbitmqctl is not on PATH (apt-get install rabbitmq-server)")
    name = f"dedup-{uuid.uuid4().hex[:12]}"
    vhost = VHost(name, f"{SERVER}/{name}")
    try:
        rabbitmqctl("add_vhost", vhost.name)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        unavailable(f"RabbitMQ does not answer rabbitmqctl: {exc}")
    try:
        rabbitmqctl("set_permissions", "-p", vhost.name, "guest", ".*", ".*", ".*")
        with kombu.Connection(vhost.url, connect_timeout=5) as connection:
            try:
                connection.ensure_connection(max_retries=1)
            except Exception as exc:
                unavailable(f"RabbitMQ does not answer at {SERVER}: {exc!r}")
        yield vhost
    finally:
        rabbitmqctl("delete_vhost", vhost.name)


@pytest.fixture
def rabbit_workers(
    rabbitmq: VHost, workers: Callable[..., Worker]
) -> Callable[..., Worker]:
    """The rig's workers, on the vhost: ``start(concurrency, **conf)``."""

    def start(concurrency: int = 2, **conf: Any) -> Worker:
        env = {"CELERY_BROKER_URL": rabbitmq.url}
        return workers(concurrency, conf=conf, env=env, app_module=APP)

    return start


@pytest.fixture
def publisher(scenario_app: Any, rabbitmq: VHost) -> Iterator[kombu.Producer]:
    """A producer on the vhost, for this process's ``apply_async(producer=)``."""
    with kombu.Connection(rabbitmq.url) as connection:
        yield scenario_app.app.amqp.Producer(connection)


def deliveries(recorder: Recorder) -> list[dict[str, Any]]:
    """Every delivery of close_campaign that reached a worker process."""
    items = recorder.client.lrange("deliveries:close_campaign", 0, -1)
    return [json.loads(item) for item in items]


def burst(
    server: RedisServer, rabbitmq: VHost, queue: str, options: dict[str, Any]
) -> list[dict[str, Any]]:
    """3 client processes, each 10 identical apply_async calls over 3 s."""
    start_at = time.time() + 1.5  # all three import Celery first, then fire together
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DEDUP_TEST_REDIS_URL": server.url(),
        "CELERY_BROKER_URL": rabbitmq.url,
    }
    task = "tests.apps.scenario_app.close_campaign"
    argv = [task, "[75]", json.dumps({"queue": queue, **options}), "10", "3"]
    command = [sys.executable, "-m", "tests.apps.client", *argv, str(start_at)]
    clients = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    calls = []
    for client in clients:
        out, _ = client.communicate(timeout=60)
        assert client.returncode == 0
        calls += [json.loads(line) for line in out.splitlines()]
    assert len(calls) == 30
    return calls


def test_s1_a_burst_publishes_one_message_and_runs_once(
    scenario_app: Any,
    redis_server: RedisServer,
    rabbitmq: VHost,
    rabbit_workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    options = {"dedup_lock": "until_expired", "dedup_ttl": 60}
    # When 3 processes enqueue the same job 30 times over 3 s, with no worker yet
    calls = burst(redis_server, rabbitmq, queue, options)
    # Then one call published, the others were handed its task id
    assert sum(not c["deduplicated"] for c in calls) == 1
    assert len({c["id"] for c in calls}) == 1
    # and exactly one message is in the RabbitMQ queue
    assert rabbitmq.queue_counts(queue) == (1, 0)
    # and once two workers run, it executes once, also after 30 more calls
    rabbit_workers(3)
    rabbit_workers(3)
    wait_for(lambda: recorder.runs("close_campaign"), 30, "the execution")
    late = burst(redis_server, rabbitmq, queue, options)
    assert all(c["deduplicated"] for c in late)
    wait_for(lambda: rabbitmq.settled(queue), 10, "no copy left", every=0.5)
    assert [r["task_id"] for r in recorder.runs("close_campaign")] == [calls[0]["id"]]
    assert [d["task_id"] for d in deliveries(recorder)] == [calls[0]["id"]]


def test_s4_a_dropped_consumer_redelivers_and_the_body_runs_once(
    scenario_app: Any,
    redis_client: redis.Redis,
    rabbitmq: VHost,
    rabbit_workers: Callable[..., Worker],
    publisher: kombu.Producer,
    recorder: Recorder,
    queue: str,
) -> None:
    # Given two workers acknowledging late
    hostnames = {rabbit_workers(task_acks_late=True).hostname for _ in range(2)}
    task = scenario_app.close_campaign
    # When an 8 s task is sent once, and 1 s into its body RabbitMQ closes the
    # connections of the worker running it (its body goes on, unacknowledged)
    result = task.apply_async(
        (4, 8.0), queue=queue, producer=publisher, dedup_lock_ttl=LOCK_TTL
    )
    wait_for(lambda: recorder.started("close_campaign"), 20, "the body")
    [first] = deliveries(recorder)
    time.sleep(1)
    assert rabbitmq.close_connections(first["hostname"]) >= 1
    # Then RabbitMQ redelivers it, flagged, to the other worker
    [other] = hostnames - {first["hostname"]}

    def redelivered_to_other() -> bool:
        return any(
            d["redelivered"] and d["hostname"] == other for d in deliveries(recorder)
        )

    wait_for(redelivered_to_other, 20, "the redelivery")
    # and the task completes; its copies settle (none queued or unacknowledged)
    assert result.get(timeout=60) == 4
    wait_for(lambda: rabbitmq.settled(queue), 20, "every copy settled", every=0.5)
    # and its body began once, so never two at once, and ran to its end once
    assert len(recorder.started("close_campaign")) == 1
    runs = recorder.runs("close_campaign")
    assert [r["task_id"] for r in runs] == [result.id]
    # and a copy delivered after that end was dropped unrun
    seen = deliveries(recorder)
    assert {d["task_id"] for d in seen} == {result.id}
    assert any(d["at"] > runs[0]["end"] for d in seen)
    assert result.state == "SUCCESS"
    assert held(redis_client, task, (4, 8.0)) == FREE


def test_s5_a_killed_child_is_redelivered_and_runs_once_more(
    scenario_app: Any,
    redis_client: redis.Redis,
    rabbit_workers: Callable[..., Worker],
    publisher: kombu.Producer,
    recorder: Recorder,
    queue: str,
) -> None:
    rabbit_workers(2, task_acks_late=True, task_reject_on_worker_lost=True)
    task = scenario_app.close_campaign
    result = task.apply_async(
        (5, 4.0), queue=queue, producer=publisher, dedup_lock_ttl=LOCK_TTL
    )
    # Given the body is 2 s into its run, the only one begun
    first = wait_for(lambda: recorder.started("close_campaign"), 20, "the start")
    time.sleep(2)
    assert len(recorder.started("close_campaign")) == 1
    # When the process running it is killed
    os.kill(first[0]["pid"], signal.SIGKILL)  # type: ignore[index]
    killed_at = time.time()
    # Then RabbitMQ gives the rejected message back, flagged redelivered
    assert result.get(timeout=30) == 5
    seen = deliveries(recorder)
    assert not seen[0]["redelivered"]
    assert any(d["redelivered"] for d in seen[1:])
    # and it ran to its end once, begun after the kill, within the lease TTL
    assert len(recorder.started("close_campaign")) == 2
    runs = recorder.runs("close_campaign")
    assert [r["task_id"] for r in runs] == [result.id]
    assert killed_at < runs[0]["start"] < killed_at + LOCK_TTL
    # and nothing of the key is held afterwards: a new call runs
    assert held(redis_client, task, (5, 4.0)) == FREE
    again = task.apply_async(
        (5, 4.0), queue=queue, producer=publisher, dedup_lock_ttl=LOCK_TTL
    )
    assert not again.deduplicated
    assert again.get(timeout=30) == 5


@pytest.mark.parametrize("made_by", ["url", "from_app"])
def test_the_relay_publishes_each_row_once_with_publisher_confirms(
    rabbitmq: VHost, tmp_path: Path, made_by: str
) -> None:
    # Given 30 rows of 3 aggregates in a SQLite outbox, and a queue bound to
    # the topic exchange with "#"
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.db'}")
    outbox.create_all()
    pairs = [(f"campaign.step{n}", f"campaign:{n % 3}") for n in range(30)]
    with outbox.engine.begin() as conn:
        for event_type, aggregate in pairs:
            outbox.add(conn, event_type, aggregate_id=aggregate, payload={"n": 1})
    events = EventQueue(rabbitmq.url, f"events.{uuid.uuid4().hex[:8]}")
    app = Celery("relay", broker=rabbitmq.url, set_as_current=False)
    exchange = events.exchange_name
    if made_by == "url":
        relay = Relay(outbox, rabbitmq.url, exchange=exchange)
    else:
        relay = Relay.from_app(app, outbox, exchange=exchange)
    try:
        # When one pass runs
        counts = relay.run_once()
        # Then it published every row on a channel in confirm mode (py-amqp
        # sent confirm.select), so each was in the queue when the pass returned
        assert relay.connection.transport_options["confirm_publish"] is True
        assert relay._producer is not None
        assert relay._producer.channel._confirm_selected is True
        assert counts.published == 30
        assert rabbitmq.queue_counts(events.queue.name) == (30, 0)
        # and a second pass finds nothing left to publish
        assert relay.run_once().claimed == 0
    finally:
        relay.close()
        app.close()
    # And the consumer receives each event exactly once, each aggregate's in order
    messages = events.drain()
    events.close()
    ids = Counter(m.properties["message_id"] for m in messages)
    assert ids == Counter(event_id(t, a) for t, a in pairs)
    for aggregate in {a for _, a in pairs}:
        received = [
            m.headers["event_type"]
            for m in messages
            if m.headers["aggregate_id"] == aggregate
        ]
        assert received == [t for t, a in pairs if a == aggregate]
    # and every row is marked published
    assert outbox.count_state("published") == 30
    assert outbox.count_state("pending") == 0
    outbox.close()
