"""The lease scripts against a real Redis: tokens, capacity, renewal, release."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from celery_dedup import lease as leases
from celery_dedup.model import LeaseStatus, Renewal
from celery_dedup.store import Acquired, Store
from tests.rig import wait_for

pytestmark = pytest.mark.integration

ACQUIRED, DONE, SAME_TASK, BUSY = (
    LeaseStatus.ACQUIRED,
    LeaseStatus.DONE,
    LeaseStatus.SAME_TASK,
    LeaseStatus.BUSY,
)


@pytest.fixture
def scripts(redis_client: redis.Redis) -> Store:
    return Store(redis_client, "dedup")


#: The member each (key, task id) last acquired with, for release().
MEMBERS: dict[tuple[str, str], str] = {}


def acquire(
    scripts: Store,
    task_id: str,
    *,
    key: str = "k",
    ttl: float = 10,
    max_running: int = 1,
    member: str | None = None,
    free_claim: bool = False,
) -> Acquired:
    member = member or leases.member(task_id, "h", 1, None)
    MEMBERS[key, task_id] = member
    return scripts.acquire(
        key,
        member,
        task_id,
        ttl=ttl,
        max_running=max_running,
        fence_ttl=60,
        free_claim=free_claim,
    )


def release(scripts: Store, task_id: str, *, key: str = "k", done: float = 0) -> bool:
    return scripts.release(
        key,
        MEMBERS.get((key, task_id)) or leases.member(task_id, "h", 1, None),
        task_id,
        free_claim=True,
        done_ttl=done,
    )


def test_tokens_strictly_increase_across_expiry_and_a_lost_counter(
    scripts: Store, redis_client: redis.Redis
) -> None:
    tokens = []
    first = acquire(scripts, "a", ttl=0.05)
    tokens.append(first.token)
    time.sleep(0.1)  # the lease expires unreleased
    second = acquire(scripts, "b")
    assert second.status == ACQUIRED
    tokens.append(second.token)
    release(scripts, "b")
    redis_client.delete(scripts.names("k").fence)  # a restart lost it
    tokens.append(acquire(scripts, "c").token)
    release(scripts, "c")
    tokens += [acquire(scripts, t).token for t in ("d",)]
    assert tokens == sorted(set(tokens))
    assert all(isinstance(t, int) and t < 2**53 for t in tokens)


def test_one_holder_at_a_time_and_the_holder_is_named(scripts: Store) -> None:
    assert acquire(scripts, "a").status == ACQUIRED
    busy = acquire(scripts, "b")
    assert busy.status == BUSY
    assert busy.holder == "a"
    assert 9 < busy.wait <= 10
    assert release(scripts, "a")
    assert acquire(scripts, "b").status == ACQUIRED


def test_max_running_admits_that_many(scripts: Store) -> None:
    got = [acquire(scripts, t, max_running=2).status for t in "abc"]
    assert got == [ACQUIRED, ACQUIRED, BUSY]


def test_another_delivery_of_the_same_task_is_told_apart(
    scripts: Store,
) -> None:
    first = leases.member("a", "h", 1, None)
    assert acquire(scripts, "a", member=first, max_running=5).status == 1
    same = acquire(scripts, "a", member=leases.member("a", "h", 2, 7), max_running=5)
    assert same.status == SAME_TASK
    assert same.holder == "a"
    # task ids may hold the separator: "a|h" is not a delivery of "a"
    other = acquire(
        scripts, "a|h", member=leases.member("a|h", "h", 3, None), max_running=5
    )
    assert other.status == ACQUIRED


def test_completion_is_remembered_only_for_a_held_lease(
    scripts: Store,
) -> None:
    acquire(scripts, "a")
    assert release(scripts, "a", done=60)
    assert acquire(scripts, "a").status == DONE
    # a release by an execution that no longer held the lease records nothing
    assert not release(scripts, "z", done=60)
    assert acquire(scripts, "z").status == ACQUIRED


def test_release_is_owner_checked(scripts: Store) -> None:
    acquire(scripts, "a")
    assert not release(scripts, "b")
    assert acquire(scripts, "c").status == BUSY


def test_renewal_replaces_the_ttl_and_fails_for_a_lost_lease(
    scripts: Store, redis_client: redis.Redis
) -> None:
    held_by = leases.member("a", "h", 1, None)
    outcome = acquire(scripts, "a", ttl=0.3, member=held_by)
    assert outcome.status == ACQUIRED
    assert scripts.renew("k", held_by, 5)  # now 5 s, not 0.3 + 5
    score = redis_client.zscore(scripts.names("k").lease, held_by)
    now_ms = int(redis_client.time()[0]) * 1000
    assert score is not None
    assert 3000 < score - now_ms <= 6000
    redis_client.delete(scripts.names("k").lease)
    assert not scripts.renew("k", held_by, 5)


def test_acquire_can_free_the_claim_of_its_own_task(
    scripts: Store, redis_client: redis.Redis
) -> None:
    claim = scripts.names("k").claim
    redis_client.set(claim, "a")
    acquire(scripts, "a", free_claim=True)
    assert redis_client.get(claim) is None
    redis_client.set(claim, "other")
    release(scripts, "a")
    acquire(scripts, "b", free_claim=True)
    assert redis_client.get(claim) == b"other"


def test_the_heartbeat_keeps_a_lease_and_reports_a_lost_one(
    scripts: Store, redis_client: redis.Redis
) -> None:
    from celery_dedup import signals

    lost: list[dict[str, object]] = []

    def on_lost(**kwargs: object) -> None:
        lost.append(kwargs)

    signals.lease_lost.connect(on_lost, weak=False)
    try:
        held_by = leases.member("a", "h", 1, None)
        outcome = acquire(scripts, "a", ttl=0.6, member=held_by)
        lease = leases.Lease("k", held_by, outcome.token, 0.6, time.monotonic())
        heartbeat = leases.Heartbeat(
            lambda held: scripts.renew(held.key, held.member, held.ttl)
        )
        heartbeat.watch(lease)
        time.sleep(1.5)  # 2.5 TTLs: kept alive by renewals
        assert lease.valid
        assert acquire(scripts, "b").status == BUSY
        redis_client.delete(scripts.names("k").lease)  # someone freed it by force
        # (its own clock may say so first, on a loaded machine: wait for the signal)
        wait_for(lambda: lost, 3, "lease_lost")
        assert not lease.valid
        assert lost == [
            {
                "signal": signals.lease_lost,
                "sender": None,
                "key": "k",
                "task_id": "a",
                "reason": lost[0]["reason"],
            }
        ]
        heartbeat.unwatch(lease)
    finally:
        signals.lease_lost.disconnect(on_lost)


def test_a_lease_given_back_while_a_renewal_is_in_flight_is_not_lost(
    scripts: Store,
) -> None:
    # Given a renewal that reaches Redis only after the body gave the lease back
    from celery_dedup import signals

    lost: list[object] = []

    def on_lost(**kwargs: object) -> None:
        lost.append(kwargs)

    signals.lease_lost.connect(on_lost, weak=False)
    in_flight, body_done = threading.Event(), threading.Event()

    def renew(held: leases.Lease) -> bool:
        in_flight.set()
        body_done.wait(5)
        return scripts.renew(held.key, held.member, held.ttl)  # finds no member

    try:
        held_by = leases.member("a", "h", 1, None)
        outcome = acquire(scripts, "a", ttl=0.3, member=held_by)
        lease = leases.Lease("k", held_by, outcome.token, 0.3, time.monotonic())
        heartbeat = leases.Heartbeat(renew)
        heartbeat.watch(lease)
        assert in_flight.wait(5)
        # When the body ends meanwhile: unwatch, then release
        heartbeat.unwatch(lease)
        assert release(scripts, "a")
        body_done.set()
        time.sleep(0.3)
        # Then the renewal's "not held" is no loss: the body gave it back
        assert lost == []
        assert lease.lost_reason is None or "expired" in lease.lost_reason
    finally:
        signals.lease_lost.disconnect(on_lost)


def test_deferred_work_runs_off_the_callers_thread_and_is_flushed_at_exit(
    scripts: Store, redis_client: redis.Redis
) -> None:
    heartbeat = leases.Heartbeat(lambda held: True)
    claim = scripts.names("k").claim
    redis_client.set(claim, "a")
    # Given a release that blocks (a slow Redis): the caller does not wait
    gate = threading.Event()
    heartbeat.later(
        lambda: gate.wait(5) and scripts.release_claim("k", "a"),
        time.monotonic() + 10,
    )
    assert redis_client.get(claim) == b"a"  # not done yet, and we are here
    gate.set()
    wait_for(lambda: redis_client.get(claim) is None, 5, "the background release")
    # And a release that failed (Redis down) is still done when the process
    # exits: flush runs it, retrying until it succeeds
    redis_client.set(claim, "b")
    failures = [redis.ConnectionError("down"), redis.ConnectionError("down")]

    def flaky() -> bool:
        if failures:
            raise failures.pop()
        return scripts.release_claim("k", "b")

    heartbeat.later(flaky, time.monotonic() + 60, delay=30)  # not due before exit
    assert heartbeat.flush(5) == 0
    assert redis_client.get(claim) is None
    # A job whose moment never came (a revoke not seen) is dropped, not waited on
    heartbeat.later(lambda: None, time.monotonic() + 60, ready=lambda: False)
    started = time.monotonic()
    assert heartbeat.flush(5) == 0
    assert time.monotonic() - started < 4  # well inside its 5 s


def test_a_lease_is_valid_only_while_redis_holds_it(
    scripts: Store, redis_client: redis.Redis
) -> None:
    """``Lease.valid`` never outlasts Redis's own expiry: ACQUIRE purges a
    member once Redis's clock in whole ms (rounded down) reaches its score."""
    late = []
    for n in range(20):
        held_by = leases.member(f"t{n}", "worker", 1, None)
        asked_at = time.monotonic()
        got = acquire(scripts, f"t{n}", ttl=0.03, max_running=100, member=held_by)
        lease = leases.Lease("k", held_by, got.token, 0.03, asked_at)
        expiry = redis_client.zscore(scripts.names("k").lease, held_by)
        assert expiry is not None
        while True:
            seconds, micros = redis_client.time()
            now = seconds * 1000 + micros // 1000  # as the scripts count it
            if not lease.valid:  # read after Redis's clock: valid then too
                break
            if now >= expiry:
                late.append(f"t{n}: Redis expired it at {now}, still valid")
                break
    assert not late, late


def test_a_renewal_says_why_a_lease_is_gone(
    scripts: Store, redis_client: redis.Redis
) -> None:
    names = scripts.names("k")
    held_by = leases.member("a", "h", 1, None)
    acquire(scripts, "a", ttl=5, member=held_by)
    # A renewal keeps the fence at least as long as the lease
    redis_client.pexpire(names.fence, 100)
    assert scripts.renew("k", held_by, 5) is Renewal.RENEWED
    assert redis_client.pttl(names.fence) > 4000
    # Freed by force (`dedup release --force` keeps the fence): lost
    redis_client.delete(names.lease)
    lost = scripts.renew("k", held_by, 5)
    assert lost is Renewal.LOST and not lost
    assert "another execution holds the key" in lost.reason
    # Gone with the fence, as when Redis restarts without persistence
    held_by = leases.member("a", "h", 1, None)
    acquire(scripts, "a", ttl=5, member=held_by)
    redis_client.flushdb()
    vanished = scripts.renew("k", held_by, 5)
    assert vanished is Renewal.VANISHED and not vanished
    assert "Redis lost its data" in vanished.reason
