"""S8: the lock store's Redis goes down mid-run and comes back.

The dedup keys live on a Redis of their own (the lock store), so the broker
and the result backend stay up while it is stopped. It is stopped while
bodies run and messages wait, and started again, once with its data kept
(``appendonly yes``) and once with it lost, under each
``dedup_on_redis_error`` rule, with a real prefork worker. Then:

- no task is lost: every accepted call runs, once; with ``"raise"`` a call
  made during the outage fails at once with ``BackendUnavailableError``, and
  a message already queued is rescheduled until Redis is back, then run;
- no body runs without a lease, except with ``"proceed"`` and only while
  Redis is down; a body whose lease Redis forgot (a restart without
  persistence) ends in ``LockLostError``, not ``SUCCESS``;
- every key is free again once Redis is back, long before its TTLs, nothing
  is left without an expiry, and a new call of each key runs, with a larger
  fencing token than before the outage;
- the worker's consumer does not stall: a plain task sent to the same
  worker during the outage runs within one Redis timeout of the main
  process (``connection._TIMEOUT``), doubled for a loaded machine.

A lock store that hangs (SIGSTOP) instead of stopping differs: a request
that timed out may have reached it, and runs when it answers again. The
last two tests check that such a claim, or lease, is not left held.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_dedup import BackendUnavailableError, LockLostError
from celery_dedup.config import REDIS_ERROR_RULES
from celery_dedup.connection import _TIMEOUT
from celery_dedup.lease import RETRY
from celery_dedup.model import OnRedisError
from tests.rig import FREE, Recorder, RedisServer, Worker, wait_for

pytestmark = pytest.mark.scenario

MODES = [rule.value for rule in REDIS_ERROR_RULES]

#: The lease TTL: renewed every 4 s, so the outage (a few seconds) stays well
#: under the two thirds of it that a held lease survives unrenewed.
LOCK_TTL = 12.0
#: The claim TTL, longer than a whole case: a key found free was released,
#: not expired.
DEDUP_TTL = 90.0
#: How long the bodies take: one that runs through the whole outage, those
#: the outage catches running, and those it catches queued.
SPAN = 10.0
RUNNING = 2.0
QUEUED = 0.5
AGAIN = 0.05
#: How long a plain task may wait for the worker while the lock store is
#: down: one main-process Redis timeout (the worker's consumer never waits
#: on Redis at all), and as much again for a loaded 2-core machine.
STALL_BOUND = 2 * _TIMEOUT
#: What the worker logs (tests.apps.scenario_app.close_campaign's name).
NAME = "tests.apps.scenario_app.close_campaign"


@pytest.fixture
def lock_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """The Redis of the dedup keys only; ``request.param``: kept on disk
    (default: not)."""
    workdir = tmp_path / "lock-store"
    workdir.mkdir()
    server = RedisServer(workdir, persistent=getattr(request, "param", False))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def lock_client(lock_store: RedisServer) -> Iterator[redis.Redis]:
    client = lock_store.client()
    yield client
    client.close()


@pytest.fixture
def split(
    scenario_app: Any,
    redis_server: RedisServer,
    lock_store: RedisServer,
    lock_client: redis.Redis,
    workers: Callable[..., Worker],
    queue: str,
) -> Iterator[Callable[..., tuple[Worker, Jobs]]]:
    """Start a worker, and point this process, at the lock store, with the
    settings ``conf``: the broker and result backend stay on ``redis_server``."""
    used: set[str] = set()

    def start(conf: dict[str, Any], concurrency: int = 1) -> tuple[Worker, Jobs]:
        used.update(conf)
        scenario_app.configure(redis_server.url(), lock_store.url(), **conf)
        worker = workers(
            concurrency=concurrency,
            conf=conf,
            env={"DEDUP_TEST_DEDUP_REDIS_URL": lock_store.url()},
        )
        return worker, Jobs(scenario_app.close_campaign, queue, lock_client)

    yield start
    # Back to the defaults for the next test (None: the default).
    scenario_app.configure(redis_server.url(), **dict.fromkeys(used))


@contextlib.contextmanager
def hung(server: RedisServer) -> Iterator[None]:
    """``server`` stops answering (SIGSTOP) until the block ends; it runs
    what it received meanwhile then."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def plain_task_delay(app: Any, queue: str) -> float:
    """Seconds from sending a plain Celery task (no dedup) to its result."""
    sent = time.monotonic()
    result = app.send_task("celery.accumulate", ("probe",), queue=queue)
    assert result.get(timeout=3 * STALL_BOUND) == ["probe"]
    return time.monotonic() - sent


def started(recorder: Recorder) -> set[str]:
    return {entry["task_id"] for entry in recorder.started("close_campaign")}


def runs_by_id(recorder: Recorder) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for run in recorder.runs("close_campaign"):
        found.setdefault(run["task_id"], []).append(run)
    return found


