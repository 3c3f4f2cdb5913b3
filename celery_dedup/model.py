"""Every dedup decision, as pure functions of what is known: no I/O.

The adapters (:mod:`celery_dedup.task` at enqueue and in the body,
:mod:`celery_dedup.request` in the worker's main process and
:mod:`celery_dedup.hooks` around a publish) ask Redis (through
:mod:`celery_dedup.store`), pass its answer here, and do what comes back.
The rules are therefore a table, and ``tests/unit/test_model.py`` checks it
cell by cell.

Three moments decide everything:

- **at enqueue** (:func:`on_claim`): publish or not, and whether the message
  holds the key's claim;
- **at execution** (:func:`on_acquire`): run the body, drop the delivery,
  raise, or reschedule it;
- **when a body or a delivery ends** (:func:`on_end`, for a body that ran;
  :func:`on_drop`, for one that did not): which keys to free and whether to
  remember success.

Two kinds of call never lose their message to deduplication: a
*republish* (the same task id published again: ``self.retry``,
``retry_on_worker_lost``, ``self.replace`` with the same key, a reschedule),
and a *workflow member* (a chain, group or chord member, or a call with
``link`` / ``link_error``), whose result a workflow waits for. A republish
keeps its claim; a member takes the claim if it is free and otherwise
waits, at execution, for the key's holder to finish.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Mapping
from typing import Any, Final

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, enum.Enum):
        def __str__(self) -> str:
            return str(self.value)


class Lock(StrEnum):
    """How long a key is held (``dedup_lock``)."""

    UNTIL_EXECUTED = "until_executed"
    UNTIL_EXECUTING = "until_executing"
    WHILE_EXECUTING = "while_executing"
    UNTIL_AND_WHILE_EXECUTING = "until_and_while_executing"
    UNTIL_EXPIRED = "until_expired"


class OnConflict(StrEnum):
    """What a call or a delivery does when another task holds its key."""

    SKIP = "skip"
    RAISE = "raise"
    RESCHEDULE = "reschedule"


class OnRedisError(StrEnum):
    """``dedup_on_redis_error``: fail the call, or go on without dedup."""

    RAISE = "raise"
    PROCEED = "proceed"


class ClaimStatus(enum.IntEnum):
    """What the claim script answered."""

    TAKEN = 0  # another task id holds the claim
    NEW = 1  # the claim is now this task id's
    OWN = 2  # this task id already held it (its TTL is raised)
    DONE = 3  # this task id already ran to success


class LeaseStatus(enum.IntEnum):
    """What the acquire script answered."""

    ACQUIRED = 1
    DONE = 2  # this task id already ran to success
    SAME_TASK = 3  # another delivery of this very task id holds the lease
    BUSY = 4  # other task ids fill the key's dedup_max_running places
    CLAIMED = 5  # another task id holds the idempotency claim asked for


class Renewal(enum.IntEnum):
    """What the renew script answered; true only for RENEWED."""

    LOST = 0  # the member is gone or expired: taken over, expired or released
    RENEWED = 1
    VANISHED = 2  # the lease set and the fence are gone: Redis lost its data

    def __bool__(self) -> bool:
        return self is Renewal.RENEWED

    @property
    def reason(self) -> str:
        """Why a lease that was not renewed is lost, in words."""
        if self is Renewal.VANISHED:
            return (
                "its lease key vanished: Redis lost its data (a restart without "
                "persistence, a flush or an eviction)"
            )
        return (
            "another execution holds the key, or the lease expired or was "
            "released by force"
        )


class Ending(StrEnum):
    """How a body, or the process that ran it, ended."""

    SUCCESS = "success"
    FAILURE = "failure"  # final: no message of this task id is left
    RETRY = "retry"  # a message of this task id is queued again (or kept)
    HANDED_OVER = "handed_over"  # self.replace() by the same task, same key
    IGNORED = "ignored"  # Ignore: no result (self.replace() by other work)


#: Modes that claim at enqueue (``while_executing`` has no enqueue dedup).
CLAIMING: Final = frozenset(Lock) - {Lock.WHILE_EXECUTING}
#: Modes whose claim is freed as soon as a body takes the lease.
FREED_AT_START: Final = frozenset(
    {Lock.UNTIL_EXECUTING, Lock.UNTIL_AND_WHILE_EXECUTING}
)

#: Call options by which Celery's canvas (or a caller) waits on this task's
#: result: such a call is a workflow member and is never deduplicated away.
WORKFLOW_OPTIONS: Final = (
    "link",
    "link_error",
    "chain",
    "chord",
    "group_id",
    "parent_id",
    "root_id",
    "replaced_task_nesting",
)
#: The same, as a worker's request context names them.
WORKFLOW_REQUEST_FIELDS: Final = ("chain", "chord", "group", "callbacks", "errbacks")


def is_workflow_call(options: Mapping[str, Any]) -> bool:
    """Whether ``apply_async`` options make the call part of a workflow."""
    return any(options.get(name) for name in WORKFLOW_OPTIONS)


def is_workflow_request(request: Any) -> bool:
    """Whether a worker's request context is a workflow member's."""
    return any(getattr(request, name, None) for name in WORKFLOW_REQUEST_FIELDS)


# -- enqueue -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Publish:
    """What :func:`on_claim` decided for one call."""

    publish: bool  # send the message
    claim: bool = False  # the message holds the key's claim
    duplicate: bool = False  # nothing sent: the call is the holder's
    raise_duplicate: bool = False  # nothing sent: raise DuplicateTaskError
    raise_unavailable: bool = False  # nothing sent: raise BackendUnavailableError


def wants_claim(lock: Lock) -> bool:
    """Whether a call takes the claim at enqueue at all."""
    return lock in CLAIMING


def on_claim(
    answer: ClaimStatus | None,
    *,
    on_conflict: OnConflict,
    on_redis_error: OnRedisError,
    republish: bool,
    workflow: bool,
    had_claim: bool = False,
) -> Publish:
    """Decide a call from the claim script's ``answer`` (None: Redis failed).

    ``had_claim`` is what a republished message's stamp said it held.
    """
    if answer is None:
        if republish:  # failing it would lose the task
            return Publish(True, claim=had_claim)
        if on_redis_error is OnRedisError.RAISE:
            return Publish(False, raise_unavailable=True)
        return Publish(True)
    if answer in (ClaimStatus.NEW, ClaimStatus.OWN) and (
        republish or workflow or answer is ClaimStatus.NEW
    ):
        return Publish(True, claim=True)
    if republish or workflow:
        return Publish(True)  # never deduplicated: it waits at execution
    # Held by another task, or this very task id is pending (OWN) or done.
    if on_conflict is OnConflict.RAISE:
        return Publish(False, raise_duplicate=True)
    return Publish(False, duplicate=True)


# -- execution ---------------------------------------------------------------


class Act(StrEnum):
    """What a delivery does once the lease was asked for."""

    RUN = "run"  # under the lease
    RUN_UNGUARDED = "run_unguarded"  # Redis failed; dedup_on_redis_error=proceed
    DROP_DONE = "drop_done"  # ack, run nothing: this task id already succeeded
    DROP_DUPLICATE = "drop_duplicate"  # end as a duplicate of the holder
    RAISE_DUPLICATE = "raise_duplicate"  # fail with DuplicateTaskError
    RESCHEDULE = "reschedule"  # publish again for later; not a retry


def claims_at_execution(lock: Lock, *, stamped: bool, workflow: bool) -> bool:
    """Whether a delivery takes the idempotency claim itself: a message of an
    ``until_expired`` task that no publisher claimed (sent without
    celery-dedup), unless a workflow waits on it."""
    return lock is Lock.UNTIL_EXPIRED and not stamped and not workflow


def on_acquire(
    answer: LeaseStatus | None,
    *,
    lock: Lock,
    on_conflict: OnConflict,
    on_redis_error: OnRedisError,
    workflow: bool,
) -> Act:
    """Decide a delivery from the acquire script's ``answer`` (None: Redis
    failed)."""
    if answer is None:
        if on_redis_error is OnRedisError.RAISE:
            return Act.RESCHEDULE  # neither lost nor run unguarded
        return Act.RUN_UNGUARDED
    if answer is LeaseStatus.ACQUIRED:
        return Act.RUN
    if answer is LeaseStatus.DONE:
        return Act.DROP_DONE
    if answer is LeaseStatus.SAME_TASK:
        # The other delivery may die, and then this copy is the only one left.
        return Act.RESCHEDULE
    rule = on_conflict
    if rule is OnConflict.SKIP and (workflow or lock is Lock.UNTIL_AND_WHILE_EXECUTING):
        # A workflow waits for this member; under until_and_while_executing
        # it is the one queued behind the running one.
        rule = OnConflict.RESCHEDULE
    if answer is LeaseStatus.CLAIMED and rule is OnConflict.RESCHEDULE:
        rule = OnConflict.SKIP  # the idempotency key holds for its window
    if rule is OnConflict.RESCHEDULE:
        return Act.RESCHEDULE
    if rule is OnConflict.RAISE:
        return Act.RAISE_DUPLICATE
    return Act.DROP_DUPLICATE


# -- ends --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Release:
    """Which keys an ending frees, and what it remembers."""

    free_claim: bool = False  # compare-and-delete: only if this task id holds it
    record_done: bool = False  # remember this task id's success


def on_end(lock: Lock, ending: Ending, *, has_claim: bool) -> Release:
    """The keys to free once a body ended (its lease is always given back).

    ``has_claim``: the delivery still holds the claim (it was not freed when
    the body started, or the body ran without a lease).
    """
    if ending in (Ending.RETRY, Ending.HANDED_OVER):
        return Release()  # the next message of this task id keeps the claim
    done = ending is Ending.SUCCESS
    if not has_claim:
        return Release(record_done=done)
    if lock is Lock.UNTIL_EXPIRED:
        # An idempotency key lasts its window, unless the work failed for good.
        return Release(free_claim=ending is Ending.FAILURE, record_done=done)
    return Release(free_claim=True, record_done=done)


def on_drop(lock: Lock, *, has_claim: bool) -> Release:
    """The keys a delivery that never ran frees: a duplicate, a copy of a task
    that already succeeded, a revoked or expired message. An idempotency
    key lasts its window; a revoke before it ran frees it (:func:`on_revoke`).
    """
    return Release(free_claim=has_claim and lock is not Lock.UNTIL_EXPIRED)


def on_revoke(*, has_claim: bool) -> Release:
    """A revoked (or expired) task frees its claim, in every mode."""
    return Release(free_claim=has_claim)


def lease_keeps_fence(max_running: int) -> bool:
    """Fencing is defined for one holder: with more, tokens do not order
    writes (two live bodies hold tokens t1 < t2 at once)."""
    return max_running == 1
