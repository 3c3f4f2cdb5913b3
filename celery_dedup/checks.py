"""Start-up checks: a bad setting stops the worker, a risky one is logged."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .config import get_config, visibility_timeout
from .connection import redis_url
from .exceptions import ConfigurationError
from .execution import is_dedup_task
from .keys import check_key_names
from .lease import warn_if_green

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)


def problems(app: Celery) -> list[str]:
    """Settings of ``app`` that defeat a guarantee, one sentence each.

    Reading the settings also validates them: a bad one, or one that would
    fail every task (no Redis to use, a ``dedup_key`` naming no argument),
    raises ``ConfigurationError`` naming it.
    """
    from .hooks import installed  # noqa: PLC0415 - hooks connects these checks

    config = get_config(app)
    if not config.enabled:
        return []
    deduplicated = [
        task
        for task in app.tasks.values()
        if is_dedup_task(task) and task.dedup_opted_in()
    ]
    if deduplicated or installed(app):
        redis_url(app)  # raises, naming dedup_redis_url, if there is none
    found = [
        f"dedup_tasks[{name!r}]: no such task is registered; the entry does nothing"
        for name in config.tasks
        if name not in app.tasks
    ]
    if not installed(app):
        found += [
            f"dedup_tasks[{name!r}]: the task is not a DedupTask and "
            "celery_dedup.install(app) was not called; the entry does nothing"
            for name in config.tasks
            if name in app.tasks and not is_dedup_task(app.tasks[name])
        ]
    broker = str(app.conf.broker_url or "")
    if broker.startswith(("redis", "rediss", "sqs")):
        visibility = visibility_timeout(app)
        if config.done_ttl < visibility:
            found.append(
                f"dedup_done_ttl ({config.done_ttl:g}s) is shorter than the broker's "
                f"visibility_timeout ({visibility:g}s): a message redelivered after "
                "its task succeeded may run again"
            )
    for task in deduplicated:
        opts = task.dedup_options()
        check_key_names(task.name, task.dedup_signature, opts.key)
        if opts.lock_ttl < 1:
            found.append(
                f"{task.name}: dedup_lock_ttl ({opts.lock_ttl:g}s) is under a "
                "second: a renewal slower than a third of it loses the lease"
            )
        if config.lease_replicas and config.lease_replicas_timeout > opts.lock_ttl / 3:
            found.append(
                f"{task.name}: dedup_lease_replicas_timeout "
                f"({config.lease_replicas_timeout:g}s) is over a third of its "
                f"dedup_lock_ttl ({opts.lock_ttl:g}s): a renewal waiting that "
                "long for replicas can lose the lease"
            )
        limit = task.time_limit or app.conf.task_time_limit
        if opts.lock == "until_executed" and limit and opts.ttl < limit:
            found.append(
                f"{task.name}: dedup_ttl ({opts.ttl:g}s) is shorter than its time "
                f"limit ({limit:g}s): the enqueue claim can expire while it runs "
                "(the execution lease still keeps a second body out)"
            )
    return found


def check_at_start(sender: Any = None, **_: Any) -> None:
    """``worker_init``, ``beat_init``: stop a worker or beat whose settings are
    bad; warn about risky ones."""
    app = getattr(sender, "app", None)
    if app is None:
        return
    try:
        found = problems(app)
    except ConfigurationError as exc:
        # Celery logs and swallows a receiver's Exception: exit instead.
        raise SystemExit(f"celery-dedup: {exc}") from exc
    for problem in found:
        logger.warning("celery-dedup: %s", problem)
    if get_config(app).enabled:
        warn_if_green()  # a gevent or eventlet worker: say so at start-up
