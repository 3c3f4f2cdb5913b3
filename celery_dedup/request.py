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
from celery.signals import task_revoked
from celery.worker.request import Request

from .config import get_config
from .connection import get_backend
from .task import DedupTask, _Plan

logger = logging.getLogger(__name__)

_CHILD_GONE = (WorkerLostError, Terminated, SystemExit, KeyboardInterrupt)


class DedupRequest(Request):
    """A ``Request`` that frees the lease of a child process that died."""

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, _CHILD_GONE):
            task = self.task
            requeued = bool(
                task.acks_late
                and isinstance(exc, WorkerLostError | SystemExit | KeyboardInterrupt)
                and task.reject_on_worker_lost
            )
            _free_dead_child(self, final=not requeued)
        return super().on_failure(
            exc_info, send_failed_event=send_failed_event, return_ok=return_ok
        )

    def on_timeout(self, soft: bool, timeout: float) -> Any:
        result = super().on_timeout(soft, timeout)
        if not soft:  # the pool kills the child: its body is over
            task = self.task
            final = not (task.acks_late and not task.acks_on_failure_or_timeout)
            _free_dead_child(self, final=final)
        return result


def _plan_of(task: Any, context: Any) -> _Plan | None:
    """The plan a delivery ran (or would have run) under, from its context."""
    if not isinstance(task, DedupTask) or not get_config(task.app).enabled:
        return None
    try:
        return task._execution_plan(
            context, tuple(context.args or ()), dict(context.kwargs or {})
        )
    except Exception:  # an undecodable or unbindable message: nothing was held
        logger.debug("No dedup plan for %s[%s]", task.name, context.id, exc_info=True)
        return None


def _free_dead_child(request: Any, *, final: bool) -> None:
    """Give back the lease the dead child held; the claim too if ``final``."""
    task = request.task
    plan = _plan_of(task, request._context)
    if plan is None or not request.worker_pid:
        return
    backend = get_backend(task.app)
    member = f"{request.id}|{request.hostname}|{request.worker_pid}"
    names = (
        backend.key(plan.key, "lease"),
        backend.key(plan.key, "claim"),
        backend.key(plan.key, f"done:{request.id}"),
    )
    free_claim = final and plan.has_claim and plan.lock != "while_executing"
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
    logger.info(
        "Freed the lease of %s[%s] whose process %s died",
        request.name,
        request.id,
        request.worker_pid,
        extra={"dedup_key": plan.key, "task_id": request.id, "held": held},
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
