"""Covering tasks that ``DedupTask.apply_async`` never sees: ``install(app)``.

Two paths bypass it: a message published without it (``app.send_task`` by
name, beat without the task imported, another service), and a task whose
class is not a DedupTask (a third-party task with a base of its own). After
``install(app)``:

- every message this process publishes for a task with dedup options is
  stamped with its key, and its claim taken, by a ``before_task_publish``
  receiver. A receiver cannot stop a publish (Celery swallows its errors), so
  a message whose key was already claimed is published marked as a duplicate
  and dropped, unrun, by the worker;
- each task named in ``dedup_tasks`` whose class is not a DedupTask becomes
  one (its class gains DedupTask as first base), on the worker and the
  publisher alike, so its body runs under the lease.

A worker that knows the task as a DedupTask already applies the execution
side to every message, stamped or not; ``install`` is not needed for that.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import redis
from celery.signals import after_task_publish, before_task_publish

from . import claim as claims
from .config import TASK_OPTIONS, get_config, resolve
from .connection import get_backend
from .exceptions import ConfigurationError
from .keys import make_key
from .task import HEADER, DedupTask, _log_duplicate

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

_installed: weakref.WeakSet[Celery] = weakref.WeakSet()
#: How long a claim taken in ``before_task_publish`` lives until the publish
#: is confirmed in ``after_task_publish`` (a publish that fails never is).
_PROVISIONAL = 30.0


def install(app: Celery) -> None:
    """Connect celery-dedup's publish hook and adopt the ``dedup_tasks`` of
    ``app``. Call it where the app is configured; calling it again is a no-op."""
    if app in _installed:
        return
    _installed.add(app)
    app_ref = weakref.ref(app)

    def stamp(body: Any = None, headers: Any = None, **_: Any) -> None:
        owner = app_ref()
        if owner is not None and isinstance(headers, dict):
            _stamp_publish(owner, body, headers)

    def confirm(headers: Any = None, **_: Any) -> None:
        owner = app_ref()
        if owner is not None and isinstance(headers, dict):
            _confirm_publish(owner, headers)

    before_task_publish.connect(stamp, weak=False)
    after_task_publish.connect(confirm, weak=False)
    if getattr(app, "finalized", False):
        _adopt(app)
    else:
        app.on_after_finalize.connect(lambda sender, **_: _adopt(sender), weak=False)


def _adopt(app: Celery) -> None:
    """Make each task named in ``dedup_tasks`` a DedupTask, in place."""
    for name in get_config(app).tasks:
        task = app.tasks.get(name)
        if task is None or isinstance(task, DedupTask):
            continue
        cls: type = type(task)
        # The task's own dedup_* attributes (annotations) must win over
        # DedupTask's defaults, which come first in the new class's MRO.
        attributes = {n: getattr(cls, n) for n in TASK_OPTIONS if hasattr(cls, n)}
        attributes["__module__"] = cls.__module__
        adopted: type[DedupTask] = type(cls.__qualname__, (DedupTask, cls), attributes)
        task.__class__ = adopted
        logger.debug("Adopted %s as a DedupTask", name)
        try:
            adopted.dedup_attributes()
        except ConfigurationError:
            # Raised again at its first use and at worker start-up (a receiver
            # of on_after_finalize cannot fail the app's finalize).
            logger.exception("Bad dedup option on %s", name)


def _stamp_publish(app: Celery, body: Any, headers: dict[str, Any]) -> None:
    """Stamp a message published past DedupTask.apply_async, and claim its key."""
    if HEADER in headers:
        return  # DedupTask.apply_async decided already
    name, task_id = headers.get("task"), headers.get("id")
    if not isinstance(name, str) or not isinstance(task_id, str):
        return
    config = get_config(app)
    # Only this app's dedup_tasks: the signal does not say which app publishes,
    # and Celery registers shared tasks in every app.
    if not config.enabled or name not in config.tasks:
        return
    task = app.tasks.get(name)
    args, kwargs = _arguments(body)
    if isinstance(task, DedupTask):
        opts = task._dedup_options({})
        signature = task._dedup_signature
    else:
        opts = resolve(config, name, {}, {})
        signature = None  # not imported here: keyed by the raw arguments
    try:
        key = make_key(name, signature, opts.key, args, kwargs)
    except Exception:  # an unkeyable call: the worker will say so when it runs
        logger.warning("Could not key %s[%s]", name, task_id, exc_info=True)
        return
    stamp: dict[str, Any] = {"key": key, "lock": opts.lock, "options": {}}
    stamp["claim"] = False
    if opts.lock != "while_executing":
        # Provisional until the publish is confirmed: a receiver cannot see a
        # publish fail, so a claim it took expires soon unless confirmed.
        ttl = min(_PROVISIONAL, claims.ttl_for(opts.ttl, headers))
        held = _claim(app, key, task_id, ttl, {})
        if held is not None and held.status == claims.NEW:
            stamp["claim"] = True
            stamp["ttl"] = claims.ttl_for(opts.ttl, headers)
        elif held is not None:
            stamp["duplicate_of"] = held.holder
            _log_duplicate(name, key, task_id, held.holder, "publish")
    headers[HEADER] = stamp


def _confirm_publish(app: Celery, headers: Mapping[str, Any]) -> None:
    """The publish went out: give the claim its whole TTL."""
    stamp = headers.get(HEADER)
    task_id = headers.get("id")
    if not isinstance(stamp, Mapping) or not stamp.get("ttl") or not task_id:
        return
    _claim(app, stamp["key"], str(task_id), float(stamp["ttl"]), {})


def _claim(
    app: Celery,
    key: str,
    task_id: str,
    ttl: float,
    headers: Mapping[str, Any],
) -> claims.ClaimResult | None:
    backend = get_backend(app)
    try:
        return backend.claims.claim(
            backend.key(key, "claim"),
            backend.key(key, f"done:{task_id}"),
            task_id,
            claims.ttl_for(ttl, headers),
        )
    except redis.RedisError:
        logger.warning(
            "Redis unavailable: %s published unclaimed; its worker still applies "
            "the lease",
            task_id,
            exc_info=True,
            extra={"dedup_key": key, "task_id": task_id},
        )
        return None


def _arguments(body: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments from a task message body (v1 or v2)."""
    if isinstance(body, Mapping):  # protocol 1
        return tuple(body.get("args") or ()), dict(body.get("kwargs") or {})
    if isinstance(body, list | tuple) and len(body) >= 2:  # protocol 2
        return tuple(body[0] or ()), dict(body[1] or {})
    return (), {}