class Jobs:
    """Calls of ``close_campaign(job, pause)``, each job with its own dedup
    key (so that a short call can follow a long one of the same job), and
    what the lock store holds for each."""

    def __init__(self, task: Any, queue: str, lock_client: redis.Redis) -> None:
        self.task = task
        self.queue = queue
        self.lock_client = lock_client
        self.job_of: dict[str, int] = {}

    def call(self, job: int, pause: float, **options: Any) -> Any:
        result = self.task.apply_async(
            (job, pause), queue=self.queue, dedup_key=f"s8-{job}", **options
        )
        self.job_of[result.id] = job
        return result

    def held(self, job: int) -> dict[str, object]:
        key = self.task.dedup_key_for(dedup_key=f"s8-{job}")
        return {
            "claim": self.lock_client.get(f"dedup:{{{key}}}:claim"),
            "lease": self.lock_client.zcard(f"dedup:{{{key}}}:lease"),
        }

    def free(self, results: list[Any]) -> Callable[[], bool]:
        """Whether every key of ``results`` is free (nothing claimed or leased)."""
        return lambda: all(self.held(self.job_of[r.id]) == FREE for r in results)


def logged(worker: Worker, *texts: str) -> Callable[[], bool]:
    return lambda: all(text in worker.log() for text in texts)


@pytest.mark.parametrize(
    "lock_store", [True, False], ids=["appendonly", "volatile"], indirect=True
)
@pytest.mark.parametrize("mode", MODES)
def test_the_lock_store_goes_down_mid_run_and_comes_back(
    mode: str,
    lock_store: RedisServer,
    split: Callable[..., tuple[Worker, Jobs]],
    scenario_app: Any,
    recorder: Recorder,
    queue: str,
) -> None:
    proceed = mode == OnRedisError.PROCEED
    worker, jobs = split(
        {
            "dedup_on_redis_error": mode,
            "dedup_lock_ttl": LOCK_TTL,
            "dedup_ttl": DEDUP_TTL,
        },
        concurrency=3,
    )
    # Given a body that will run through the outage, two that will end
    # during it, and two messages queued behind them
    span = jobs.call(1, SPAN)
    wait_for(lambda: started(recorder), 30, "the long body")
    span_ends = time.time() + SPAN
    early = [
        *(jobs.call(job, RUNNING) for job in (10, 11)),
        *(jobs.call(job, QUEUED) for job in (12, 13)),
    ]
    wait_for(lambda: started(recorder) >= {early[0].id, early[1].id}, 30, "two")
    assert started(recorder).isdisjoint({early[2].id, early[3].id})
    assert jobs.held(1) == {"claim": span.id.encode(), "lease": 1}
    accepted = [span, *early]

    # When the lock store stops
    lock_store.stop()
    delays = [plain_task_delay(scenario_app.app, queue)]
    # and calls are made meanwhile: published unclaimed, or refused at once
    during = []
    for job in (20, 21):
        if proceed:
            during.append(jobs.call(job, QUEUED))
            assert not during[-1].deduplicated
            continue
        asked = time.monotonic()
        with pytest.raises(BackendUnavailableError) as refused:
            jobs.call(job, QUEUED)
        assert time.monotonic() - asked < _TIMEOUT
        assert refused.value.operation == "the enqueue claim"
    accepted += during
    # and it stays down until the bodies that ended failed to release, and
    # the queued ones met it: run unguarded, or rescheduled every
    # min(dedup_lock_ttl, 5 s)
    texts = [f"close_campaign[{r.id}]'s hold" for r in early[:2]]
    if proceed:
        texts += [f"{NAME}[{r.id}] runs without its lease" for r in early[2:] + during]
    else:
        texts += [f"Rescheduled {NAME}[{r.id}] in 5.0s: Redis" for r in early[2:]]
    wait_for(logged(worker, *texts), 30, "the outage to be met")
    delays.append(plain_task_delay(scenario_app.app, queue))
    # and comes back, with its data or without, while the long body still
    # runs for a renewal or two
    assert span_ends - time.time() > 3, "the outage took too long"
    lock_store.start()
    back_at = time.time()
    kept = {"claim": span.id.encode(), "lease": 1}
    assert jobs.held(1) == (kept if lock_store.persistent else FREE)

    # Then the consumer never stalled
    assert max(delays) < STALL_BOUND, f"plain task delays {delays}"
    # and the holds whose release failed are given back as soon as Redis is
    # back, while the long body still runs
    deferred = early[:2] + (early[2:] + during if proceed else [])
    wait_for(jobs.free(deferred), 5 * RETRY, "the deferred releases")
    # and every accepted call ran, once
    for result in accepted:
        result.get(timeout=60, propagate=False)
    runs = runs_by_id(recorder)
    assert {r.id: len(runs.get(r.id, [])) for r in accepted} == {
        r.id: 1 for r in accepted
    }
    assert all(r.state == "SUCCESS" for r in accepted if r is not span)
    # the long body kept its lease if Redis kept it, else it is told
    lost = recorder.leases_lost()
    if lock_store.persistent:
        assert span.result == 1 and lost == []
        assert runs[span.id][0]["lease_valid"]
    else:
        assert span.state == "FAILURE"
        assert isinstance(span.result, LockLostError)
        assert [entry["task_id"] for entry in lost] == [span.id]
        assert "vanished" in lost[0]["reason"]
        assert not runs[span.id][0]["lease_valid"]
    # and only "proceed" ran bodies unguarded, those that met the outage
    unguarded = {tid for tid, (run,) in runs.items() if run["fence"] is None}
    assert unguarded == ({r.id for r in early[2:] + during} if proceed else set())
    if not proceed:  # the queued ones ran once Redis was back
        assert all(runs[r.id][0]["start"] >= back_at - 0.5 for r in early[2:])

    # and every key is free, long before its TTLs; none is left without one
    wait_for(jobs.free(accepted), LOCK_TTL, "every key to be free")
    client = jobs.lock_client
    assert [k for k in client.scan_iter() if client.pttl(k) == -1] == []
    # and a new call of each job, refused ones included, is published and
    # runs under a new lease, fenced above every token before the outage
    fences = {jobs.job_of[tid]: run["fence"] for tid, (run,) in runs.items()}
    again = [jobs.call(job, AGAIN) for job in sorted({*fences, 20, 21})]
    assert not any(r.deduplicated for r in again)
    for result in again:
        job = jobs.job_of[result.id]
        assert result.get(timeout=60) == job
        (run,) = runs_by_id(recorder)[result.id]
        assert run["fence"] is not None
        assert run["fence"] > (fences.get(job) or 0)


