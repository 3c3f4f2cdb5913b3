"""``celery -A proj dedup status | inspect | release | outbox`` with real workers.

Each command runs as a user runs it (``python -m celery``), against the rig's
Redis and a worker whose ``close_campaign`` body holds a key for a minute, or
keys the test writes with the store's own scripts.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from celery_dedup.inspection import Inspector
from celery_dedup.lease import member
from celery_dedup.outbox import Outbox
from celery_dedup.store import Store
from tests.rig import ROOT, Recorder, RedisServer, Worker, free_port, wait_for

pytestmark = pytest.mark.integration

APP = "tests.apps.scenario_app"
TASK = f"{APP}.close_campaign"
LOCK_TTL = 3  # seconds: the lease is renewed every second
PAUSE = 60.0  # the body outlives every test; its worker is killed at the end


def dedup(
    redis_server: RedisServer,
    *args: str,
    stdin: str = "",
    app: str = APP,
    dedup_url: str | None = None,
    **conf: Any,
) -> subprocess.CompletedProcess[str]:
    """Run ``celery -A app dedup *args`` as a user would (``dedup_url``: the
    scenario app's dedup_redis_url, when not the rig's Redis)."""
    return subprocess.run(
        command(app, *args),
        cwd=ROOT,
        env=environment(redis_server, dedup_url, conf),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def command(app: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", app, "dedup", *args]


def environment(
    redis_server: RedisServer, dedup_url: str | None, conf: dict[str, Any]
) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DEDUP_TEST_REDIS_URL": redis_server.url(),
        "DEDUP_TEST_CONF": json.dumps(conf),
    }
    if dedup_url is not None:
        env["DEDUP_TEST_DEDUP_REDIS_URL"] = dedup_url
    return env


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
        kill(self.worker)


def kill(worker: Worker) -> None:
    """SIGKILL ``worker`` and its pool (no warm shutdown waiting for a body)."""
    if worker.process is not None and worker.process.poll() is None:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.process.wait(10)


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


# -- the standard project layout -------------------------------------------------

PROJ = "tests.apps.proj"  # proj/celery.py names proj/tasks.py in `imports`


def test_status_and_inspect_show_the_mode_in_the_standard_layout(
    workers: Callable[..., Worker],
    redis_server: RedisServer,
    redis_client: redis.Redis,
    queue: str,
) -> None:
    # Given a body of a task of proj/tasks.py holding its key, which `-A proj`
    # alone does not import (the worker does, through `imports`)
    from tests.apps.proj.celery import configure
    from tests.apps.proj.tasks import build_report

    configure(redis_server.url())
    worker = workers(app_module=PROJ, concurrency=1)
    try:
        build_report.apply_async((1, PAUSE), queue=queue)
        key = build_report.dedup_key_for((1, PAUSE))
        lease = f"dedup:{{{key}}}:lease"
        wait_for(lambda: redis_client.zcard(lease), 20, "the body to start")
        # When status and inspect ask the workers
        text = dedup(redis_server, "status", "--timeout", "1", app=PROJ)
        report = dedup(redis_server, "status", "--json", "--timeout", "1", app=PROJ)
        inspected = dedup(redis_server, "inspect", key, "--timeout", "1", app=PROJ)
        # Then both show the task's mode, in text and in JSON
        assert text.returncode == 0, text.stderr
        assert text.stdout.splitlines()[2].split()[:3] == [
            key,
            "claim+lease",
            "until_executed",
        ]
        [document] = parsed(report)["keys"]
        assert (document["task"], document["mode"]) == (
            f"{PROJ}.tasks.build_report",
            "until_executed",
        )
        assert inspected.returncode == 0, inspected.stderr
        assert "(mode until_executed, as configured in this app)" in inspected.stdout

        # When a task module of the app cannot be imported
        broken = dedup(
            redis_server,
            "status",
            "--json",
            "--timeout",
            "1",
            app=PROJ,
            imports=[f"{PROJ}.missing", f"{PROJ}.tasks"],
        )
        # Then the command says so in one line, and goes on without the mode
        assert broken.returncode == 0, broken.stderr
        assert broken.stderr.splitlines() == [
            "warning: could not import the app's task modules (ModuleNotFoundError:"
            f" No module named '{PROJ}.missing'); the modes of their tasks are unknown"
        ]
        [document] = parsed(broken)["keys"]
        assert (document["task"], document["mode"]) == (
            f"{PROJ}.tasks.build_report",
            None,
        )
    finally:
        kill(worker)


# -- release: the question, the watch and the refusals ---------------------------

KEY = "5e" * 16
OTHER = "6f" * 16


def hold(
    redis_client: redis.Redis, key: str = KEY, task_id: str = "t-1", ttl: float = 60
) -> str:
    """A claim and a lease member of ``task_id`` in ``key``, taken with the
    store's scripts as a worker takes them; nobody renews the lease."""
    store = Store(redis_client, "dedup")
    store.claim(key, task_id, 3600)
    holder = member(task_id, "w9@rig", 4242, None)
    acquired = store.acquire(
        key, holder, task_id, ttl=ttl, max_running=1, fence_ttl=3600, free_claim=False
    )
    assert acquired.token, acquired
    return holder


