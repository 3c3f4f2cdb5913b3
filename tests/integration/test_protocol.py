"""The whole dedup protocol as a state machine, on a real Redis.

A Hypothesis ``RuleBasedStateMachine`` plays callers, a broker and a prefork
worker against the real Lua scripts of :class:`celery_dedup.store.Store` and
the pure decisions of :mod:`celery_dedup.model`, combined as the adapters
combine them: :meth:`celery_dedup.task.DedupTask.apply_async` at enqueue
(claim, ``on_claim``, publish or not), :func:`celery_dedup.execution.run` in a
body (acquire, ``on_acquire``, then run, drop with ``on_drop``'s release, or
reschedule through ``apply_async`` again), ``_give_back`` / ``free`` when a
body ends (``on_end``) and :mod:`celery_dedup.request` in the worker's main
process (a dead child's lease given back with the child's member, a revoked
message's claim). Each example draws a lock mode, ``on_conflict``,
``on_redis_error`` and ``max_running``, then interleaves calls, deliveries,
lost acks, body ends, child kills, lease and claim expiry, revokes, renewals,
an operator's ``dedup release`` and Redis errors on two dedup keys.

Time is not waited for, and never drawn. What elapsed time does to the keys is
applied at a chosen step instead, so that every run of an example is the same:

- a lease expires when Redis's clock passes its score in the lease set (ms of
  Redis time; see :mod:`celery_dedup.store`): the ``lease_expires`` rule sets
  one member's score to Redis ``TIME`` in ms minus 1, which every script then
  treats as expired (ACQUIRE purges scores up to now, RENEW refuses a score
  that is not after now). A body whose lease expired has also lost it by its
  own clock (:class:`celery_dedup.lease.Lease` counts from before the request,
  ``CLOCK_MARGIN`` sooner than Redis), so it ends in ``LockLostError``;
- a claim (or, at the end, a lease set) expires when its own TTL passes: it is
  given a 1 ms TTL and the test polls until Redis reports it gone.

Otherwise the TTLs (claim 1 h, lease 5 min) are far longer than a run, so
nothing expires by itself and the scripts' answers do not depend on timing.
Redis errors are injected by a client whose next command fails with
``redis.ConnectionError`` before reaching the server, armed by a rule.

Invariants, after every step:

1. at most ``max_running`` bodies of a key run under a lease they hold as
   valid (``Lease.valid``: not expired, no renewal refused), never two of one
   task id, and each such lease is in the lease set; the set never has more
   members than that, and its unexpired members are exactly those the model
   says are held. The answers of ACQUIRE and RENEW agree with the model;
2. fencing tokens of a key strictly increase, and with one holder
   (``lease_keeps_fence``) a body under a valid lease holds the newest token;
3. (partly) a call answered ``raise_duplicate`` or ``raise_unavailable`` was
   never published;
5. a completion marker exists only for a task id whose body ended in success;

plus: every key under the prefix has a TTL no longer than its setting. At
teardown every queued message is delivered and every body ends in success
(no Redis errors then), then (3) every published call ran its body to an end,
was revoked by its caller, or was dropped as a duplicate of a task that did,
and every call deduplicated at enqueue names such a holder; and (4) once every
task ended and the TTLs passed, no claim and no lease key is left and the key
can be claimed and leased anew with a newer token.

Run with ``-s`` (or ``-rA``) to see how much it explored.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import sys
import time
from typing import Any, Final

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from celery_dedup import model
from celery_dedup.inspection import Inspector
from celery_dedup.lease import holder, member, task_of
from celery_dedup.model import (
    Act,
    ClaimStatus,
    Ending,
    LeaseStatus,
    Lock,
    OnConflict,
    OnRedisError,
    Publish,
    Release,
)
from celery_dedup.store import CLAIM_PART, DONE_PART, FENCE_PART, LEASE_PART, Store

pytestmark = pytest.mark.integration

PREFIX: Final = "dedup"
KEYS: Final = ("5a1d" * 8, "b0b0" * 8)
HOST: Final = "w1@test"
MAIN_PID: Final = 1  # the worker's main process
TTL: Final = 3600.0  # dedup_ttl (the claim)
LOCK_TTL: Final = 300.0  # dedup_lock_ttl
DONE_TTL: Final = 7200.0  # dedup_done_ttl
FENCE_TTL: Final = max(DONE_TTL, 3 * LOCK_TTL)  # as execution.run computes it
#: The longest TTL each part of a key may have.
TTL_BOUND_MS: Final = {
    CLAIM_PART: TTL * 1000,
    LEASE_PART: LOCK_TTL * 1000,
    FENCE_PART: FENCE_TTL * 1000,
    DONE_PART: DONE_TTL * 1000,
}
DRAIN_LIMIT: Final = 5000
# Budgets per example, so that the steps go to deliveries and ends rather than
# to an ever longer queue, revokes of all of it, or Redis down at every call.
MAX_QUEUED: Final = 4  # no call or redelivery while that many are queued
MAX_REVOKES: Final = 2
MAX_ERRORS: Final = 4  # Redis errors injected

PICK = st.integers(0, 10**6)  # an index, taken modulo the current list's length
KEY = st.sampled_from(KEYS)
#: How a caller publishes (drawn from this list: mostly a plain call).
CALLS: Final = ("apply_async", "apply_async", "apply_async", "workflow", "send_task")

#: What the machine explored, over the whole test (printed at its end).
STATS: collections.Counter[str] = collections.Counter()

#: ``DEDUP_PROTOCOL_EXAMPLES=5000`` explores that many random examples,
#: new ones each run, instead of the same 200 each run.
EXPLORE: Final = os.environ.get("DEDUP_PROTOCOL_EXAMPLES")

SETTINGS: Final = settings(
    max_examples=int(EXPLORE or 200),
    stateful_step_count=50,
    deadline=None,
    derandomize=EXPLORE is None,
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)


class FlakyRedis(redis.Redis):
    """The Store's client: its next command fails, unsent, once ``armed``."""

    armed = False

    def execute_command(self, *args: Any, **options: Any) -> Any:
        if self.armed:
            self.armed = False
            STATS["redis errors injected"] += 1
            raise redis.ConnectionError("injected: Redis unreachable")
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