# Guards: the claim script that timed out ran once Redis answered again, and
# nothing gave the claim back; the key was held until dedup_ttl by a task that
# was never published ("raise"), or that was published holding no claim
# ("proceed").
@pytest.mark.parametrize("mode", MODES)
def test_a_claim_that_timed_out_on_a_hung_lock_store_is_not_left_held(
    mode: str, lock_store: RedisServer, split: Callable[..., tuple[Worker, Jobs]]
) -> None:
    _, jobs = split({"dedup_on_redis_error": mode, "dedup_ttl": DEDUP_TTL})
    # (a script the server has not cached would fail with NOSCRIPT when run)
    assert jobs.call(30, AGAIN).get(timeout=30) == 30
    # Given the lock store stops answering
    with hung(lock_store):
        # When a call times out on it: refused, or published unclaimed
        asked = time.monotonic()
        if mode == OnRedisError.PROCEED:
            first = jobs.call(31, AGAIN)
            assert not first.deduplicated
        else:
            with pytest.raises(BackendUnavailableError):
                jobs.call(31, AGAIN)
        assert time.monotonic() - asked >= _TIMEOUT / 2  # a timeout, not a refusal
    # and Redis answers again
    if mode == OnRedisError.PROCEED:
        assert first.get(timeout=30) == 31
    # Then the key is free again at once, not at dedup_ttl
    with contextlib.suppress(AssertionError):
        wait_for(lambda: jobs.held(31) == FREE, 5 * RETRY, "the key to be free")
    assert jobs.held(31) == FREE
    # and a new call of the job is published and runs
    again = jobs.call(31, AGAIN)
    assert not again.deduplicated
    assert again.get(timeout=30) == 31


# Guards: the lease script that timed out ran once Redis answered again, and
# its lease held the key until dedup_lock_ttl: the rescheduled copy waited
# for it ("raise"), a new call was dropped as its duplicate ("proceed").
@pytest.mark.parametrize("mode", MODES)
def test_a_lease_that_timed_out_on_a_hung_lock_store_is_not_left_held(
    mode: str, lock_store: RedisServer, split: Callable[..., tuple[Worker, Jobs]]
) -> None:
    proceed = mode == OnRedisError.PROCEED
    worker, jobs = split(
        {
            "dedup_on_redis_error": mode,
            "dedup_lock_ttl": LOCK_TTL,
            "dedup_ttl": DEDUP_TTL,
        }
    )
    assert jobs.call(40, AGAIN).get(timeout=30) == 40  # the scripts are cached
    # Given a call claimed while the lock store answers, to run in a second
    first = jobs.call(41, AGAIN, countdown=1)
    # When the lock store stops answering before it runs
    with hung(lock_store):
        # and the worker's lease request times out: run unguarded, or
        # rescheduled
        if proceed:
            met = f"{NAME}[{first.id}] runs without its lease"
        else:
            met = f"Rescheduled {NAME}[{first.id}] in 5.0s: Redis"
        wait_for(logged(worker, met), 30, "the lease request to time out")
    # and Redis answers again
    assert first.get(timeout=60) == 41
    # Then its rescheduled copy was not kept waiting by a lease of its own
    assert "another delivery of it runs" not in worker.log()
    # and the key is free once the task ended, not dedup_lock_ttl later
    wait_for(jobs.free([first]), 5 * RETRY, "the key to be free")
    # and a new call of the job runs
    again = jobs.call(41, AGAIN)
    assert not again.deduplicated
    assert again.get(timeout=30) == 41
