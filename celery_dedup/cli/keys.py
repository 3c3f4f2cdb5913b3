"""``celery -A proj dedup status`` and ``inspect``: the dedup keys in Redis.

Also the lookups ``release`` shares: the :class:`Inspector` of the app, Redis
errors as exit codes, and a key or a task id resolved to its keys.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import click
import redis
from celery.bin.base import CeleryCommand
from celery.exceptions import CeleryCommandException
from celery.platforms import EX_UNAVAILABLE
from kombu.exceptions import OperationalError

from .. import inspection
from ..config import get_config, resolve
from ..connection import display_url, get_backend
from ..inspection import Inspector, KeyState, TaskInfo
from ._common import (
    EX_REFUSED,
    LOOKUP_GROUP,
    F,
    configuration_errors,
    echo_json,
    json_errors,
    json_option,
    option,
    target_argument,
)

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)


def _lookup_options(command: F) -> F:
    """``--timeout`` and ``--no-workers``, then ``--json``: the options of
    ``status`` and ``inspect``."""
    options = (
        option(
            "-t",
            "--timeout",
            type=float,
            default=1.0,
            show_default=True,
            group=LOOKUP_GROUP,
            help="Seconds to wait for the workers' replies about the holders.",
        ),
        option(
            "--no-workers",
            is_flag=True,
            group=LOOKUP_GROUP,
            help="Do not ask the workers (only Redis and the result backend).",
        ),
        json_option(),
    )
    for add in reversed(options):
        command = add(command)
    return command


@click.command(cls=CeleryCommand)
@_lookup_options
@click.pass_context
def status(
    ctx: click.Context,
    /,
    timeout: float,
    no_workers: bool,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Held dedup keys by task: holder, state, age, TTLs and fence.

    KEY, the first column, is a dedup key: the 32 hex digits of a digest of
    the task name and its arguments, as inspect and release take it. MODE is
    the dedup_lock the task has in this app. "-" is what nobody knows.

    Exits 69 when Redis cannot be read, 78 when a setting is missing or
    invalid (with --json, JSON with an "error" then).
    """
    app = ctx.obj.app
    with json_errors(as_json, {"prefix": None, "workers": None, "keys": None}) as out:
        inspector = get_inspector(app)
        out["prefix"] = inspector.prefix
        with redis_errors(app):
            states = inspector.held()
        documents, workers = _describe(app, states, timeout, not no_workers)
        out.update(workers=workers, keys=documents)
    if as_json:
        echo_json(out)
        return
    for line in inspection.status_lines(documents):
        ctx.obj.echo(line)
    ctx.obj.echo(
        f"{len(documents)} held key(s) under prefix {inspector.prefix!r}; "
        + _workers_text(workers)
    )


