"""Covering tasks that ``DedupTask.apply_async`` never sees: ``install(app)``.

Two paths bypass it: a message published without it (``app.send_task`` by
name, beat without the task imported, another service), and a task whose
class is not a DedupTask (a third-party task with a base of its own). After
``install(app)``:

- every message this process publishes for a task with dedup options (a
  ``dedup_tasks`` entry, or a DedupTask that opted in) is stamped with its
  key, and its claim taken, by a ``before_task_publish````
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

import itertools
import logging
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import redis
from celery.signals import after_task_publish, before_task_publish

from . import model, notify
from .config import TASK_OPTIONS, get_config, resolve
from .connection import get_backend
from .exceptions import ConfigurationError
from .execution import HEADER
from .keys import make_key
from .task import DedupTask
from .timing import claim_ttl
from .wiring import connect

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

#: The apps installed, each with the dispatch_uid prefix of its receivers.
_installed: weakref.WeakKeyDictionary[Celery, str] = weakref.WeakKeyDictionary()
_numbers = itertools.count(1)
#: How long a claim taken in ``before_task_publish`` lives until the publish
#: is confirmed in ``after_task_publish`` (a publish that fails never is).
_PROVISIONAL = 30.0


def install(app: Celery) -> None:
    """Connect celery-dedup's publish hook and adopt the ``dedup_tasks`` of
    ``app``. Call it where the app is configured; calling it again is a no-op."""
    if app in _installed:
        return
    uid = _installed[app] = f"celery_dedup.install.{next(_numbers)}"
    app_ref = weakref.ref(app)

    def stamp(body: Any = None, headers: Any = None, **_: Any) -> None:
        owner = app_ref()
        if owner is not None and isinstance(headers, dict):
            _stamp_publish(owner, body, headers)

    def confirm(headers: Any = None, **_: Any) -> None:
        owner = app_ref()
        if owner is not None and isinstance(headers, dict):
            _confirm_publish(owner, headers)

    before_task_publish.connect(stamp, weak=False, dispatch_uid=f"{uid}.stamp")
    after_task_publish.connect(confirm, weak=False, dispatch_uid=f"{uid}.confirm")
    connect()
    if getattr(app, "finalized", False):
        _adopt(app)
    else:
        app.on_after_finalize.connect(lambda sender, **_: _adopt(sender), weak=False)


def installed(app: Celery) -> bool:
    """Whether :func:`install` connected the publish hook for ``app``."""
    return app in _installed


def uninstall(app: Celery) -> None:
    """Disconnect the publish hook :func:`install` connected for ``app``
    (tests, mostly: publish signals are global to the process)."""
    uid = _installed.pop(app, None)
    if uid is not None:
        before_task_publish.disconnect(dispatch_uid=f"{uid}.stamp")
        after_task_publish.disconnect(dispatch_uid=f"{uid}.confirm")


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
    # Only this app's tasks: the signal does not say which app publishes, and
    # Celery registers shared tasks in every app. An app not finalized yet is
    # not finalized here (it may not be configured yet).
    finalized = getattr(app, "finalized", False)
    task = app.tasks.get(name) if finalized or name in config.tasks else None
    dedup_task = isinstance(task, DedupTask) and task.dedup_opted_in()
    if not config.enabled or not (dedup_task or name in config.tasks):
        return
    args, kwargs, embed = _arguments(body)
    if isinstance(task, DedupTask):
        opts = task.dedup_options()
        signature = task.dedup_signature
    else:
        opts = resolve(config, name, {}, {})
        signature = None  # not imported here: keyed by the raw arguments
    workflow = bool(headers.get("group")) or model.is_workflow_call(embed)
    stamp: dict[str, Any] = {
        "id": task_id,
        "key": None,
        "lock": opts.lock.value,
        "options": {},
        "workflow": workflow,
        "claim": False,
    }
    headers[HEADER] = stamp
    if not model.wants_claim(opts.lock):
        return  # keyed by the worker, where it is used
    try:
        key = make_key(name, signature, opts.key, args, kwargs, strict=False)
    except Exception:  # an unkeyable call: the worker will say so when it runs
        logger.warning("Could not key %s[%s]", name, task_id, exc_info=True)
        return
    stamp["key"] = key
    ttl = claim_ttl(opts.ttl, headers)
    backend = get_backend(app)
    try:
        # Provisional until the publish is confirmed: a receiver cannot see a
        # publish fail, so a claim it took expires soon unless confirmed.
        answer = backend.store.claim(key, task_id, min(_PROVISIONAL, ttl))
    except redis.RedisError:
        logger.warning(
            "Redis unavailable: %s published unclaimed; its worker still applies "
            "the lease",
            task_id,
            exc_info=True,
            extra=notify.extra(name, key, task_id),
        )
        return
    decision = model.on_claim(
        answer.status,
        on_conflict=opts.on_conflict,
        on_redis_error=config.on_redis_error,
        republish=False,
        workflow=workflow,
    )
    if decision.publish or opts.on_conflict is model.OnConflict.RESCHEDULE:
        # Published as it is; with "reschedule" its worker waits for the key.
        stamp["claim"] = decision.claim
        if decision.claim:
            stamp["ttl"] = ttl
        return
    # A receiver cannot stop the publish: the worker drops it, unrun.
    stamp["duplicate_of"] = answer.holder
    notify.deduplicated(name, key, task_id, answer.holder, "publish")


def _confirm_publish(app: Celery, headers: Mapping[str, Any]) -> None:
    """The publish went out: give the claim its whole TTL, if this task id
    still holds it (its body may have started, or ended, meanwhile)."""
    stamp = headers.get(HEADER)
    task_id = headers.get("id")
    if not isinstance(stamp, Mapping) or not stamp.get("ttl") or not task_id:
        return
    try:
        get_backend(app).store.confirm(stamp["key"], str(task_id), float(stamp["ttl"]))
    except redis.RedisError:
        logger.warning(
            "Redis unavailable: the claim of %s stays provisional (%ss)",
            task_id,
            _PROVISIONAL,
            exc_info=True,
            extra={"dedup_key": stamp["key"], "task_id": task_id},
        )


def _arguments(
    body: Any,
) -> tuple[tuple[Any, ...], dict[str, Any], Mapping[str, Any]]:
    """Positional and keyword arguments, and the workflow options (callbacks,
    errbacks, chain, chord), of a task message body (protocol 1 or 2)."""
    if isinstance(body, Mapping):  # protocol 1
        args, kwargs = tuple(body.get("args") or ()), dict(body.get("kwargs") or {})
        return args, kwargs, body
    if isinstance(body, list | tuple) and len(body) >= 2:  # protocol 2
        embed = body[2] if len(body) > 2 and isinstance(body[2], Mapping) else {}
        return tuple(body[0] or ()), dict(body[1] or {}), embed
    return (), {}, {}