def release_process(redis_server: RedisServer, *args: str) -> subprocess.Popen[bytes]:
    """``release *args`` without --yes, for the test to answer its question."""
    return subprocess.Popen(
        command(APP, "release", *args),
        cwd=ROOT,
        env=environment(redis_server, None, {}),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def until_question(process: subprocess.Popen[bytes], timeout: float) -> str:
    """What ``process`` wrote on stderr up to its ``[y/N]:`` question."""
    assert process.stderr is not None
    text = b""
    deadline = time.monotonic() + timeout
    while not text.rstrip().endswith(b"[y/N]:"):
        left = max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([process.stderr], [], [], left)
        chunk = os.read(process.stderr.fileno(), 4096) if ready else b""
        if not chunk:
            raise AssertionError(f"no question within {timeout}s: {text.decode()}")
        text += chunk
    return text.decode()


def test_release_asks_at_once_and_refuses_a_lease_renewed_meanwhile(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # Given a live lease with a minute left: watching it for a renewal takes 21 s
    holder = hold(redis_client, ttl=60)
    started = time.monotonic()
    process = release_process(redis_server, KEY, "--json")
    try:
        # When release is run without --yes
        said = until_question(process, timeout=30)
        asked = time.monotonic() - started
        # and the body renews its lease while the question waits for an answer
        assert Store(redis_client, "dedup").renew(KEY, holder, 60)
        out, err = process.communicate(b"y\n", timeout=30)
    finally:
        process.kill()
    took = time.monotonic() - started
    # Then the question comes at once, after saying how long the watch lasts
    assert asked < 5, said
    assert re.search(r"the lease is watched for up to 2\d\.\ds from now", said), said
    # And the confirmed release refuses at the renewal, not after the whole watch
    assert process.returncode == 1, err
    report = json.loads(out)
    assert (report["key"], report["released"], report["claim"]) == (KEY, False, "t-1")
    assert report["error"].startswith(
        f"Refusing to release {KEY}: its lease is being renewed by task t-1"
    )
    assert took < 5, err
    assert redis_client.exists(f"dedup:{{{KEY}}}:claim", f"dedup:{{{KEY}}}:lease") == 2


def test_release_with_nothing_live_asks_at_once(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # Given a claim whose body is gone: its lease expired
    hold(redis_client, ttl=0.05)
    lease = f"dedup:{{{KEY}}}:lease"
    wait_for(lambda: not redis_client.exists(lease), 5, "the lease to expire")
    started = time.monotonic()
    process = release_process(redis_server, KEY)
    try:
        # When release is run without --yes, and confirmed
        said = until_question(process, timeout=30)
        asked = time.monotonic() - started
        out, err = process.communicate(b"y\n", timeout=30)
    finally:
        process.kill()
    # Then it asks at once, watches nothing, and releases the key
    assert asked < 5, said
    assert "watched" not in said
    assert process.returncode == 0, err
    assert out.decode().startswith(
        f"Released dedup key {KEY}: deleted the claim of task t-1;"
    )
    assert time.monotonic() - started < 5
    assert not redis_client.exists(f"dedup:{{{KEY}}}:claim")


def test_release_of_a_gone_holder_asks_first_then_watches(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # Given a lease with 30 s left that nobody renews: its body is gone, which
    # only a watch of 30/3 + 1 s can tell
    hold(redis_client, ttl=30)
    started = time.monotonic()
    process = release_process(redis_server, KEY)
    try:
        # When release is run without --yes, and confirmed at once
        said = until_question(process, timeout=30)
        asked = time.monotonic() - started
        out, err = process.communicate(b"y\n", timeout=30)
    finally:
        process.kill()
    took = time.monotonic() - started
    # Then the question comes first, and the watch after it
    assert asked < 5, said
    assert process.returncode == 0, err
    assert 10 <= took < 20, err
    assert out.decode().startswith(f"Released dedup key {KEY}: deleted the claim")
    assert not redis_client.exists(f"dedup:{{{KEY}}}:claim", f"dedup:{{{KEY}}}:lease")


def test_release_refusals_say_why_in_json(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # When nothing is stored for a dedup key, given as itself or a Redis key name
    for target in (KEY, f"dedup:{{{KEY}}}:claim"):
        done = dedup(redis_server, "release", target, "--yes", "--json")
        # Then the message names the dedup key, in text and in JSON
        message = (
            f"Nothing to release for dedup key {KEY} under prefix 'dedup': "
            "no claim and no lease"
        )
        assert done.returncode == 1, done.stderr
        assert message in done.stderr
        assert parsed(done) == {
            "key": KEY,
            "released": False,
            "forced": False,
            "claim": None,
            "leases": [],
            "fence": None,
            "error": message,
        }
    # When a task id holds two keys
    store = Store(redis_client, "dedup")
    store.claim(KEY, "t-2", 3600)
    store.claim(OTHER, "t-2", 3600)
    done = dedup(redis_server, "release", "t-2", "--yes", "--json")
    assert done.returncode == 1, done.stderr
    assert parsed(done)["error"] == (
        f"Task t-2 holds 2 dedup keys ({KEY}, {OTHER}); release them one KEY at a time"
    )
    # When nobody answers the question (no terminal, no --yes)
    done = dedup(redis_server, "release", OTHER, "--json")
    assert done.returncode == 1, done.stderr
    report = parsed(done)
    assert (report["key"], report["claim"], report["error"]) == (
        OTHER,
        "t-2",
        "Not confirmed: nothing was released",
    )
    assert redis_client.exists(f"dedup:{{{OTHER}}}:claim")


# -- the conventions: help texts, option groups, JSON on every outcome -----------


def test_help_explains_the_arguments_and_orders_the_option_groups(
    redis_server: RedisServer,
) -> None:
    texts, groups = {}, {}
    for name in ("status", "inspect", "release", "check", "outbox", "relay"):
        done = dedup(redis_server, name, "--help")
        assert done.returncode == 0, done.stderr
        texts[name] = " ".join(done.stdout.split())
        groups[name] = re.findall(r"^(\w[\w ]*):$", done.stdout, re.MULTILINE)
    assert "KEY, the first column, is a dedup key: the 32 hex digits" in texts["status"]
    for name in ("inspect", "release"):
        assert f"dedup {name} [OPTIONS] KEY_OR_TASK_ID" in texts[name]
        assert (
            "KEY_OR_TASK_ID is a dedup key as status shows it (32 hex digits), one "
            "of its Redis key names (such as dedup:{KEY}:claim), or a task id"
        ) in texts[name]
    assert "then watches: it refuses at the first renewal" in texts["release"]
    assert groups == {
        "status": ["Lookup Options", "Output Options", "Options"],
        "inspect": ["Arguments", "Lookup Options", "Output Options", "Options"],
        "release": ["Arguments", "Release Options", "Output Options", "Options"],
        "check": ["Check Options", "Output Options", "Options"],
        "outbox": ["Outbox Options", "Output Options", "Options"],
        "relay": ["Relay Options", "Output Options", "Options"],
    }


@pytest.mark.parametrize(
    ("args", "fields"),
    [
        (("status",), {"prefix", "workers", "keys"}),
        (("inspect", KEY), {"prefix", "query", "matched", "workers", "keys"}),
        (
            ("release", KEY, "--yes"),
            {"key", "released", "forced", "claim", "leases", "fence"},
        ),
    ],
    ids=["status", "inspect", "release"],
)
def test_json_on_a_redis_outage_and_a_bad_setting(
    redis_server: RedisServer, args: tuple[str, ...], fields: set[str]
) -> None:
    # When the dedup keys' Redis does not answer
    down = dedup(
        redis_server, *args, "--json", dedup_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    # Then the command exits 69, and its JSON says why
    assert down.returncode == 69, down.stderr
    report = parsed(down)
    assert set(report) == fields | {"error"}
    assert report["error"].startswith("Could not read Redis at redis://127.0.0.1:")
    # When dedup_redis_url is not a Redis URL
    bad = dedup(redis_server, *args, "--json", dedup_url="http://127.0.0.1:6379/0")
    # Then it exits 78, and its JSON names the setting
    assert bad.returncode == 78, bad.stderr
    report = parsed(bad)
    assert set(report) == fields | {"error"}
    assert report["error"].startswith("dedup_redis_url: expected a redis://")