@dataclasses.dataclass(frozen=True)
class Message:
    """A message in the broker."""

    task_id: str
    key: str
    stamped: bool  # carries the celery_dedup header (False: sent by name)
    claim: bool  # its stamp says it holds the claim
    workflow: bool


@dataclasses.dataclass
class Body:
    """A body running in a child process (``member`` "": without a lease)."""

    delivery: int
    message: Message
    pid: int
    member: str
    token: int
    fence: int | None
    has_claim: bool
    lost: bool = False  # the body knows its lease is lost (LockLostError)


@dataclasses.dataclass(frozen=True)
class Job:
    """A deferred ``store.release`` on a process's background thread."""

    pid: int
    key: str
    member: str
    task_id: str
    release: Release
    delivery: int | None  # the delivery whose lease ``member`` names
    by_holder: bool = False  # ``member`` is a dead child's lease.holder


@dataclasses.dataclass(frozen=True)
class Call:
    """What a caller's ``apply_async`` (or ``send_task``) got."""

    task_id: str
    answer: str  # published, duplicate, raise_duplicate, raise_unavailable
    holder: str | None = None


class ProtocolMachine(RuleBasedStateMachine):
    def __init__(self, client: redis.Redis) -> None:
        super().__init__()
        client.flushdb()
        self.raw = client
        self.flaky = FlakyRedis(connection_pool=client.connection_pool)
        self.store = Store(self.flaky, PREFIX)  # what the adapters use
        self.observer = Store(client, PREFIX)  # what the invariants read with
        self.inspector = Inspector(client, PREFIX)  # `celery dedup release`
        self.ready = False
        self.steps = 0
        self.revokes = 0
        self.errors = 0
        self.lock = Lock.UNTIL_EXECUTED
        self.on_conflict = OnConflict.SKIP
        self.on_redis_error = OnRedisError.RAISE
        self.max_running = 1
        self.ids = itertools.count(1)
        self.pids = itertools.count(100)
        self.deliveries = itertools.count(1)
        self.queue: list[Message] = []
        self.delivered: list[Message] = []
        self.bodies: list[Body] = []
        self.children: dict[int, Body | None] = {}  # live child pid -> body
        self.jobs: list[Job] = []
        # unexpired lease members in Redis, as the model knows them: the
        # delivery each names (in the order they were added)
        self.live: dict[str, dict[str, int]] = {k: {} for k in KEYS}
        self.orphaned: set[tuple[str, str]] = set()  # release died with a child
        self.tokens: dict[str, list[int]] = {k: [] for k in KEYS}
        self.calls: list[Call] = []
        self.sent_by_name: set[str] = set()
        self.published: set[str] = set()
        self.outcomes: dict[str, set[str]] = collections.defaultdict(set)
        self.dropped_onto: dict[str, set[str]] = collections.defaultdict(set)
        self.succeeded: set[str] = set()
        self.revoked: set[str] = set()

    # -- parameters ---------------------------------------------------------

    @initialize(
        lock=st.sampled_from(list(Lock)),
        on_conflict=st.sampled_from(list(OnConflict)),
        on_redis_error=st.sampled_from(list(OnRedisError)),
        max_running=st.sampled_from([1, 2]),
    )
    def parameters(
        self,
        lock: Lock,
        on_conflict: OnConflict,
        on_redis_error: OnRedisError,
        max_running: int,
    ) -> None:
        self.lock, self.on_conflict = lock, on_conflict
        self.on_redis_error, self.max_running = on_redis_error, max_running
        self.ready = True

    # -- the enqueue side (DedupTask.apply_async) ---------------------------

    def _enqueue(
        self,
        key: str,
        task_id: str,
        *,
        workflow: bool,
        republish: bool,
        had_claim: bool,
    ) -> tuple[Publish, ClaimStatus | None, str | None]:
        """One ``apply_async`` of ``task_id``: its decision, the claim's answer
        (None: Redis failed, or the mode claims nothing) and its holder."""
        if not model.wants_claim(self.lock):
            self._publish(Message(task_id, key, True, False, workflow))
            return Publish(True), None, None
        try:
            answer = self.store.claim(key, task_id, TTL)
        except redis.RedisError:
            status, holder = None, None
        else:
            status, holder = answer.status, answer.holder
        STATS[f"claim: {status.name if status is not None else 'redis error'}"] += 1
        decision = model.on_claim(
            status,
            on_conflict=self.on_conflict,
            on_redis_error=self.on_redis_error,
            republish=republish,
            workflow=workflow,
            had_claim=had_claim,
        )
        if decision.publish:
            self._publish(Message(task_id, key, True, decision.claim, workflow))
        return decision, status, holder

    def _publish(self, message: Message) -> None:
        self.queue.append(message)
        self.published.add(message.task_id)

    def _new_id(self) -> str:
        return f"t{next(self.ids)}"

    @precondition(lambda self: len(self.queue) < MAX_QUEUED)
    @rule(key=KEY, how=st.sampled_from(CALLS))
    def call(self, key: str, how: str) -> None:
        """A caller's ``apply_async`` of a new task id (a workflow member's
        with ``how="workflow"``), or an ``app.send_task`` by name, whose
        message carries no celery_dedup header."""
        self._step(f"call ({how})")
        task_id = self._new_id()
        if how == "send_task":
            self.sent_by_name.add(task_id)
            self._publish(Message(task_id, key, False, False, False))
            self.calls.append(Call(task_id, "published"))
            return
        workflow = how == "workflow"
        decision, status, holder = self._enqueue(
            key, task_id, workflow=workflow, republish=False, had_claim=False
        )
        if decision.publish:
            self.calls.append(Call(task_id, "published"))
            return
        if decision.raise_unavailable:
            assert status is None
            self.calls.append(Call(task_id, "raise_unavailable"))
            return
        assert not workflow, "a workflow member is never deduplicated away"
        # a new task id finds the key held by another one
        assert status is ClaimStatus.TAKEN, status
        assert holder is not None and holder != task_id
        assert holder in self.published, f"claim held by unknown task {holder}"
        answer = "raise_duplicate" if decision.raise_duplicate else "duplicate"
        assert decision.raise_duplicate or decision.duplicate
        self.calls.append(Call(task_id, answer, holder))

    # -- the body side (execution.run) ---------------------------------------

    @precondition(lambda self: self.queue)
    @rule(pick=PICK)
    def deliver(self, pick: int) -> None:
        """A worker receives a queued message."""
        self._step("deliver")
        self._deliver(self.queue.pop(pick % len(self.queue)))

    @precondition(lambda self: self.delivered and len(self.queue) < MAX_QUEUED)
    @rule(pick=PICK)
    def redeliver(self, pick: int) -> None:
        """A lost ack: the broker delivers a message again, while its first
        delivery runs or after it ended."""
        self._step("redeliver")
        self.queue.append(self.delivered[pick % len(self.delivered)])

    def _idle_child(self) -> int:
        """The first idle child process (a prefork child runs one body at a
        time and is reused), or a new one."""
        for pid, body in self.children.items():
            if body is None:
                return pid
        pid = next(self.pids)
        self.children[pid] = None
        return pid

    def _deliver(self, message: Message) -> None:
        self.delivered.append(message)
        task_id, key = message.task_id, message.key
        if task_id in self.revoked:
            self._drop_revoked(message)
            return
        pid = self._idle_child()
        number = next(self.deliveries)
        held_by = member(task_id, HOST, pid, None)
        has_claim = message.claim if message.stamped else False
        claim_here = not message.stamped and model.claims_at_execution(
            self.lock, stamped=False, workflow=message.workflow
        )
        live = dict(self.live[key])
        try:
            answer = self.store.acquire(
                key,
                held_by,
                task_id,
                ttl=LOCK_TTL,
                max_running=self.max_running,
                fence_ttl=FENCE_TTL,
                free_claim=self.lock in model.FREED_AT_START,
                claim_ttl=TTL if claim_here else 0,
            )
        except redis.RedisError:
            answer = None
        status = answer.status if answer is not None else None
        STATS[f"acquire: {status.name if status else 'redis error'}"] += 1
        if answer is not None:
            self._check_acquire(answer.status, answer.holder, task_id, live, claim_here)
        act = model.on_acquire(
            status,
            lock=self.lock,
            on_conflict=self.on_conflict,
            on_redis_error=self.on_redis_error,
            workflow=message.workflow,
        )
        STATS[f"act: {act}"] += 1
        if act is Act.RUN:
            assert answer is not None
            earlier = self.tokens[key]
            assert not earlier or answer.token > max(earlier), "token went back"
            earlier.append(answer.token)
            has_claim = (has_claim or answer.took_claim) and (
                self.lock not in model.FREED_AT_START
            )
            fence = answer.token if model.lease_keeps_fence(self.max_running) else None
            self.live[key][held_by] = number
            self._start(
                Body(number, message, pid, held_by, answer.token, fence, has_claim)
            )
        elif act is Act.RUN_UNGUARDED:
            self._start(Body(number, message, pid, "", 0, None, has_claim))
        elif act is Act.RESCHEDULE:
            # execution.reschedule: the same message through apply_async again
            self._enqueue(
                key,
                task_id,
                workflow=message.workflow,
                republish=True,
                had_claim=message.claim,
            )
        else:  # _end_unrun
            assert answer is not None
            if act is Act.DROP_DONE:
                assert task_id in self.succeeded
                self.outcomes[task_id].add("done")
            else:
                assert answer.holder is not None
                self.dropped_onto[task_id].add(answer.holder)
            release = model.on_drop(self.lock, has_claim=has_claim)
            self._free(pid, key, task_id, "", release, None)

    def _check_acquire(
        self,
        status: LeaseStatus,
        holder: str | None,
        task_id: str,
        live: dict[str, int],
        claim_here: bool,
    ) -> None:
        """ACQUIRE's answer agrees with the holders the model knows of."""
        if status is LeaseStatus.DONE:
            assert task_id in self.succeeded
            return
        if status is LeaseStatus.CLAIMED:
            assert claim_here and holder != task_id
            return
        same = any(task_of(m) == task_id for m in live)
        if same:
            assert status is LeaseStatus.SAME_TASK, (status, live)
        elif len(live) >= self.max_running:
            assert status is LeaseStatus.BUSY, (status, live)
            assert holder in {task_of(m) for m in live}
        else:
            assert status is LeaseStatus.ACQUIRED, (status, live)

    def _start(self, body: Body) -> None:
        self.children[body.pid] = body
        self.bodies.append(body)

    @precondition(lambda self: self.bodies)
    @rule(
        pick=PICK,
        ending=st.sampled_from([Ending.SUCCESS, Ending.FAILURE, Ending.RETRY]),
    )
    def body_ends(self, pick: int, ending: Ending) -> None:
        """A body returns, raises, or calls ``self.retry()``."""
        self._step("body_ends")
        self._end(self.bodies.pop(pick % len(self.bodies)), ending)

    def _end(self, body: Body, ending: Ending) -> None:
        """execution._run_body's end and _give_back."""
        message = body.message
        task_id, key = message.task_id, message.key
        if ending is Ending.SUCCESS and body.member and body.lost:
            ending = Ending.FAILURE  # LockLostError
            STATS["LockLostError"] += 1
        STATS[f"ending: {ending}"] += 1
        if ending is Ending.RETRY:
            # self.retry() publishes the retry (same task id), then raises
            self._enqueue(
                key,
                task_id,
                workflow=message.workflow,
                republish=True,
                had_claim=message.claim,
            )
        else:
            if ending is Ending.SUCCESS:
                if task_id in self.succeeded:
                    STATS["a task id succeeded again"] += 1
                self.succeeded.add(task_id)
            self.outcomes[task_id].add(str(ending))
        self.children[body.pid] = None
        release = model.on_end(self.lock, ending, has_claim=body.has_claim)
        self._free(body.pid, key, task_id, body.member, release, body.delivery)

    @precondition(lambda self: self.bodies)
    @rule(pick=PICK, requeued=st.booleans())
    def child_killed(self, pick: int, requeued: bool) -> None:
        """SIGKILL of the child running a body: its lease and its deferred
        work stay behind; the main process frees the lease once the child is
        gone (request._free_dead_child). ``requeued``: acks_late and
        reject_on_worker_lost hand the message back; else it is lost."""
        self._step("child_killed")
        body = self.bodies.pop(pick % len(self.bodies))
        message = body.message
        del self.children[body.pid]
        for job in self.jobs:
            if job.pid == body.pid and job.member in self.live[job.key]:
                self.orphaned.add((job.key, job.member))
        self.jobs = [job for job in self.jobs if job.pid != body.pid]
        ending = Ending.RETRY if requeued else Ending.FAILURE
        # request.delivery_of: what the message's stamp says, nothing learnt
        stamp_claim = message.claim if message.stamped else False
        release = model.on_end(self.lock, ending, has_claim=stamp_claim)
        self._free(
            MAIN_PID,
            message.key,
            message.task_id,
            holder(message.task_id, HOST, body.pid, None),
            release,
            body.delivery,
            background=True,
            by_holder=True,
        )
        if requeued:
            self.queue.append(message)
        else:
            self.outcomes[message.task_id].add("failure")

    @precondition(lambda self: any(b.member and not b.lost for b in self.bodies))
    @rule(pick=PICK)
    def heartbeat(self, pick: int) -> None:
        """The heartbeat renews a body's lease."""
        self._step("heartbeat")
        leased = [b for b in self.bodies if b.member and not b.lost]
        body = leased[pick % len(leased)]
        try:
            renewed = self.store.renew(body.message.key, body.member, LOCK_TTL)
        except redis.RedisError:
            return  # retried until the lease would have expired
        held = self.live[body.message.key].get(body.member) == body.delivery
        assert bool(renewed) == held, (renewed, body)
        STATS[f"renew: {renewed.name}"] += 1
        if not renewed:
            body.lost = True

    # -- the worker's main process and deferred work --------------------------

    def _free(
        self,
        pid: int,
        key: str,
        task_id: str,
        held_by: str,
        release: Release,
        delivery: int | None,
        *,
        background: bool = False,
        by_holder: bool = False,
    ) -> None:
        """execution.free: now, or on ``pid``'s background thread (also when
        Redis fails now: retried until it succeeds)."""
        if not held_by and not release.free_claim and not release.record_done:
            return
        job = Job(pid, key, held_by, task_id, release, delivery, by_holder)
        if background:
            self.jobs.append(job)
            return
        try:
            self._release(job)
        except redis.RedisError:
            STATS["release deferred"] += 1
            self.jobs.append(job)

    def _release(self, job: Job) -> None:
        held = self.store.release(
            job.key,
            job.member,
            job.task_id,
            free_claim=job.release.free_claim,
            done_ttl=DONE_TTL if job.release.record_done else 0,
            by_holder=job.by_holder,
        )
        names = self.observer.names(job.key)
        if job.member:
            live = self.live[job.key]
            freed = [job.member] if job.member in live else []
            if job.by_holder:
                freed = [m for m in live if m.startswith(job.member)]
            for held_by in freed:
                del live[held_by]
                self.orphaned.discard((job.key, held_by))
                assert held, "a live member was not in the lease set"
                running = [b.delivery for b in self.bodies if b.member == held_by]
                assert running in ([], [job.delivery]), "freed another's lease"
        if job.release.free_claim:
            assert self.raw.get(names.claim) != job.task_id.encode()
        if job.release.record_done and (held or not job.member):
            assert self.raw.exists(names.done(job.task_id))

    @precondition(lambda self: self.jobs)
    @rule(pick=PICK)
    def background(self, pick: int) -> None:
        """A background thread runs one deferred release."""
        self._step("background")
        job = self.jobs[pick % len(self.jobs)]
        try:
            self._release(job)
        except redis.RedisError:
            return  # retried a second later
        self.jobs.remove(job)

    def _revocable(self) -> list[Message]:
        return [m for m in self.queue if m.task_id not in self.revoked]

    @precondition(lambda self: self.revokes < MAX_REVOKES and self._revocable())
    @rule(pick=PICK)
    def revoke(self, pick: int) -> None:
        """``result.revoke()`` of a queued task: a DedupResult frees the claim
        at once; the worker drops every message of it it receives."""
        self._step("revoke")
        self.revokes += 1
        revocable = self._revocable()
        message = revocable[pick % len(revocable)]
        task_id = message.task_id
        if model.wants_claim(self.lock) and task_id not in self.sent_by_name:
            try:
                freed = self.store.release_claim(message.key, task_id)
            except redis.RedisError:
                freed = False  # logged; the worker frees it
            STATS[f"revoke freed the claim: {freed}"] += 1
            if freed:
                claim = self.observer.names(message.key).claim
                assert self.raw.get(claim) != task_id.encode()
        self.revoked.add(task_id)

    def _drop_revoked(self, message: Message) -> None:
        """request.on_revoked, in the main process's background thread."""
        STATS["revoked message dropped"] += 1
        self.outcomes[message.task_id].add("revoked")
        if message.stamped and message.claim:
            release = model.on_revoke(has_claim=True)
            job = Job(MAIN_PID, message.key, "", message.task_id, release, None)
            self.jobs.append(job)

    # -- time, the operator and Redis ----------------------------------------

    def _live_members(self) -> list[tuple[str, str]]:
        return [(k, m) for k in KEYS for m in self.live[k]]

    @precondition(lambda self: self._live_members())
    @rule(pick=PICK)
    def lease_expires(self, pick: int) -> None:
        """A lease member's expiry passes (its body stopped renewing, or its
        release never came)."""
        self._step("lease_expires")
        members = self._live_members()
        self._expire(*members[pick % len(members)])

    def _expire(self, key: str, held_by: str) -> None:
        seconds, micros = self.raw.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        names = self.observer.names(key)
        assert self.raw.zadd(names.lease, {held_by: now_ms - 1}, xx=True, ch=True)
        owner = self.live[key].pop(held_by)
        self.orphaned.discard((key, held_by))
        for body in self.bodies:
            if body.delivery == owner:
                body.lost = True  # by its own clock too: Lease.valid

    def _claimed(self) -> list[str]:
        return [k for k in KEYS if self.raw.exists(self.observer.names(k).claim)]

    @precondition(lambda self: self._claimed())
    @rule(pick=PICK)
    def claim_expires(self, pick: int) -> None:
        """A claim's dedup_ttl passes."""
        self._step("claim_expires")
        claimed = self._claimed()
        self._let_expire(self.observer.names(claimed[pick % len(claimed)]).claim)

    def _let_expire(self, name: str) -> None:
        """Give ``name`` 1 ms to live and wait until Redis reports it gone."""
        self.raw.pexpire(name, 1)
        deadline = time.monotonic() + 5
        while self.raw.exists(name):
            assert time.monotonic() < deadline, f"{name} did not expire"
            time.sleep(0.001)

    def _releasable(self) -> list[str]:
        """Keys `celery dedup release` (without --force) would free: held,
        and no running body renews a lease of them."""
        found = []
        for key in KEYS:
            if any(self._leased(b) for b in self.bodies if b.message.key == key):
                continue  # it watches a live lease being renewed, and refuses
            names = self.observer.names(key)
            if self.raw.exists(names.claim, names.lease):
                found.append(key)
        return found

    @precondition(lambda self: self._releasable())
    @rule(pick=PICK)
    def operator_releases(self, pick: int) -> None:
        """``celery dedup release KEY``: the claim and lease set deleted, the
        fence kept."""
        self._step("operator_releases")
        keys = self._releasable()
        key = keys[pick % len(keys)]
        [state] = self.inspector.read([key])
        released, _ = self.inspector.release(state, force=False)
        assert released  # nothing changed since the read
        self.live[key].clear()
        self.orphaned = {(k, m) for k, m in self.orphaned if k != key}

    @precondition(lambda self: not self.flaky.armed and self.errors < MAX_ERRORS)
    @rule()
    def redis_fails(self) -> None:
        """The next Redis call of a publisher or worker fails."""
        self._step("redis_fails")
        self.errors += 1
        self.flaky.armed = True

    # -- invariants ---------------------------------------------------------------

    def _step(self, name: str) -> None:
        self.steps += 1
        STATS[f"rule: {name}"] += 1

    def _leased(self, body: Body) -> bool:
        """Whether ``body`` runs under a live lease (Redis's view)."""
        return bool(body.member) and (
            self.live[body.message.key].get(body.member) == body.delivery
        )

    @invariant()
    def leases(self) -> None:
        """(1) and (2): capacity, one delivery per task id, a valid lease is
        held, tokens increase and the live holder has the newest."""
        now_and_sets = self.observer.read(list(KEYS))
        for key, reply in zip(KEYS, now_and_sets, strict=True):
            now, flat = int(reply[0]), reply[3]
            members = {
                m.decode(): float(s) for m, s in zip(flat[::2], flat[1::2], strict=True)
            }
            assert len(members) <= self.max_running, members
            live = {m for m, expiry in members.items() if expiry > now}
            assert live == set(self.live[key]), (live, self.live[key])
            # The bodies under a lease, as they see it (Lease.valid, what
            # dedup_lease_valid() says): until it expired or a renewal failed.
            leased = [b for b in self.bodies if b.message.key == key and b.member]
            leased = [b for b in leased if not b.lost]
            assert len(leased) <= self.max_running, leased
            tasks = [b.message.task_id for b in leased]
            assert len(set(tasks)) == len(tasks), "two deliveries of one task run"
            tokens = self.tokens[key]
            assert all(a < b for a, b in itertools.pairwise(tokens)), tokens
            for body in leased:
                assert self.live[key].get(body.member) == body.delivery, (
                    f"delivery {body.delivery} of {body.message.task_id} runs with "
                    f"a valid lease that Redis no longer holds: {self.live[key]}"
                )
                if body.fence is not None:
                    assert body.fence == tokens[-1], "a live holder's fence is stale"

    @invariant()
    def stored_keys(self) -> None:
        """(5) completion markers only for successes; every key has a TTL."""
        names = self.raw.keys(f"{PREFIX}:*")
        pipe = self.raw.pipeline(transaction=False)
        for name in names:
            pipe.pttl(name)
        for name, pttl in zip(names, pipe.execute(), strict=True):
            parsed = self.observer.layout.parse(name)
            assert parsed is not None and parsed[0] in KEYS, name
            part = parsed[1]
            if part.startswith(DONE_PART):
                task_id = part.removeprefix(DONE_PART)
                assert task_id in self.succeeded, f"{task_id} done, never succeeded"
                part = DONE_PART
            assert 0 < pttl <= TTL_BOUND_MS[part], (name, pttl)

    @invariant()
    def refused_calls_published_nothing(self) -> None:
        """(3), for the calls that raised."""
        for call in self.calls:
            if call.answer.startswith("raise_"):
                assert call.task_id not in self.published

    # -- the end ---------------------------------------------------------------------

    def teardown(self) -> None:
        if not self.ready or sys.exc_info()[0] is not None:
            # A step failed (report that, not a drain after it), or Hypothesis
            # stopped a run that it discards (StopTest).
            STATS["runs cut short"] += 1
            STATS["steps in runs cut short"] += self.steps
            return
        self.flaky.armed = False
        self._drain()
        self.leases()
        self.stored_keys()
        self.refused_calls_published_nothing()
        self._nothing_lost()
        self._keys_free()
        STATS["examples"] += 1
        STATS["steps"] += self.steps
        STATS[f"lock={self.lock}"] += 1
        STATS[f"max_running={self.max_running}"] += 1
        STATS[f"on_conflict={self.on_conflict}"] += 1
        STATS[f"on_redis_error={self.on_redis_error}"] += 1

    def _drain(self) -> None:
        """Deliver everything queued, end every body with success, run every
        deferred release; a lease whose release died with its process expires."""
        for _ in range(DRAIN_LIMIT):
            if self.bodies:
                self._end(self.bodies.pop(0), Ending.SUCCESS)
            elif self.jobs:
                self._release(self.jobs.pop(0))
            elif self._live_members():
                for key, held_by in self._live_members():
                    assert (key, held_by) in self.orphaned, (key, held_by)
                    self._expire(key, held_by)
                    STATS["orphaned lease expired at the end"] += 1
            elif self.queue:
                self._deliver(self.queue.pop(0))
            else:
                return
        raise AssertionError("the drain did not converge")

    def _settled(self, task_id: str, seen: frozenset[str] = frozenset()) -> bool:
        """Whether ``task_id`` ran its body to an end (or found it had), was
        revoked, or was dropped as a duplicate of a task that settled."""
        if task_id in seen:
            return False
        if self.outcomes[task_id] & {"success", "failure", "done", "revoked"}:
            return True
        return any(
            self._settled(holder, seen | {task_id})
            for holder in self.dropped_onto[task_id]
        )

    def _nothing_lost(self) -> None:
        """(3): every published call settled; a deduplicated one names a
        holder that did; a refused one published nothing."""
        for call in self.calls:
            if call.answer == "published":
                assert self._settled(call.task_id), (call, self.outcomes)
            elif call.answer == "duplicate":
                assert call.holder is not None
                assert self._settled(call.holder), (call, self.outcomes)
            else:
                assert call.task_id not in self.published

    def _keys_free(self) -> None:
        """(4): no lease is left live; once the TTLs pass no claim or lease
        key is left, and the key is claimed and leased anew."""
        for key in KEYS:
            names = self.observer.names(key)
            for name in (names.claim, names.lease):
                if self.raw.exists(name):
                    STATS[f"left until its TTL: {name.rsplit(':', 1)[1]}"] += 1
                    self._let_expire(name)
            assert not self.raw.exists(names.claim, names.lease)
            fresh = self._new_id()
            assert self.observer.claim(key, fresh, TTL).status is ClaimStatus.NEW
            held_by = member(fresh, HOST, next(self.pids), None)
            answer = self.observer.acquire(
                key,
                held_by,
                fresh,
                ttl=LOCK_TTL,
                max_running=1,
                fence_ttl=FENCE_TTL,
                free_claim=False,
            )
            assert answer.status is LeaseStatus.ACQUIRED
            tokens = self.tokens[key]
            assert not tokens or answer.token > tokens[-1], "token went back"
            assert self.observer.release(
                key, held_by, fresh, free_claim=True, done_ttl=0
            )
            assert not self.raw.exists(names.claim, names.lease)


