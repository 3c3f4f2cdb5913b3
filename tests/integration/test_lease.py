"""The lease scripts against a real Redis: tokens, capacity, renewal, release."""

from __future__ import annotations

import time

import pytest
import redis

from celery_dedup import lease as leases
from celery_dedup.keys import redis_key

pytestmark = pytest.mark.integration


@pytest.fixture
def scripts(redis_client: redis.Redis) -> leases.Leases:
    return leases.Leases(redis_client, redis_client)


def names(key: str, task_id: str) -> tuple[str, str, str, str]:
    return (
        redis_key("dedup", key, "lease"),
        redis_key("dedup", key, "fence"),
        redis_key("dedup", key, f"done:{task_id}"),
        redis_key("dedup", key, "claim"),
    )


def acquire(
    scripts: leases.Leases,
    task_id: str,
    *,
    key: str = "k",
    ttl: float = 10,
    max_running: int = 1,
    member: str | None = None,
) -> leases.Outcome:
    return scripts.acquire(
        names(key, task_id),
        member or leases.member(task_id, "h", 1, None),
        ttl,
        max_running,
        60,
        False,
    )


def release(
    scripts: leases.Leases, task_id: str, *, key: str = "k", done: float = 0
) -> bool:
    lease_set, _, done_key, claim = names(key, task_id)
    return scripts.release(
        (lease_set, claim, done_key),
        leases.member(task_id, "h", 1, None),
        task_id,
        True,
        done,
    )


def test_tokens_strictly_increase_across_expiry_and_a_lost_counter(
    scripts: leases.Leases, redis_client: redis.Redis
) -> None:
    tokens = []
    first = acquire(scripts, "a", ttl=0.05)
    tokens.append(first.token)
    time.sleep(0.1)  # the lease expires unreleased
    second = acquire(scripts, "b")
    assert second.status == leases.ACQUIRED
    tokens.append(second.token)
    release(scripts, "b")
    redis_client.delete(redis_key("dedup", "k", "fence"))  # a restart lost it
    tokens.append(acquire(scripts, "c").token)
    release(scripts, "c")
    tokens += [acquire(scripts, t).token for t in ("d",)]
    assert tokens == sorted(set(tokens))
    assert all(isinstance(t, int) and t < 2**53 for t in tokens)


def test_one_holder_at_a_time_and_the_holder_is_named(scripts: leases.Leases) -> None:
    assert acquire(scripts, "a").status == leases.ACQUIRED
    busy = acquire(scripts, "b")
    assert busy.status == leases.BUSY
    assert busy.holder == "a"
    assert 9 < busy.wait <= 10
    assert release(scripts, "a")
    assert acquire(scripts, "b").status == leases.ACQUIRED


def test_max_running_admits_that_many(scripts: leases.Leases) -> None:
    got = [acquire(scripts, t, max_running=2).status for t in "abc"]
    assert got == [leases.ACQUIRED, leases.ACQUIRED, leases.BUSY]


def test_another_delivery_of_the_same_task_is_told_apart(
    scripts: leases.Leases,
) -> None:
    first = leases.member("a", "h", 1, None)
    assert acquire(scripts, "a", member=first, max_running=5).status == 1
    same = acquire(scripts, "a", member=leases.member("a", "h", 2, 7), max_running=5)
    assert same.status == leases.SAME_TASK
    assert same.holder == "a"
    # task ids may hold the separator: "a|h" is not a delivery of "a"
    other = acquire(
        scripts, "a|h", member=leases.member("a|h", "h", 3, None), max_running=5
    )
    assert other.status == leases.ACQUIRED


def test_completion_is_remembered_only_for_a_held_lease(
    scripts: leases.Leases,
) -> None:
    acquire(scripts, "a")
    assert release(scripts, "a", done=60)
    assert acquire(scripts, "a").status == leases.DONE
    # a release by an execution that no longer held the lease records nothing
    assert not release(scripts, "z", done=60)
    assert acquire(scripts, "z").status == leases.ACQUIRED


def test_release_is_owner_checked(scripts: leases.Leases) -> None:
    acquire(scripts, "a")
    assert not release(scripts, "b")
    assert acquire(scripts, "c").status == leases.BUSY


def test_renewal_replaces_the_ttl_and_fails_for_a_lost_lease(
    scripts: leases.Leases, redis_client: redis.Redis
) -> None:
    outcome = acquire(scripts, "a", ttl=0.3)
    held_by = leases.member("a", "h", 1, None)
    lease = leases.Lease(
        "k", names("k", "a")[0], held_by, outcome.token, 5, time.monotonic()
    )
    assert scripts.renew(lease)  # now 5 s, not 0.3 + 5
    score = redis_client.zscore(names("k", "a")[0], held_by)
    now_ms = int(redis_client.time()[0]) * 1000
    assert score is not None
    assert 3000 < score - now_ms <= 6000
    redis_client.delete(names("k", "a")[0])
    assert not scripts.renew(lease)


def test_acquire_can_free_the_claim_of_its_own_task(
    scripts: leases.Leases, redis_client: redis.Redis
) -> None:
    claim = redis_key("dedup", "k", "claim")
    redis_client.set(claim, "a")
    scripts.acquire(names("k", "a"), leases.member("a", "h", 1, None), 10, 1, 60, True)
    assert redis_client.get(claim) is None
    redis_client.set(claim, "other")
    release(scripts, "a")
    scripts.acquire(names("k", "b"), leases.member("b", "h", 1, None), 10, 1, 60, True)
    assert redis_client.get(claim) == b"other"


def test_the_heartbeat_keeps_a_lease_and_reports_a_lost_one(
    scripts: leases.Leases, redis_client: redis.Redis
) -> None:
    from celery_dedup import signals

    lost: list[dict[str, object]] = []

    def on_lost(**kwargs: object) -> None:
        lost.append(kwargs)

    signals.lease_lost.connect(on_lost, weak=False)
    try:
        outcome = acquire(scripts, "a", ttl=0.6)
        held_by = leases.member("a", "h", 1, None)
        lease = leases.Lease(
            "k", names("k", "a")[0], held_by, outcome.token, 0.6, time.monotonic()
        )
        scripts.watch(lease)
        time.sleep(1.5)  # 2.5 TTLs: kept alive by renewals
        assert lease.valid
        assert acquire(scripts, "b").status == leases.BUSY
        redis_client.delete(names("k", "a")[0])  # someone freed it by force
        deadline = time.monotonic() + 3
        while lease.valid and time.monotonic() < deadline:
            time.sleep(0.05)
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
        scripts.unwatch(lease)
    finally:
        signals.lease_lost.disconnect(on_lost)
