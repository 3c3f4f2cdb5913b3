"""Every receiver celery-dedup connects to Celery's signals, in one place.

:func:`connect` runs once per process: when a DedupTask is bound to an app,
or from :func:`celery_dedup.install`. Each receiver has a ``dispatch_uid``, so
connecting again never doubles one. The publish receivers of
``install(app)`` are per app, and connected there.
"""

from __future__ import annotations

import atexit
import threading
from typing import Any, Final

from celery import signals as celery_signals

from . import checks, request
from .connection import live_backends
from .outbox import worker as outbox_worker

#: How long a process about to exit spends on Redis work it deferred (s).
FLUSH_AT_EXIT: Final = 5.0

_connected = threading.Event()
_lock = threading.Lock()


def connect() -> None:
    """Connect celery-dedup's worker receivers (idempotent)."""
    with _lock:
        if _connected.is_set():
            return
        receivers = (
            (celery_signals.worker_init, checks.check_at_start, "checks"),
            (celery_signals.beat_init, checks.check_at_start, "checks.beat"),
            (celery_signals.task_revoked, request.on_revoked, "revoked"),
            (celery_signals.worker_ready, outbox_worker.on_worker_ready, "relay"),
            (
                celery_signals.worker_shutdown,
                outbox_worker.on_worker_shutdown,
                "relay.stop",
            ),
            (celery_signals.worker_process_shutdown, flush, "flush.child"),
            (celery_signals.worker_shutdown, flush, "flush"),
        )
        for signal, receiver, uid in receivers:
            signal.connect(receiver, weak=False, dispatch_uid=f"celery_dedup.{uid}")
        atexit.register(flush)
        _connected.set()


def flush(*_: Any, **__: Any) -> None:
    """Finish the Redis work this process deferred (releases that failed, a
    dead child's lease) before it exits, for up to :data:`FLUSH_AT_EXIT`."""
    for backend in live_backends():
        backend.heartbeat.flush(FLUSH_AT_EXIT)
