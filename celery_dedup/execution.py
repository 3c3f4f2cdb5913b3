"""The body side of a DedupTask: take the lease, run, give it back.

:class:`Delivery` is what one delivery of a message knows (from its stamp, or
computed for a message published without celery-dedup). :func:`run` asks
Redis, lets :mod:`celery_dedup.model` decide, and does what it says. The
worker's main process (:mod:`celery_dedup.request`) uses :func:`free` for
deliveries whose process died or that were revoked.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeGuard

import redis
from celery import states
from celery.exceptions import Ignore, Reject, Retry

from . import model, notify, signals
from .config import TaskOptions, validate_task_option, visibility_timeout
from .connection import Backend, get_backend
from .exceptions import DuplicateTaskError, LockLostError
from .lease import Lease, member
from .model import Act, Ending, Release

if TYPE_CHECKING:
    from .task import DedupTask

#: The message header that carries a call's dedup decision to the worker:
#: ``{"id": task id, "key": str or None, "claim": bool, "lock": mode,
#: "workflow": bool, "options": {call overrides}}``, and ``"duplicate_of"``
#: for a message published although its key was held (``install(app)``).
HEADER: Final = "celery_dedup"


def is_dedup_task(task: Any) -> TypeGuard[DedupTask]:
    """Whether ``task`` is a DedupTask (known by its interface, so that the
    modules the task's module needs can ask without importing it)."""
    return callable(getattr(task, "dedup_applies", None))


def stamp_of(request: Any) -> Mapping[str, Any] | None:
    """The dedup header of a task's request context, if it carries one."""
    stamp = getattr(request, HEADER, None)  # headers are attributes too
    if stamp is None:
        stamp = (getattr(request, "headers", None) or {}).get(HEADER)
    return stamp if isinstance(stamp, Mapping) else None


def overrides(stamp: Mapping[str, Any]) -> dict[str, Any]:
    """The call options a stamp carries, its lock mode included, checked
    again (a message may come from another version, or another service)."""
    call = {**(stamp.get("options") or {}), "dedup_lock": stamp.get("lock")}
    return {
        name: validate_task_option(name, value, "the message's ")
        for name, value in call.items()
        if value is not None
    }


@dataclasses.dataclass
class Delivery:
    """One delivery of a message: its key, options and what it holds."""

    task_id: str
    key: str
    opts: TaskOptions
    has_claim: bool
    workflow: bool
    claim_here: bool = False
    duplicate_of: str | None = None

    @classmethod
    def of(
        cls, task: DedupTask, request: Any, args: Any = None, kwargs: Any = None
    ) -> Delivery:
        """The delivery of ``request`` (a task's context)."""
        args = tuple(request.args or ()) if args is None else args
        kwargs = dict(request.kwargs or {}) if kwargs is None else kwargs
        stamp = stamp_of(request)
        workflow = model.is_workflow_request(request)
        if stamp is None:
            # Published by code without celery-dedup: nothing was claimed.
            opts = task.dedup_options()
            return cls(
                request.id,
                task.dedup_key_at_execution(opts, args, kwargs),
                opts,
                has_claim=False,
                workflow=workflow,
                claim_here=model.claims_at_execution(
                    opts.lock, stamped=False, workflow=workflow
                ),
            )
        opts = task.dedup_options(overrides(stamp))
        key = stamp.get("key") or task.dedup_key_at_execution(opts, args, kwargs)
        return cls(
            request.id,
            key,
            opts,
            has_claim=bool(stamp.get("claim")),
            workflow=workflow or bool(stamp.get("workflow")),
            duplicate_of=stamp.get("duplicate_of"),
        )


def run(task: DedupTask, request: Any, body: Callable[[], Any]) -> Any:
    """Run ``body`` as one delivery of ``task`` under the dedup rules."""
    backend = get_backend(task.app)
    delivery = Delivery.of(task, request)
    if delivery.duplicate_of is not None:
        # Its publisher found the key held but could not stop the publish (a
        # signal receiver cannot): it ends here, unrun, as a duplicate.
        _end_unrun(task, backend, delivery, Act.DROP_DUPLICATE, delivery.duplicate_of)
    opts = delivery.opts
    thread = None
    if threading.current_thread() is not threading.main_thread():
        thread = threading.get_ident()
    held_by = member(delivery.task_id, request.hostname, os.getpid(), thread)
    asked_at = time.monotonic()
    answer = None
    try:
        answer = backend.store.acquire(
            delivery.key,
            held_by,
            delivery.task_id,
            ttl=opts.lock_ttl,
            max_running=opts.max_running,
            # Tokens start from Redis time in us, so the counter needs to
            # outlive a lease only to order acquisitions within one us.
            fence_ttl=max(backend.config.done_ttl, 3 * opts.lock_ttl),
            free_claim=opts.lock in model.FREED_AT_START,
            claim_ttl=opts.ttl if delivery.claim_here else 0,
        )
    except redis.RedisError as exc:
        error: redis.RedisError | None = exc
        _undo_acquire(backend, delivery, held_by)
    else:
        error = None
    act = model.on_acquire(
        answer.status if answer else None,
        lock=opts.lock,
        on_conflict=opts.on_conflict,
        on_redis_error=backend.config.on_redis_error,
        workflow=delivery.workflow,
    )
    if act is Act.RUN and answer is not None:
        delivery.has_claim = (delivery.has_claim or answer.took_claim) and (
            opts.lock not in model.FREED_AT_START
        )
        lease = Lease(
            delivery.key,
            held_by,
            answer.token,
            opts.lock_ttl,
            asked_at,
            task.name,
            opts.max_running,
        )
        return _run_leased(task, backend, delivery, lease, request, body)
    if act is Act.RUN_UNGUARDED:
        notify.logger.warning(
            "Redis unavailable: %s[%s] runs without its lease (%r)",
            task.name,
            delivery.task_id,
            error,
            extra=notify.extra(task.name, delivery.key, delivery.task_id),
        )
        return _run_body(task, backend, delivery, None, request, body)
    if act is Act.RESCHEDULE:
        if answer is None:
            wait, why = min(opts.lock_ttl, 5.0), f"Redis unavailable: {error!r}"
        elif answer.holder == delivery.task_id:
            wait, why = poll(opts, answer.wait), "another delivery of it runs"
        else:
            wait, why = poll(opts, answer.wait), f"task {answer.holder} holds the key"
        reschedule(task, request, delivery.key, wait, why)
    assert answer is not None
    holder = delivery.task_id if act is Act.DROP_DONE else answer.holder
    _end_unrun(task, backend, delivery, act, holder)


def _undo_acquire(backend: Backend, delivery: Delivery, held_by: str) -> None:
    """Give back, in the background, the lease a failed acquire may have
    taken all the same: a request that timed out (a paused or cut-off Redis)
    may have reached Redis, which runs it when it answers again. Left there,
    the lease would hold the key, and keep this task's own rescheduled copy
    waiting, until ``dedup_lock_ttl``. ``held_by`` names this delivery alone
    (see ``lease.member``)."""
    undo_later(
        backend,
        lambda: backend.store.release(
            delivery.key, held_by, delivery.task_id, free_claim=False, done_ttl=0
        ),
        delivery.opts.lock_ttl,
    )


def undo_later(backend: Backend, undo: Callable[[], object], within: float) -> None:
    """Run ``undo`` twice in the background, retried for up to ``within`` s,
    to take back what a request that failed may have done all the same. The
    second leaves only once the first was answered, so after Redis ran what
    it had received before, the failed request included."""

    def twice() -> None:
        undo()
        undo()

    backend.heartbeat.later(twice, time.monotonic() + within)


def _run_leased(
    task: DedupTask,
    backend: Backend,
    delivery: Delivery,
    lease: Lease,
    request: Any,
    body: Callable[[], Any],
) -> Any:
    fence = lease.token if model.lease_keeps_fence(lease.max_running) else None
    vars(request).update(dedup_lease=lease, dedup_fence=fence, dedup_key=lease.key)
    notify.logger.debug(
        "Lease on %s taken by %s[%s], fence %s",
        lease.key,
        task.name,
        delivery.task_id,
        lease.token,
        extra=notify.extra(task.name, lease.key, delivery.task_id),
    )
    signals.lease_acquired.send(
        sender=task.name, key=lease.key, task_id=delivery.task_id, token=lease.token
    )
    backend.heartbeat.watch(lease)
    return _run_body(task, backend, delivery, lease, request, body)


def _run_body(
    task: DedupTask,
    backend: Backend,
    delivery: Delivery,
    lease: Lease | None,
    request: Any,
    body: Callable[[], Any],
) -> Any:
    """Run ``body``; then give back what it held (no lease: the body ran
    unguarded, and Redis may be back to free what the mode frees)."""
    ending = Ending.FAILURE
    try:
        result = body()
        if lease is not None and not lease.valid:
            reason = lease.lost_reason or "lost"
            lease.lose(reason)  # logs and signals, unless the heartbeat did
            raise LockLostError(lease.key, delivery.task_id, reason)
        ending = Ending.SUCCESS
        return result
    except BaseException as exc:
        ending = ending_of(exc, request)
        raise
    finally:
        if lease is not None:
            backend.heartbeat.unwatch(lease)  # before the release: no false loss
        _give_back(task, backend, delivery, lease.member if lease else "", ending)


def ending_of(exc: BaseException, request: Any) -> Ending:
    """How a body that raised ``exc`` ended."""
    if isinstance(exc, Retry):
        return Ending.RETRY  # the retry's message keeps the claim
    if isinstance(exc, Reject):
        return Ending.RETRY if getattr(exc, "requeue", False) else Ending.FAILURE
    if isinstance(exc, Ignore):
        if getattr(request, "dedup_handed_over", False):
            return Ending.HANDED_OVER
        return Ending.IGNORED
    return Ending.FAILURE


def _give_back(
    task: DedupTask, backend: Backend, delivery: Delivery, held_by: str, ending: Ending
) -> None:
    """Release the lease ``held_by`` ("" for none) as ``ending`` says."""
    release = model.on_end(delivery.opts.lock, ending, has_claim=delivery.has_claim)
    held = free(
        backend,
        delivery,
        held_by,
        release,
        task.name,
        retry_for=max(delivery.opts.lock_ttl, delivery.opts.ttl),
    )
    if held_by:
        notify.logger.debug(
            "Lease on %s released by %s[%s] (%s)",
            delivery.key,
            task.name,
            delivery.task_id,
            ending,
            extra=notify.extra(task.name, delivery.key, delivery.task_id),
        )
        signals.lease_released.send(
            sender=task.name,
            key=delivery.key,
            task_id=delivery.task_id,
            held=bool(held),
            outcome=ending.value,
        )


def free(
    backend: Backend,
    delivery: Delivery,
    held_by: str,
    release: Release,
    task_name: str,
    *,
    retry_for: float,
    in_background: bool = False,
    ready: Callable[[], bool] | None = None,
    by_holder: bool = False,
) -> bool | None:
    """Do ``release`` for ``delivery`` (lease ``held_by``, "" for none; or,
    ``by_holder``, whichever lease the :func:`~celery_dedup.lease.holder`
    ``held_by`` took).

    Returns whether the lease was still held; None when the release was left
    to the background thread: ``in_background``, or because Redis failed
    (then it is retried until ``retry_for`` seconds, when every key it frees
    has expired anyway).
    """
    if not held_by and not release.free_claim and not release.record_done:
        return False

    def do() -> bool:
        return backend.store.release(
            delivery.key,
            held_by,
            delivery.task_id,
            free_claim=release.free_claim,
            done_ttl=backend.config.done_ttl if release.record_done else 0,
            by_holder=by_holder,
        )

    until = time.monotonic() + retry_for
    if in_background:
        backend.heartbeat.later(do, until, ready=ready)
        return None
    try:
        return do()
    except redis.RedisError:
        notify.logger.warning(
            "Could not release %s[%s]'s hold on %s; retrying in the background",
            task_name,
            delivery.task_id,
            delivery.key,
            exc_info=True,
            extra=notify.extra(task_name, delivery.key, delivery.task_id),
        )
        backend.heartbeat.later(do, until)
        return None


def _end_unrun(
    task: DedupTask, backend: Backend, delivery: Delivery, act: Act, holder: str | None
) -> NoReturn:
    """End a delivery that does not run: raise what ``act`` says."""
    notify.deduplicated(task.name, delivery.key, delivery.task_id, holder, "execution")
    release = model.on_drop(delivery.opts.lock, has_claim=delivery.has_claim)
    free(backend, delivery, "", release, task.name, retry_for=delivery.opts.ttl)
    if act is Act.DROP_DONE and not task.ignore_result:
        _warn_if_result_lost(task, delivery)
    error = DuplicateTaskError(delivery.key, holder, task.name)
    if act is Act.RAISE_DUPLICATE:
        raise error
    if act is Act.DROP_DUPLICATE and not task.ignore_result:
        # A terminal state a caller can see: .get() raises, naming the holder.
        task.backend.store_result(
            delivery.task_id, error, states.FAILURE, request=task.request
        )
    raise Ignore()


def _warn_if_result_lost(task: DedupTask, delivery: Delivery) -> None:
    """Say so when a copy of a task that succeeded is dropped while its
    result was never stored: its process died after the body succeeded (and
    its completion was recorded) but before Celery stored the result. The
    body is not run again, so the result stays PENDING (a known limit, see
    docs/fault-injection.md)."""
    try:
        state = task.backend.get_state(delivery.task_id)
    except Exception:  # a warning only; the drop stands
        return
    if state not in states.READY_STATES:
        notify.logger.error(
            "%s[%s] succeeded earlier, but its process died before its result "
            "was stored: this copy is dropped (not run again), and its result "
            "stays %s",
            task.name,
            delivery.task_id,
            state,
            extra=notify.extra(task.name, delivery.key, delivery.task_id),
        )


def poll(opts: TaskOptions, wait: float) -> float:
    """When to look again: when the holder's lease ends (it may have crashed),
    or sooner, every tenth of the lease TTL, as a live holder may end early."""
    return min(wait, max(0.5, opts.lock_ttl / 10))


def reschedule(
    task: DedupTask, request: Any, key: str, countdown: float, why: str
) -> NoReturn:
    """Publish this message again after ``countdown`` s; end this delivery.

    Not a retry: it does not count against ``max_retries``. The countdown
    stays under the broker's visibility timeout, so that the waiting copy is
    not itself redelivered.
    """
    countdown = min(max(countdown, 0.1), visibility_timeout(task.app) / 2)
    notify.logger.info(
        "Rescheduled %s[%s] in %.1fs: %s",
        task.name,
        request.id,
        countdown,
        why,
        extra=notify.extra(task.name, key, request.id),
    )
    try:
        task.signature_from_request(
            request, countdown=countdown, retries=request.retries
        ).apply_async()
    except Exception as exc:
        # The broker is unreachable too: hand the message back unacked if it
        # still can be (acks_late), else fail loudly. Never drop it.
        if task.acks_late:
            raise Reject(exc, requeue=True) from exc
        raise
    raise Ignore()
