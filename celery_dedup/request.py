"""The worker side that runs in the worker's main process, not in the body.

When a prefork child dies mid-body (SIGKILL, the OOM killer, a hard time
limit, ``revoke(terminate=True)``) its lease would block the key until it
expires. The main process knows which child ran the task, so it gives that
lease back as soon as the process is gone (never before: billiard reports a
hard time limit before it kills the child), and the requeued message runs on
the next worker that gets it. A revoked or expired message frees its claim,
and so does a message with an eta or countdown as soon as the worker learns
of its revoke, not when the eta comes.

All of it runs on the process's background thread, never on the consumer's:
a slow Redis never stalls the worker's main loop.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Final

from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]
from billiard.exceptions import Terminated, WorkerLostError
from celery.exceptions import TimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.request import Request

from . import model, notify
from .connection import get_backend
from .execution import Delivery, free, is_dedup_task
from .lease import holder
from .model import Ending

logger = logging.getLogger(__name__)

_CHILD_GONE: Final = (
    WorkerLostError,
    Terminated,
    TimeLimitExceeded,
    SystemExit,
    KeyboardInterrupt,
)
#: How often a waiting (eta) message is checked for a revoke (seconds).
REVOKE_POLL: Final = 0.25


class DedupRequest(Request):
    """A ``Request`` that frees what a dead child or a revoke left held."""

    _dedup_requeued: bool | None = None
    _dedup_republished: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.eta is not None:
            _watch_revoke(self)

    def on_timeout(self, soft: bool, timeout: float) -> Any:
        if not soft:  # the pool kills the child next: free its lease once gone
            _free_dead_child(self, Ending.RETRY)
        return super().on_timeout(soft, timeout)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if not isinstance(exc, _CHILD_GONE):
            return super().on_failure(exc_info, send_failed_event, return_ok)
        self._dedup_requeued = None
        self._dedup_republished = False
        result = super().on_failure(exc_info, send_failed_event, return_ok)
        # Celery decided (the rules differ across versions): a message handed
        # back, or a retry published, keeps the claim; anything else is final.
        kept = bool(self._dedup_requeued) or self._dedup_republished
        _free_dead_child(self, Ending.RETRY if kept else Ending.FAILURE)
        return result

    def reject(self, requeue: bool = False) -> Any:
        self._dedup_requeued = requeue
        return super().reject(requeue=requeue)

    if hasattr(Request, "_retry_worker_lost"):  # Celery >= 5.7

        def _retry_worker_lost(self, exc: Any, exc_info: Any) -> bool:
            republished = bool(super()._retry_worker_lost(exc, exc_info))  # type: ignore[misc]
            self._dedup_republished = republished
            return republished


def delivery_of(task: Any, context: Any) -> Delivery | None:
    """The delivery a message ran (or would have run) as, if dedup applies."""
    if not is_dedup_task(task) or not task.dedup_applies(context):
        return None
    try:
        return Delivery.of(task, context)
    except Exception:  # an undecodable or unkeyable message: nothing was held
        logger.debug("No dedup delivery: %s[%s]", task.name, context.id, exc_info=True)
        return None


def _free_dead_child(request: Any, ending: Ending) -> None:
    """Give back the lease a dead child held, once its process is gone, and
    the claim as ``ending`` says (in the background)."""
    delivery = delivery_of(request.task, request._context)
    pid = request.worker_pid
    if delivery is None or not pid:
        return
    release = model.on_end(delivery.opts.lock, ending, has_claim=delivery.has_claim)
    held_by = holder(request.id, request.hostname, pid, None)
    notify.logger.info(
        "Freeing the lease of %s[%s] once its process %s is gone",
        request.name,
        request.id,
        pid,
        extra=notify.extra(request.name, delivery.key, request.id),
    )
    free(
        get_backend(request.task.app),
        delivery,
        held_by,
        release,
        request.name,
        retry_for=max(delivery.opts.lock_ttl, delivery.opts.ttl),
        in_background=True,
        ready=lambda: process_gone(pid),
        by_holder=True,
    )


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:  # no /proc here: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    # The state follows the command name, which is in parentheses.
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def _watch_revoke(request: DedupRequest) -> None:
    """Free an eta message's claim as soon as the worker learns of its revoke
    (Celery itself reports it only when the eta comes)."""
    delivery = delivery_of(request.task, request._context)  # type: ignore[attr-defined]
    if delivery is None or not delivery.has_claim:
        return
    eta = request.eta
    wait = eta.timestamp() - time.time() if eta is not None else 0.0
    backend = get_backend(request.task.app)

    def release() -> bool:
        return backend.store.release_claim(delivery.key, delivery.task_id)

    backend.heartbeat.later(
        release,
        time.monotonic() + max(0.0, wait) + REVOKE_POLL,
        ready=lambda: request.id in worker_state.revoked,
        poll=REVOKE_POLL,
    )


def on_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """``task_revoked``: a revoked or expired task gives its claim back.

    ``request`` is the task's context. A terminated body's lease is freed by
    :meth:`DedupRequest.on_failure`, which knows the process that ran it.
    """
    delivery = delivery_of(sender, request) if request is not None else None
    if delivery is None or not delivery.has_claim:
        return
    free(
        get_backend(sender.app),
        delivery,
        "",
        model.on_revoke(has_claim=True),
        sender.name,
        retry_for=delivery.opts.ttl,
        in_background=True,
    )