@click.command("inspect", cls=CeleryCommand)
@target_argument()
@_lookup_options
@click.pass_context
def inspect_key(
    ctx: click.Context,
    /,
    target: str,
    timeout: float,
    no_workers: bool,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Everything Redis holds for one dedup key, or for the keys of a task id.

    KEY_OR_TASK_ID is a dedup key as status shows it (32 hex digits), one of
    its Redis key names (such as dedup:{KEY}:claim), or a task id: then the
    keys that task holds a claim or a lease member in, or completed.

    Exits 1 when nothing is stored for it, 69 when Redis cannot be read, 78
    when a setting is missing or invalid (with --json, JSON with an "error").
    """
    app = ctx.obj.app
    empty = {"prefix": None, "query": target, "matched": None, "workers": None}
    with json_errors(as_json, {**empty, "keys": None}) as out:
        inspector = get_inspector(app)
        out["prefix"] = inspector.prefix
        with redis_errors(app):
            kind, states = find_keys(inspector, target)
        documents, workers = _describe(app, states, timeout, not no_workers)
        out.update(matched=kind, workers=workers, keys=documents)
        if not states:
            raise CeleryCommandException(
                message=f"Nothing under prefix {inspector.prefix!r} for {target!r}: "
                "no such dedup key, and no key held or completed by that task id",
                exit_code=EX_REFUSED,
            )
    if as_json:
        echo_json(out)
        return
    for index, key_document in enumerate(documents):
        if index:
            ctx.obj.echo("")
        for line in inspection.inspect_lines(key_document):
            ctx.obj.echo(line)


def get_inspector(app: Celery) -> Inspector:
    """The app's Redis and key prefix, read; EX_CONFIG when a setting is bad."""
    with configuration_errors():
        backend = get_backend(app)
    return Inspector(backend.redis, backend.config.key_prefix)


@contextlib.contextmanager
def redis_errors(app: Celery) -> Iterator[None]:
    """Exit with EX_UNAVAILABLE, naming the server, when Redis fails."""
    try:
        yield
    except redis.RedisError as exc:
        raise CeleryCommandException(
            message=f"Could not read Redis at {display_url(app)}: {exc}",
            exit_code=EX_UNAVAILABLE,
        ) from exc


def dedup_key(inspector: Inspector, target: str) -> str | None:
    """The dedup key ``target`` names (its 32 hex digits, or one of its Redis
    key names under the prefix), or None: then it can only be a task id."""
    parsed = inspector.layout.parse(target)
    if parsed:
        return parsed[0]
    return target if inspection.KEY_PATTERN.match(target) else None


def find_keys(inspector: Inspector, target: str) -> tuple[str, list[KeyState]]:
    """``("key", [state])`` when ``target`` names a stored dedup key, else
    ``("task", states)`` (a task id may look like a key)."""
    key = dedup_key(inspector, target)
    state = inspector.key(key) if key else None
    if state is not None:
        return "key", [state]
    return "task", inspector.task(target)


def _describe(
    app: Celery, states: Sequence[KeyState], timeout: float, ask_workers: bool
) -> tuple[list[dict[str, Any]], list[str] | None]:
    """The key documents, with what the workers and result backend know of
    their holders, and the workers that answered (None: not asked, as there
    was no holder to ask about, or no broker to ask through)."""
    ids = sorted(
        {i for s in states for i in [*s.task_ids(), *(d.task_id for d in s.done)]}
    )
    tasks: dict[str, TaskInfo] = {}
    workers = None
    if ask_workers and ids:
        tasks, workers = _ask_about(app, ids, timeout)
    for task_id in ids:
        if task_id not in tasks:
            info = _from_backend(app, task_id)
            if info is not None:
                tasks[task_id] = info
    names = {info.name for info in tasks.values() if info.name}
    if names - set(app.tasks):
        _import_task_modules(app)
    modes = {name: _configured_mode(app, name) for name in names}
    now = time.time()
    return [inspection.key_document(s, tasks, modes, now) for s in states], workers


def _ask_about(
    app: Celery, ids: Sequence[str], timeout: float
) -> tuple[dict[str, TaskInfo], list[str] | None]:
    """One ``query_task`` broadcast: which worker has each id, and its state."""
    try:
        reply = app.control.inspect(timeout=timeout).query_task(*ids)
    except OperationalError as exc:
        click.echo(f"warning: could not ask the workers: {exc}", err=True)
        return {}, None
    return inspection.tasks_from_workers(reply), sorted(reply or {})


def _from_backend(app: Celery, task_id: str) -> TaskInfo | None:
    """The name and state the result backend stored (the name only with
    ``result_extended``); None when it knows nothing (PENDING)."""
    from celery.backends.base import DisabledBackend  # noqa: PLC0415

    if isinstance(app.backend, DisabledBackend):
        return None
    try:
        meta = app.backend.get_task_meta(task_id)
    except Exception as exc:  # any backend, any error: the lookup is a bonus
        logger.debug("No result backend answer for %s: %r", task_id, exc)
        return None
    state = meta.get("status")
    name = meta.get("name")
    if state in (None, "PENDING") and not name:
        return None
    return TaskInfo(
        task_id,
        name=name,
        state=None if state == "PENDING" else state,
        source="result backend",
    )


def _import_task_modules(app: Celery) -> None:
    """Import the app's task modules (``imports``, ``include``, autodiscovery)
    as ``celery shell`` and the worker do, for the tasks ``-A`` alone does not
    register: in the usual layout, ``proj/celery.py`` does not import
    ``proj/tasks.py``. It sends ``import_modules`` (which autodiscovery and
    Django's fixup listen to), no worker signal. A module that fails is one
    warning: the modes of its tasks stay unknown."""
    try:
        app.loader.import_default_modules()
    except Exception as exc:  # the user's modules: whatever they raise
        click.echo(
            f"warning: could not import the app's task modules "
            f"({type(exc).__name__}: {exc}); the modes of their tasks are unknown",
            err=True,
        )


def _configured_mode(app: Celery, name: str) -> str | None:
    """The ``dedup_lock`` task ``name`` has in this app (call options aside)."""
    from ..task import DedupTask  # noqa: PLC0415 - imports the worker side

    config = get_config(app)
    task = app.tasks.get(name)
    if isinstance(task, DedupTask):
        attributes = type(task).dedup_attributes()
    elif name in config.tasks:
        attributes = {}
    else:
        return None
    return resolve(config, name, attributes, {}).lock


def _workers_text(workers: list[str] | None) -> str:
    if workers is None:
        return "workers not asked"
    return f"{len(workers)} worker(s) answered"