def test_protocol(redis_client: redis.Redis) -> None:
    STATS.clear()

    def machine() -> ProtocolMachine:
        return ProtocolMachine(redis_client)

    started = time.monotonic()
    try:
        run_state_machine_as_test(machine, settings=SETTINGS)  # type: ignore[no-untyped-call]
    finally:
        print(_report(time.monotonic() - started))
    assert STATS["examples"] >= SETTINGS.max_examples


def test_a_late_release_never_frees_a_later_deliverys_lease(
    redis_client: redis.Redis,
) -> None:
    """Found by ``test_protocol``: a body's release fails and is retried in
    the background; its lease expires meanwhile and the task's retry takes the
    key in the same child. The late release must free its own lease only, not
    the retry's (then a third delivery could run beside the retry)."""
    machine = ProtocolMachine(redis_client)
    machine.parameters(Lock.WHILE_EXECUTING, OnConflict.SKIP, OnRedisError.RAISE, 1)
    steps = [
        lambda: machine.call(KEYS[0], "apply_async"),
        lambda: machine.deliver(0),
        machine.redis_fails,  # the release at the body's end fails
        lambda: machine.body_ends(0, Ending.RETRY),
        lambda: machine.lease_expires(0),
        lambda: machine.deliver(0),  # the retry, in the same child
        lambda: machine.background(0),  # the late release
    ]
    for step in steps:
        step()
        machine.leases()
        machine.stored_keys()
    (retry,) = machine.bodies
    assert machine.store.renew(KEYS[0], retry.member, LOCK_TTL), "its lease is gone"
    machine.teardown()
    assert STATS["examples"] >= 1


def _report(seconds: float) -> str:
    lines = [
        f"protocol state machine: {STATS['examples']} examples, "
        f"{STATS['steps']} steps ({STATS['runs cut short']} runs cut short) "
        f"in {seconds:.1f}s"
    ]
    lines += [f"  {name}: {count}" for name, count in sorted(STATS.items())]
    return "\n".join(lines)
