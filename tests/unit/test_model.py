"""The decision model, cell by cell: every mode x every answer x every ending."""

from __future__ import annotations

import itertools

import pytest

from celery_dedup import model
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

ANSWERS = [None, *ClaimStatus]


def claim(
    answer: ClaimStatus | None,
    *,
    rule: OnConflict = OnConflict.SKIP,
    on_error: OnRedisError = OnRedisError.RAISE,
    republish: bool = False,
    workflow: bool = False,
    had_claim: bool = False,
) -> Publish:
    return model.on_claim(
        answer,
        on_conflict=rule,
        on_redis_error=on_error,
        republish=republish,
        workflow=workflow,
        had_claim=had_claim,
    )


# -- enqueue -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "rule", "expected"),
    [
        (ClaimStatus.NEW, OnConflict.SKIP, Publish(True, claim=True)),
        (ClaimStatus.NEW, OnConflict.RAISE, Publish(True, claim=True)),
        (ClaimStatus.TAKEN, OnConflict.SKIP, Publish(False, duplicate=True)),
        (ClaimStatus.TAKEN, OnConflict.RESCHEDULE, Publish(False, duplicate=True)),
        (ClaimStatus.TAKEN, OnConflict.RAISE, Publish(False, raise_duplicate=True)),
        # The same task id sent twice (deterministic ids), or already done.
        (ClaimStatus.OWN, OnConflict.SKIP, Publish(False, duplicate=True)),
        (ClaimStatus.DONE, OnConflict.SKIP, Publish(False, duplicate=True)),
        (ClaimStatus.DONE, OnConflict.RAISE, Publish(False, raise_duplicate=True)),
    ],
)
def test_a_plain_call(answer: ClaimStatus, rule: OnConflict, expected: Publish) -> None:
    assert claim(answer, rule=rule) == expected


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("rule", list(OnConflict))
@pytest.mark.parametrize("on_error", list(OnRedisError))
@pytest.mark.parametrize("had_claim", [False, True])
def test_a_republish_is_always_published(
    answer: ClaimStatus | None,
    rule: OnConflict,
    on_error: OnRedisError,
    had_claim: bool,
) -> None:
    # A retry, a reschedule, retry_on_worker_lost, self.replace by this task.
    got = claim(
        answer, rule=rule, on_error=on_error, republish=True, had_claim=had_claim
    )
    assert got.publish
    holds = answer in (ClaimStatus.NEW, ClaimStatus.OWN) or (
        answer is None and had_claim
    )
    assert got.claim is holds


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("rule", list(OnConflict))
def test_a_workflow_member_is_published_and_claims_only_a_free_key(
    answer: ClaimStatus | None, rule: OnConflict
) -> None:
    got = claim(answer, rule=rule, on_error=OnRedisError.PROCEED, workflow=True)
    assert got.publish
    assert got.claim is (answer in (ClaimStatus.NEW, ClaimStatus.OWN))


def test_redis_down_at_enqueue() -> None:
    assert claim(None) == Publish(False, raise_unavailable=True)
    assert claim(None, on_error=OnRedisError.PROCEED) == Publish(True)


def test_while_executing_takes_no_claim() -> None:
    assert [lock for lock in Lock if not model.wants_claim(lock)] == [
        Lock.WHILE_EXECUTING
    ]


def test_workflow_options() -> None:
    assert not model.is_workflow_call({"countdown": 3, "queue": "q"})
    assert not model.is_workflow_call({"group_id": None, "link": []})
    for name in model.WORKFLOW_OPTIONS:
        assert model.is_workflow_call({name: "x"})


# -- execution ---------------------------------------------------------------


def acquire(
    answer: LeaseStatus | None,
    lock: Lock = Lock.UNTIL_EXECUTED,
    rule: OnConflict = OnConflict.SKIP,
    on_error: OnRedisError = OnRedisError.RAISE,
    workflow: bool = False,
) -> Act:
    return model.on_acquire(
        answer,
        lock=lock,
        on_conflict=rule,
        on_redis_error=on_error,
        workflow=workflow,
    )


def expected_act(
    answer: LeaseStatus | None,
    lock: Lock,
    rule: OnConflict,
    on_error: OnRedisError,
    workflow: bool,
) -> Act:
    """The rules of DESIGN.md, written out independently of the model."""
    if answer is None:
        return Act.RESCHEDULE if on_error is OnRedisError.RAISE else Act.RUN_UNGUARDED
    if answer is LeaseStatus.ACQUIRED:
        return Act.RUN
    if answer is LeaseStatus.DONE:
        return Act.DROP_DONE
    if answer is LeaseStatus.SAME_TASK:
        return Act.RESCHEDULE  # never dropped: it may be the last copy
    waits = workflow or lock is Lock.UNTIL_AND_WHILE_EXECUTING
    if rule is OnConflict.RAISE:
        return Act.RAISE_DUPLICATE
    if answer is LeaseStatus.CLAIMED:
        return Act.DROP_DUPLICATE  # the idempotency window holds
    if rule is OnConflict.RESCHEDULE or waits:
        return Act.RESCHEDULE
    return Act.DROP_DUPLICATE


