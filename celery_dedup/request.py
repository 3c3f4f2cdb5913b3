"""The worker side that runs in the worker's main process, not in the body.

When a prefork child dies mid-body (SIGKILL, the OOM killer, a hard time
limit, ``revoke(terminate=True)``) its lease would block the key until it
expires. The main process knows which child ran the task, so it gives that
lease back at once, and the requeued message runs on the next worker that
gets it. A revoked or expired task that never ran frees its enqueue claim.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]
from billiard.exceptions import Terminated, WorkerLostError
from celery.exceptions import TimeLimitExceeded
from celery.signals import task_revoked
from celery.worker.request import Request

from . import lease as leases
from .connection import get_backend
from .task import DedupTask, _Plan

logger = logging.getLogger(__name__)

_CHILD_GONE = (
    WorkerLostError,
    Terminated,
    TimeLimitExceeded,
    SystemExit,
    KeyboardInterrupt,
)


class DedupRequest(Request):
    """A ``Request`` that frees the lease of a child process that died."""

    _dedup_requeued: bool | None = None

    def on_timeout(self, soft: bool, timeout: float) -> Any:
        if not soft:  # the pool kills the child: its body is over
            _free_dead_child(self, free_claim=False)
        return super().on_timeout(soft, timeout)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if not isinstance(exc, _CHILD_GONE):
            return super().on_failure(exc_info, send_failed_event, return_ok)
        # Free the lease before Celery requeues: the next delivery may be at once.
        _free_dead_child(self, free_claim=False)
        self._dedup_requeued = None
        result = super().on_failure(exc_info, send_failed_event, return_ok)
        # Celery decided (the rules differ across versions): a message handed
        # back, or a retry published, keeps the claim; anything else is final.
        if not self._dedup_requeued and not getattr(
            self.task, "retry_on_worker_lost", False
        ):
            _free_dead_child(self, free_claim=True)
        return result

    def reject(self, requeue: bool = False) -> Any:
        self._dedup_requeued = requeue
        return super().reject(requeue=requeue)


def _plan_of(task: Any, context: Any) -> _Plan | None:
    """The plan a delivery ran (or would have run) under, from its context."""
    if not isinstance(task, DedupTask) or not task._dedup_on():
        return None
    try:
        return task._execution_plan(
            context, tuple(context.args or ()), dict(context.kwargs or {})
        )
    except Exception:  # an undecodable or unbindable message: nothing was held
        logger.debug("No dedup plan for %s[%s]", task.name, context.id, exc_info=True)
        return None


def _free_dead_child(request: Any, *, free_claim: bool) -> None:
    """Give back the lease the dead child held, and the claim if ``free_claim``."""
    task = request.task
    plan = _plan_of(task, request._context)
    if plan is None or not request.worker_pid:
        return
    backend = get_backend(task.app)
    member = leases.member(request.id, request.hostname, request.worker_pid, None)
    names = (
        backend.key(plan.key, "lease"),
        backend.key(plan.key, "claim"),
        backend.key(plan.key, f"done:{request.id}"),
    )
    free_claim = free_claim and plan.has_claim
    try:
        held = backend.leases.release(names, member, request.id, free_claim, 0)
    except redis.RedisError:
        logger.warning(
            "Could not free the lease of dead child %s of %s[%s]; it expires in %ss",
            request.worker_pid,
            request.name,
            request.id,
            plan.lock_ttl,
            exc_info=True,
        )
        return
    if held or free_claim:
        logger.info(
            "Freed the %s of %s[%s] whose process %s died",
            "lease" if held else "claim",
            request.name,
            request.id,
            request.worker_pid,
            extra={"dedup_key": plan.key, "task_id": request.id},
        )


@task_revoked.connect(weak=False)
def _on_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """A revoked or expired task gives its claim back.

    ``request`` is the task's context. A terminated body's lease is freed by
    :meth:`DedupRequest.on_failure`, which knows the process that ran it.
    """
    plan = _plan_of(sender, request) if request is not None else None
    if plan is not None and plan.has_claim:
        sender._release_claim(get_backend(sender.app), plan.key, request.id)
