"""The in-worker relay: a thread in the worker's main process.

With ``dedup_outbox_relay = True``, a relay thread starts when the worker is
ready and stops (finishing its pass) at worker shutdown. Its receivers are
connected by :func:`celery_dedup.wiring.connect`; they import SQLAlchemy only
for an app that turned the setting on.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Final

from ..config import get_config

if TYPE_CHECKING:
    from celery import Celery

    from .relay import Relay

logger = logging.getLogger(__name__)

_STOP_TIMEOUT: Final = 30.0  # seconds to wait for the current pass at shutdown
_running: dict[int, tuple[Relay, threading.Thread, threading.Event]] = {}
_lock = threading.Lock()


def start_relay(app: Celery) -> Relay | None:
    """Start the app's relay thread if ``dedup_outbox_relay`` is set."""
    if not get_config(app).outbox_relay:
        return None
    from .relay import Relay  # noqa: PLC0415 - the outbox extra, only now

    with _lock:
        if id(app) in _running:
            return _running[id(app)][0]
        relay = Relay.from_app(app)
        stop = threading.Event()
        thread = threading.Thread(
            target=relay.run_forever,
            args=(stop,),
            name="celery-dedup-relay",
            daemon=True,
        )
        _running[id(app)] = (relay, thread, stop)
    thread.start()
    logger.info(
        "Outbox relay started in the worker (table %s)",
        relay.outbox.table_name,
        extra={"outbox_table": relay.outbox.table_name},
    )
    return relay


def stop_relay(app: Celery, timeout: float = _STOP_TIMEOUT) -> None:
    """Stop the app's relay thread, if it runs, and wait for its pass to end."""
    with _lock:
        entry = _running.pop(id(app), None)
    if entry is None:
        return
    relay, thread, stop = entry
    stop.set()
    thread.join(timeout)
    relay.close()
    logger.info("Outbox relay stopped", extra={"outbox_table": relay.outbox.table_name})


def on_worker_ready(sender: Any = None, **kwargs: Any) -> None:
    """``worker_ready``: start the in-worker relay if ``dedup_outbox_relay``."""
    app = getattr(sender, "app", None)
    if app is None:
        return
    try:
        start_relay(app)
    except Exception:
        # Logged here, not raised: Celery would only log it again, less clearly.
        logger.exception(
            "The in-worker outbox relay (dedup_outbox_relay) did not start"
        )


def on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    """``worker_shutdown``: stop the in-worker relay."""
    app = getattr(sender, "app", None)
    if app is not None:
        stop_relay(app)
