"""S1, S3 and S5 on the ``threads``, ``solo`` and ``gevent`` pools, and what
the lease heartbeat does under gevent.

The prefork pool is what the other scenarios run on. Here every worker is a
real ``celery worker --pool POOL`` process; the bodies record their runs, so
runs and overlaps are counted from what actually ran.

S5 differs from prefork's: only a prefork child can be killed alone (and its
lease freed by the worker's main process). A ``threads``, ``solo`` or
``gevent`` worker runs its bodies in its own process, so the whole worker is
killed here, and the key comes back when the lease expires in Redis.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery.exceptions import TimeLimitExceeded

from celery_dedup import LockLostError
from celery_dedup.connection import get_backend
from tests.rig import (
    FREE,
    Recorder,
    RedisServer,
    Worker,
    dropped_onto,
    held,
    max_overlap,
    wait_for,
)
from tests.scenarios.test_s1_duplicate_burst import burst

pytestmark = pytest.mark.scenario

APP = "tests.apps.pools_app"
GREEN_WARNING = "greenlets in this process, so the lease heartbeat renews only"
needs_gevent = pytest.mark.skipif(
    importlib.util.find_spec("gevent") is None,
    reason="gevent is not installed (pip install 'celery-dedup[test]')",
)
#: The pools, each with the slots one worker of it has.
POOLS = [
    pytest.param("threads", 4, id="threads"),
    pytest.param("solo", 1, id="solo"),
    pytest.param("gevent", 8, id="gevent", marks=needs_gevent),
]
#: Every call is published; only the execution lease keeps bodies apart.
LEASE_ONLY = {"dedup_lock": "while_executing"}


def pool_worker(
    workers: Callable[..., Worker], pool: str, slots: int, **kwargs: Any
) -> Worker:
    return workers(concurrency=slots, pool=pool, app_module=APP, **kwargs)


def ended(results: list[Any]) -> bool:
    return all(result.ready() for result in results)


def lane(member: str) -> str:
    """The thread (or greenlet) part of a lease member; "" for a main thread."""
    return member.rsplit("|", 2)[-2]


def pid_of(member: str) -> int:
    return int(member.rsplit("|", 3)[-3])


# -- S1: a duplicate burst --------------------------------------------------


@pytest.mark.parametrize(("pool", "slots"), POOLS)
def test_s1_a_burst_runs_once(
    pool: str,
    slots: int,
    scenario_app: Any,
    redis_server: RedisServer,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    # Given two workers of the pool, with free slots to run copies in parallel
    started = [pool_worker(workers, pool, slots) for _ in range(2)]
    # (a gevent worker says as it starts, before any lease, that its
    # heartbeat is a greenlet; no other pool does)
    warned = [GREEN_WARNING in worker.log() for worker in started]
    assert warned == [pool == "gevent"] * 2
    # When 3 processes enqueue one 5 s job 30 times in 3 s (default lock)
    calls = burst(redis_server, queue, {}, args=[75, 5.0])
    # Then it ran once, and every call was handed that one task
    wait_for(lambda: recorder.runs("close_campaign"), 30, "the run")
    time.sleep(1)
    runs = recorder.runs("close_campaign")
    assert len(runs) == 1
    assert {c["id"] for c in calls} == {runs[0]["task_id"]}
    assert sum(c["deduplicated"] for c in calls) == 29
    assert runs[0]["lease_valid"] is True


@pytest.mark.parametrize(("pool", "slots"), POOLS)
def test_s1_a_published_burst_never_overlaps(
    pool: str,
    slots: int,
    scenario_app: Any,
    redis_server: RedisServer,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    # Given two workers of the pool
    for _ in range(2):
        pool_worker(workers, pool, slots)
    # When 30 copies of a 0.5 s job are all published within 3 s
    calls = burst(redis_server, queue, LEASE_ONLY, args=[76, 0.5])
    assert not any(c["deduplicated"] for c in calls)
    results = [scenario_app.app.AsyncResult(c["id"]) for c in calls]
    wait_for(lambda: ended(results), 60, "every copy to end")
    # Then no two bodies ever ran at once, however many slots were free
    runs = recorder.runs("close_campaign")
    assert max_overlap(runs) == 1
    assert 1 <= len(runs) <= 8
    # and every other copy was dropped, naming a task that ran
    assert_dropped_onto_runs(results, runs)


def assert_dropped_onto_runs(results: list[Any], runs: list[dict[str, Any]]) -> None:
    """Every copy that did not run was dropped, naming a task that ran."""
    ran = {r["task_id"] for r in runs}
    dropped = [dropped_onto(result) for result in results if result.id not in ran]
    assert len(runs) + len(dropped) == len(results)
    assert set(dropped) <= ran


# -- S3: a monitor enqueued again while it runs -----------------------------


@pytest.mark.parametrize(("pool", "slots"), POOLS)
def test_s3_a_monitor_never_stacks(
    pool: str,
    slots: int,
    scenario_app: Any,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    # Given two workers of the pool
    pool_worker(workers, pool, slots)
    pool_worker(workers, pool, slots)
    monitor = scenario_app.close_campaign
    # When a 1.5 s monitor is published every 0.5 s for 6 s
    results = []
    for _ in range(12):
        results.append(monitor.apply_async((3, 1.5), queue=queue, **LEASE_ONLY))
        time.sleep(0.5)
    assert not any(r.deduplicated for r in results)
    wait_for(lambda: ended(results), 30, "every copy to end")
    runs = recorder.runs("close_campaign")
    # Then two bodies of it never ran at once
    assert max_overlap(runs) == 1
    # and it kept running, back to back, the copies met meanwhile dropped
    assert 2 <= len(runs) <= 5
    assert_dropped_onto_runs(results, runs)


# -- S5: the worker is killed mid-body --------------------------------------

LOCK_TTL = 3


@pytest.mark.parametrize(("pool", "slots"), POOLS)
def test_s5_a_killed_worker_frees_the_key_within_the_lease_ttl(
    pool: str,
    slots: int,
    scenario_app: Any,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    from tests.apps import pools_app

    options = {
        "dedup_on_conflict": "reschedule",
        "dedup_lock_ttl": LOCK_TTL,
    }
    doomed = pool_worker(workers, pool, slots)
    # Given a 60 s body running under a 3 s lease, renewed every second
    first = pools_app.hold.apply_async(("s5", 60.0), queue=queue, **options)
    wait_for(lambda: recorder.started("hold"), 20, "the body to start")
    pool_worker(workers, pool, slots)  # a survivor, idle so far
    time.sleep(1.5)
    # When the whole worker is killed (a pool of threads cannot lose one body)
    os.killpg(doomed.pid, signal.SIGKILL)
    killed_at = time.time()
    # (once Redis saw it go: a message published before then could still be
    # handed to the dead worker's pending BRPOP, and be lost with it)
    assert doomed.process is not None
    doomed.process.wait(10)
    time.sleep(0.2)
    # and the job is called again at once
    again = pools_app.hold.apply_async(("s5", 0.2), queue=queue, **options)
    assert not again.deduplicated
    # Then it waits for the dead body's lease, and runs once that expired
    assert again.get(timeout=30) == "s5"
    runs = recorder.runs("hold")
    assert [r["task_id"] for r in runs] == [again.id]
    waited = runs[0]["start"] - killed_at
    assert 1.0 < waited < LOCK_TTL + 2.5, waited
    assert recorder.delivered("hold").count(again.id) >= 2  # it was rescheduled
    # and nothing of the key is held afterwards
    time.sleep(0.2)
    assert held(redis_client, pools_app.hold, ("s5", 0.0)) == FREE
    assert first.state != "SUCCESS"


@pytest.mark.parametrize(("pool", "slots"), POOLS)
def test_s5_a_killed_workers_task_is_redelivered_and_run_once(
    pool: str,
    slots: int,
    scenario_app: Any,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    from tests.scenarios.test_s4_redelivery import REDELIVERING_BROKER, restore_unacked

    # Given a broker that hands an unacknowledged message out again after 3 s,
    # and a 4 s job (default lock: its claim stays until it is done)
    doomed = pool_worker(workers, pool, slots, conf=REDELIVERING_BROKER)
    task = scenario_app.close_campaign
    result = task.apply_async((7, 4.0), queue=queue, dedup_lock_ttl=LOCK_TTL)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the body to start")
    # When its worker is killed 1 s into the body
    time.sleep(1)
    os.killpg(doomed.pid, signal.SIGKILL)
    killed_at = time.time()
    # Then a call made meanwhile is the same job, not a second one
    assert task.apply_async((7, 4.0), queue=queue).id == result.id
    # and once the message is redelivered to another worker, it runs to the end
    pool_worker(workers, pool, slots, conf=REDELIVERING_BROKER)
    time.sleep(2.5)
    restore_unacked(scenario_app.app.conf.broker_url)
    assert result.get(timeout=60) == 7
    runs = recorder.runs("close_campaign")
    assert [r["task_id"] for r in runs] == [result.id]
    assert runs[0]["start"] - killed_at < LOCK_TTL + 10
    # and the key is free: a new call publishes and runs
    time.sleep(0.2)
    assert held(redis_client, task, (7, 4.0))["lease"] == 0
    again = task.apply_async((7, 0.1), queue=queue)
    assert not again.deduplicated
    assert again.get(timeout=30) == 7


# -- hard time limits -------------------------------------------------------


@pytest.mark.parametrize(("pool", "slots"), POOLS)
def test_a_hard_time_limit_on_each_pool(
    pool: str,
    slots: int,
    scenario_app: Any,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    pool_worker(workers, pool, slots)
    task = scenario_app.close_campaign
    # Given a 3 s body with a 1 s hard time limit, under a 30 s lease
    result = task.apply_async((8, 3.0), queue=queue, time_limit=1, dedup_lock_ttl=30)
    wait_for(result.ready, 30, "the task to end")
    if pool == "gevent":
        # Then gevent raises its Timeout in the body at its next yield: the
        # body ends, gives its key back at once, and the task fails
        assert result.state == "FAILURE"
        assert isinstance(result.result, TimeLimitExceeded)
        assert recorder.runs("close_campaign") == []
    else:
        # Then threads and solo do not enforce it: the body runs to its end,
        # under its lease, and releases the key as it ends
        assert result.get() == 8
        [run] = recorder.runs("close_campaign")
        assert run["end"] - run["start"] >= 2.9
        assert run["lease_valid"] is True
    assert len(recorder.started("close_campaign")) == 1
    time.sleep(0.2)
    assert held(get_backend(scenario_app.app).redis, task, (8, 3.0)) == FREE
    again = task.apply_async((8, 0.1), queue=queue)
    assert not again.deduplicated
    assert again.get(timeout=30) == 8


# -- gevent: the heartbeat is a greenlet ------------------------------------


def lease_scores(client: redis.Redis, task: Any, args: tuple[Any, ...]) -> list[float]:
    key = task.dedup_key_for(args)
    return [
        score
        for _, score in client.zrange(f"dedup:{{{key}}}:lease", 0, -1, withscores=True)
    ]


@needs_gevent
def test_gevent_renews_while_the_body_yields(
    scenario_app: Any,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    from tests.apps import pools_app

    worker = pool_worker(workers, "gevent", 8)
    task = pools_app.hold
    # Given a 7 s body that sleeps (yields) every 0.05 s, under a 3 s lease
    first = task.apply_async(("g1", 7.0), queue=queue, dedup_lock_ttl=LOCK_TTL)
    wait_for(lambda: recorder.started("hold"), 20, "the body to start")
    early = lease_scores(redis_client, task, ("g1", 0.0))
    time.sleep(LOCK_TTL + 1)
    late = lease_scores(redis_client, task, ("g1", 0.0))
    # Then its lease was renewed: it is held past the TTL it was taken with
    assert len(early) == len(late) == 1
    assert late[0] - early[0] >= 2000  # ms
    # and a copy made then is dropped, naming the running body
    copy = task.apply_async(("g1", 0.1), queue=queue, dedup_lock_ttl=LOCK_TTL)
    assert dropped_onto(copy, timeout=20) == first.id
    assert first.get(timeout=20) == "g1"
    [run] = recorder.runs("hold")
    assert run["lease_valid"] is True
    assert recorder.leases_lost() == []
    assert GREEN_WARNING in worker.log()


@needs_gevent
def test_gevent_renews_between_short_bursts_of_computing(
    scenario_app: Any,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    from tests.apps import pools_app

    pool_worker(workers, "gevent", 8)
    # Given a 7 s body that computes 1 s (a third of its TTL) between yields
    result = pools_app.hold.apply_async(
        ("g2", 7.0, 1.0), queue=queue, dedup_lock_ttl=LOCK_TTL
    )
    # Then the heartbeat renews at each yield, in time: the lease is kept
    assert result.get(timeout=30) == "g2"
    [run] = recorder.runs("hold")
    assert run["end"] - run["start"] >= 6.9
    assert run["lease_valid"] is True
    assert recorder.leases_lost() == []


@needs_gevent
def test_gevent_loses_the_lease_of_a_body_that_never_yields(
    scenario_app: Any,
    redis_server: RedisServer,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    from tests.apps import pools_app

    # Given a gevent worker, and another worker on a queue of its own
    pool_worker(workers, "gevent", 8)
    other = f"{queue}-other"
    pool_worker(workers, "threads", 2, queue_name=other)
    task = pools_app.hold
    # When a body computes for 5 s without yielding, under a 3 s lease
    first = task.apply_async(("g3", 0.0, 5.0), queue=queue, dedup_lock_ttl=LOCK_TTL)
    wait_for(lambda: recorder.started("hold"), 20, "the body to start")
    # Then its heartbeat cannot run: the lease expires while the body computes,
    # and another body of the key starts meanwhile (the limit of gevent)
    time.sleep(LOCK_TTL + 0.5)
    second = task.apply_async(("g3", 0.1), queue=other, dedup_lock_ttl=LOCK_TTL)
    assert second.get(timeout=20) == "g3"
    # and the first body ends with LockLostError, its loss signalled
    wait_for(first.ready, 30, "the computing body to end")
    assert first.state == "FAILURE"
    assert isinstance(first.result, LockLostError)
    assert [lost["task_id"] for lost in recorder.leases_lost()] == [first.id]
    runs = {r["task_id"]: r for r in recorder.runs("hold")}
    assert runs[first.id]["lease_valid"] is False
    assert runs[second.id]["lease_valid"] is True
    assert max_overlap(list(runs.values())) == 2
    # and the fence tells them apart: the later holder's token is greater
    assert runs[second.id]["fence"] > runs[first.id]["fence"]


@needs_gevent
def test_gevent_greenlets_hold_leases_as_distinct_members(
    scenario_app: Any,
    redis_client: redis.Redis,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    from tests.apps import pools_app

    worker = pool_worker(workers, "gevent", 8)
    task = pools_app.hold
    options = {"dedup_max_running": 2, "dedup_lock_ttl": LOCK_TTL}
    # Given two bodies of one key that may run at once, in one gevent process
    pair = [task.apply_async(("g4", 2.0), queue=queue, **options) for _ in range(2)]
    assert [r.get(timeout=30) for r in pair] == ["g4", "g4"]
    runs = recorder.runs("hold")
    # Then they did run at once, each as its own member of the lease set
    assert max_overlap(runs) == 2
    members = [r["member"] for r in runs]
    assert {pid_of(m) for m in members} == {worker.pid}
    assert all(lane(m) for m in members)  # greenlets, not the main thread
    assert len({lane(m) for m in members}) == 2
    # When one task id is delivered twice at once in that process
    twice = [
        task.apply_async(("g5", 1.5), queue=queue, task_id="g5-once", **options)
        for _ in range(2)
    ]
    assert not any(r.deduplicated for r in twice)
    wait_for(lambda: ended(twice), 30, "the task to end")
    wait_for(
        lambda: recorder.delivered("hold").count("g5-once") >= 2,
        10,
        "its second delivery",
    )
    # Then its second delivery waited for the first and, finding it done,
    # did not run it again
    ran = [r for r in recorder.runs("hold") if r["task_id"] == "g5-once"]
    assert len(ran) == 1
    assert held(redis_client, task, ("g5", 0.0))["lease"] == 0