@pytest.mark.parametrize(
    ("answer", "lock", "rule", "on_error", "workflow"),
    list(
        itertools.product(
            [None, *LeaseStatus],
            list(Lock),
            list(OnConflict),
            list(OnRedisError),
            [False, True],
        )
    ),
)
def test_every_delivery(
    answer: LeaseStatus | None,
    lock: Lock,
    rule: OnConflict,
    on_error: OnRedisError,
    workflow: bool,
) -> None:
    got = acquire(answer, lock, rule, on_error, workflow)
    assert got is expected_act(answer, lock, rule, on_error, workflow)


def test_a_workflow_member_is_never_dropped_as_a_duplicate() -> None:
    for lock, answer in itertools.product(Lock, (LeaseStatus.BUSY,)):
        assert acquire(answer, lock, workflow=True) is Act.RESCHEDULE


def test_an_idempotency_claim_is_taken_at_execution_only_for_unstamped() -> None:
    assert model.claims_at_execution(Lock.UNTIL_EXPIRED, stamped=False, workflow=False)
    assert not model.claims_at_execution(
        Lock.UNTIL_EXPIRED, stamped=True, workflow=False
    )
    assert not model.claims_at_execution(
        Lock.UNTIL_EXPIRED, stamped=False, workflow=True
    )
    for lock in set(Lock) - {Lock.UNTIL_EXPIRED}:
        assert not model.claims_at_execution(lock, stamped=False, workflow=False)


# -- ends --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lock", "ending", "expected"),
    [
        (Lock.UNTIL_EXECUTED, Ending.SUCCESS, Release(True, True)),
        (Lock.UNTIL_EXECUTED, Ending.FAILURE, Release(True, False)),
        (Lock.UNTIL_EXECUTED, Ending.IGNORED, Release(True, False)),
        (Lock.UNTIL_EXECUTED, Ending.RETRY, Release(False, False)),
        (Lock.UNTIL_EXECUTED, Ending.HANDED_OVER, Release(False, False)),
        # An idempotency key lasts its window, unless the work failed for good.
        (Lock.UNTIL_EXPIRED, Ending.SUCCESS, Release(False, True)),
        (Lock.UNTIL_EXPIRED, Ending.IGNORED, Release(False, False)),
        (Lock.UNTIL_EXPIRED, Ending.FAILURE, Release(True, False)),
        (Lock.UNTIL_EXPIRED, Ending.RETRY, Release(False, False)),
        # A body that ran unguarded (Redis down at start) still holds it.
        (Lock.UNTIL_EXECUTING, Ending.SUCCESS, Release(True, True)),
        (Lock.UNTIL_AND_WHILE_EXECUTING, Ending.FAILURE, Release(True, False)),
    ],
)
def test_a_body_that_holds_the_claim_ends(
    lock: Lock, ending: Ending, expected: Release
) -> None:
    assert model.on_end(lock, ending, has_claim=True) == expected


@pytest.mark.parametrize("lock", list(Lock))
@pytest.mark.parametrize("ending", list(Ending))
def test_a_body_without_the_claim_frees_none_and_records_only_success(
    lock: Lock, ending: Ending
) -> None:
    got = model.on_end(lock, ending, has_claim=False)
    assert not got.free_claim
    assert got.record_done is (ending is Ending.SUCCESS)


@pytest.mark.parametrize("lock", list(Lock))
@pytest.mark.parametrize("ending", list(Ending))
@pytest.mark.parametrize("has_claim", [False, True])
def test_completion_is_recorded_only_for_a_success(
    lock: Lock, ending: Ending, has_claim: bool
) -> None:
    assert model.on_end(lock, ending, has_claim=has_claim).record_done is (
        ending is Ending.SUCCESS
    )


@pytest.mark.parametrize("lock", list(Lock))
def test_a_dropped_delivery_keeps_an_idempotency_window(lock: Lock) -> None:
    got = model.on_drop(lock, has_claim=True)
    assert got.free_claim is (lock is not Lock.UNTIL_EXPIRED)
    assert not got.record_done
    assert model.on_drop(lock, has_claim=False) == Release()


def test_a_revoke_frees_the_claim_in_every_mode() -> None:
    assert model.on_revoke(has_claim=True) == Release(free_claim=True)
    assert model.on_revoke(has_claim=False) == Release()


def test_fencing_is_defined_for_one_holder() -> None:
    assert model.lease_keeps_fence(1)
    assert not model.lease_keeps_fence(2)
