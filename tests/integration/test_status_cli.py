"""``celery -A proj dedup status | inspect | release | outbox`` with real workers.

Each command runs as a user runs it (``python -m celery``), against the rig's
Redis and a worker whose ``close_campaign`` body holds a key for a minute.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from celery_dedup.inspection import Inspector
from celery_dedup.lease import member
from celery_dedup.outbox import Outbox
from tests.rig import ROOT, Recorder, RedisServer, Worker, wait_for

pytestmark = pytest.mark.integration

APP = "tests.apps.scenario_app"
TASK = f"{APP}.close_campaign"
LOCK_TTL = 3  # seconds: the lease is renewed every second
PAUSE = 60.0  # the body outlives every test; its worker is killed at the end


def dedup(
    redis_server: RedisServer, *args: str, stdin: str = "", **conf: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``celery -A APP dedup *args`` as a user would."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DEDUP_TEST_REDIS_URL": redis_server.url(),
        "DEDUP_TEST_CONF": json.dumps(conf),
    }
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "dedup", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def parsed(done: subprocess.CompletedProcess[str]) -> Any:
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON:\n{done.stdout}\n{done.stderr}") from None


@dataclasses.dataclass
class Held:
    """A running body that holds ``key`` (claim and lease) as ``task_id``."""

    worker: Worker
    task_id: str
    key: str
    claim: str
    lease: str
    fence: str

    def kill(self) -> None:
        """SIGKILL the worker and its pool: nobody frees the key."""
        if self.worker.process is not None and self.worker.process.poll() is None:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.process.wait(10)


@pytest.fixture
def held(
    scenario_app: Any,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> Iterator[Held]:
    worker = workers(concurrency=1)  # prefork: it answers while the body runs
    task = scenario_app.close_campaign
    result = task.apply_async((7, PAUSE), queue=queue, dedup_lock_ttl=LOCK_TTL)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the body to start")
    key = task.dedup_key_for((7, PAUSE))
    names = {part: f"dedup:{{{key}}}:{part}" for part in ("claim", "lease", "fence")}
    holding = Held(worker, result.id, key, **names)
    yield holding
    holding.kill()  # no warm shutdown waiting for the body


def test_status_and_inspect_show_the_holder(
    held: Held, redis_server: RedisServer
) -> None:
    # Given a body of close_campaign running under its lease
    # When status asks Redis and the workers
    done = dedup(redis_server, "status", "--json", "--timeout", "0.5")
    # Then the key is listed with its holder, TTLs, fence and what the worker says
    assert done.returncode == 0, done.stderr
    report = parsed(done)
    assert report["prefix"] == "dedup"
    assert report["workers"] == [held.worker.hostname]
    [key] = report["keys"]
    assert (key["key"], key["task"], key["mode"], key["holds"]) == (
        held.key,
        TASK,
        "until_executed",
        "claim+lease",
    )
    assert key["claim"]["task_id"] == held.task_id
    assert 3000 < key["claim"]["ttl"] <= 3600  # dedup_ttl
    [lease] = key["leases"]
    assert (lease["task_id"], lease["host"], lease["live"]) == (
        held.task_id,
        held.worker.hostname,
        True,
    )
    assert 0 < lease["ttl"] <= LOCK_TTL
    assert key["fence"] > 0
    [holder] = key["holders"]
    assert holder["task_id"] == held.task_id
    assert (holder["holds"], holder["name"], holder["state"], holder["source"]) == (
        ["claim", "lease"],
        TASK,
        "active",
        "worker",
    )
    assert 0 < holder["age"] < 30

    # When inspect is given the key, then the task id (the workers not asked)
    by_key = dedup(redis_server, "inspect", held.key, "--json", "--no-workers")
    by_task = dedup(redis_server, "inspect", held.task_id, "--json", "--no-workers")
    # Then both find the key, its claim and its lease
    for done, matched in ((by_key, "key"), (by_task, "task")):
        assert done.returncode == 0, done.stderr
        report = parsed(done)
        assert (report["matched"], report["workers"]) == (matched, None)
        [key] = report["keys"]
        assert key["key"] == held.key
        assert key["claim"]["task_id"] == held.task_id
        assert [x["task_id"] for x in key["leases"]] == [held.task_id]
        # Redis alone knows no task name (no result_extended, workers not asked)
        assert (key["task"], key["holders"][0]["state"]) == (None, None)

    # And the text of status groups the key under its task
    text = dedup(redis_server, "status", "--timeout", "0.5")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"{TASK}: 1 key"
    assert lines[1].split() == [
        "KEY", "HOLDS", "MODE", "TASK", "ID", "STATE", "WORKER", "AGE",
        "CLAIM", "TTL", "LEASE", "TTL", "FENCE",
    ]  # fmt: skip
    row = lines[2].split()
    assert row[:5] == [
        held.key,
        "claim+lease",
        "until_executed",
        held.task_id,
        "active",
    ]
    assert lines[-1] == "1 held key(s) under prefix 'dedup'; 1 worker(s) answered"


def test_inspect_of_an_unknown_key_fails(redis_server: RedisServer) -> None:
    done = dedup(redis_server, "inspect", "0" * 32, "--no-workers")
    assert done.returncode == 1
    assert f"Nothing under prefix 'dedup' for {'0' * 32!r}" in done.stderr


def test_release_refuses_a_live_lease_unless_forced(
    held: Held, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    fence = redis_client.get(held.fence)
    # When the key is released while its body renews the lease
    refused = dedup(redis_server, "release", held.key, "--yes")
    # Then the command refuses, and the key is still held
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "its lease is being renewed by task " + held.task_id in refused.stderr
    assert redis_client.get(held.claim) == held.task_id.encode()
    assert redis_client.zcard(held.lease) == 1

    # When it is forced
    forced = dedup(redis_server, "release", held.key, "--force", "--yes", "--json")
    # Then the claim and the lease set are gone, and the fence is kept
    assert forced.returncode == 0, forced.stderr
    report = parsed(forced)
    assert (report["key"], report["released"], report["forced"]) == (
        held.key,
        True,
        True,
    )
    assert report["claim"] == held.task_id
    assert [x["task_id"] for x in report["leases"]] == [held.task_id]
    assert report["fence"] == int(fence or 0) > 0
    assert not redis_client.exists(held.claim, held.lease)
    assert redis_client.get(held.fence) == fence


def test_release_of_a_key_whose_holder_is_gone(
    held: Held, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # Given the worker was killed outright: its lease expires, its claim stays
    held.kill()
    wait_for(lambda: not redis_client.exists(held.lease), LOCK_TTL + 5, "expiry")
    assert redis_client.get(held.claim) == held.task_id.encode()
    # When release is asked by task id and not confirmed
    declined = dedup(redis_server, "release", held.task_id, stdin="n\n")
    # Then nothing is deleted
    assert declined.returncode == 1, declined.stderr
    assert f"delete the claim of task {held.task_id}" in declined.stderr
    assert redis_client.exists(held.claim)
    # When it is confirmed with --yes (no lease to watch, no --force needed)
    done = dedup(redis_server, "release", held.task_id, "--yes")
    # Then the claim is deleted and the command says so
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        f"Released dedup key {held.key}: deleted the claim of task {held.task_id};"
    )
    assert not redis_client.exists(held.claim)
    assert redis_client.exists(held.fence)


def test_release_deletes_only_what_it_read(redis_client: redis.Redis) -> None:
    # Given a key held by a claim and a lease, under a prefix with glob characters
    inspector = Inspector(redis_client, "app[1]*")
    names = inspector.store.names("k1")
    claim, lease, fence = names.claim, names.lease, names.fence
    holder = member("t1", "w1@h", 11, None)
    redis_client.set(claim, "t1", px=60_000)
    redis_client.zadd(lease, {holder: int(redis_client.time()[0]) * 1000 + 60_000})
    redis_client.set(fence, 42)
    redis_client.set("app[1]x:{k2}:claim", "t2")  # another prefix: not listed
    [read] = inspector.held()
    assert (read.key, read.claim and read.claim.task_id, read.fence) == ("k1", "t1", 42)
    # When the lease is renewed after it was read
    redis_client.zadd(lease, {holder: int(redis_client.time()[0]) * 1000 + 90_000})
    # Then a release of what was read deletes nothing
    released, found = inspector.release(read)
    assert not released
    assert redis_client.exists(claim, lease) == 2
    # When it releases what is there now
    released, found = inspector.release(found)
    # Then the claim and the lease set are gone; the fence is kept
    assert released
    assert (found.claim and found.claim.task_id, [h.task_id for h in found.leases]) == (
        "t1",
        ["t1"],
    )
    assert redis_client.exists(claim, lease) == 0
    assert redis_client.get(fence) == b"42"
    assert inspector.held() == []


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(f"sqlite:///{tmp_path / 'outbox.db'}", table_name="ob_status")
    box.create_all()
    yield box
    box.close()


def test_outbox_counts_rows_and_retries_parked_ones(
    outbox: Outbox, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # Given three events: two pending (one an hour old) and one parked
    with outbox.engine.begin() as conn:
        for n in range(3):
            outbox.add(conn, "CLOSED", aggregate_id=f"campaign:{n}", fence=None)
    c = outbox.table.c
    an_hour_ago = datetime.datetime.now(datetime.timezone.utc).replace(
        tzinfo=None
    ) - datetime.timedelta(hours=1)
    with outbox.engine.begin() as conn:
        conn.execute(
            sa.update(outbox.table)
            .where(c.aggregate_id == "campaign:0")
            .values(created_at=an_hour_ago)
        )
        conn.execute(
            sa.update(outbox.table)
            .where(c.aggregate_id == "campaign:2")
            .values(state="parked", attempts=10)
        )
    conf = {
        "dedup_outbox_url": str(outbox.engine.url),
        "dedup_outbox_table": "ob_status",
    }
    # When the outbox is counted
    done = dedup(redis_server, "outbox", "--json", **conf)
    # Then each state is counted and the oldest pending row is an hour old
    assert done.returncode == 0, done.stderr
    report = parsed(done)
    assert {k: report[k] for k in ("table", "pending", "published", "parked")} == {
        "table": "ob_status",
        "pending": 2,
        "published": 0,
        "parked": 1,
    }
    assert 3600 <= report["oldest_pending_age"] < 3660
    assert report["oldest_pending_at"] == an_hour_ago.isoformat()
    assert report["requeued"] is None
    # When the parked rows are retried
    done = dedup(redis_server, "outbox", "--retry-parked", "--json", **conf)
    # Then the parked row is pending again, with a fresh set of attempts
    assert done.returncode == 0, done.stderr
    report = parsed(done)
    assert (report["requeued"], report["pending"], report["parked"]) == (1, 3, 0)
    with outbox.engine.connect() as conn:
        row = conn.execute(
            sa.select(c.state, c.attempts).where(c.aggregate_id == "campaign:2")
        ).one()
    assert tuple(row) == ("pending", 0)
    # And the text says the same
    text = dedup(redis_server, "outbox", **conf)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("ob_status: 3 pending, 0 published, 0 parked;")


def test_outbox_without_a_url_names_the_setting(redis_server: RedisServer) -> None:
    done = dedup(redis_server, "outbox")
    assert done.returncode == 78
    assert "dedup_outbox_url: set it to the database URL of the outbox" in done.stderr
