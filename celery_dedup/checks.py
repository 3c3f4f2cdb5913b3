"""Start-up checks: a bad setting stops the worker, a risky one is logged."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .config import get_config, visibility_timeout
from .exceptions import ConfigurationError
from .execution import is_dedup_task

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)


def problems(app: Celery) -> list[str]:
    """Settings of ``app`` that defeat a guarantee, one sentence each.

    Reading the settings also validates them: a bad one raises
    ``ConfigurationError`` naming it.
    """
    config = get_config(app)
    found = []
    broker = str(app.conf.broker_url or "")
    if broker.startswith(("redis", "rediss", "sqs")):
        visibility = visibility_timeout(app)
        if config.done_ttl < visibility:
            found.append(
                f"dedup_done_ttl ({config.done_ttl:g}s) is shorter than the broker's "
                f"visibility_timeout ({visibility:g}s): a message redelivered after "
                "its task succeeded may run again"
            )
    for task in app.tasks.values():
        if not is_dedup_task(task) or not task.dedup_opted_in():
            continue
        opts = task.dedup_options()
        limit = task.time_limit or app.conf.task_time_limit
        if opts.lock == "until_executed" and limit and opts.ttl < limit:
            found.append(
                f"{task.name}: dedup_ttl ({opts.ttl:g}s) is shorter than its time "
                f"limit ({limit:g}s): the enqueue claim can expire while it runs "
                "(the execution lease still keeps a second body out)"
            )
    return found


def check_at_start(sender: Any = None, **_: Any) -> None:
    """``worker_init``: stop a worker whose settings are bad; warn about risky ones."""
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
