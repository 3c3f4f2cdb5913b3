"""The demo's Celery app: each job twice, as a plain Celery task and a DedupTask.

    celery -A celery_dedup.demo.app worker

The runner starts its workers this way, with the settings in the
``CELERY_DEDUP_DEMO`` environment variable (see :mod:`.settings`). Both variants
of a job share one body and differ only in their base class (``celery.Task``
or :class:`~celery_dedup.DedupTask`) and its dedup options. Each body records
its run in Redis and ends with one business row and its event.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Final

import redis
from celery import Celery, Task, current_task
from celery.signals import task_prerun

from celery_dedup import DedupTask, LockLostError, signals
from celery_dedup.connection import reset

from . import record
from .settings import ENV_VAR, DemoSettings
from .store import Store

PLAIN: Final = "plain"
DEDUP: Final = "dedup"
VARIANTS: Final = (PLAIN, DEDUP)


@dataclasses.dataclass(frozen=True)
class Job:
    """Celery options of a job (both variants), and the DedupTask's own."""

    acks_late: bool = False
    reject_on_worker_lost: bool = False
    dedup_lock: str | None = None  # None: the default, "until_executed"
    dedup_lock_ttl: float | None = None  # None: the default, 60 s


JOBS: Final = {
    # S1 and S3: the defaults (the lock is held from enqueue until executed).
    "close_campaign": Job(),
    "monitor": Job(),
    # S4: acknowledged after the body, so the broker can redeliver it meanwhile.
    "long_report": Job(acks_late=True, dedup_lock_ttl=6),
    # S5: handed back to the queue if the process running it dies.
    "fragile_export": Job(
        acks_late=True, reject_on_worker_lost=True, dedup_lock_ttl=10
    ),
    # S9: a lease only while it runs, short enough for a pause to outlive it.
    "find_winners": Job(dedup_lock="while_executing", dedup_lock_ttl=1.5),
}

app = Celery("celery_dedup_demo")
_configured: list[DemoSettings] = []
#: This process's Redis client (for the records) and database, made after a
#: fork: a prefork child builds its own on first use.
_per_process: dict[int, tuple[redis.Redis, Store]] = {}


def configure(settings: DemoSettings) -> None:
    """Point the app at the demo's Redis, queue and database."""
    transport = {"global_keyprefix": f"{settings.namespace}:"}
    app.conf.update(
        broker_url=settings.redis_url,
        broker_transport_options=transport if settings.shared_redis else {},
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_default_queue=settings.queue,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=False,
        dedup_redis_url=settings.redis_url,
        dedup_key_prefix=settings.key_prefix,
    )
    reset(app)
    _configured[:] = [settings]
    _per_process.clear()


def settings() -> DemoSettings:
    """The settings given to :func:`configure` (or found in the environment)."""
    if not _configured:
        raise RuntimeError(
            f"the demo app is not configured: set {ENV_VAR} or call configure()"
        )
    return _configured[0]


def _resources() -> tuple[redis.Redis, Store]:
    pid = os.getpid()
    if pid not in _per_process:
        _per_process.clear()
        found = settings()
        _per_process[pid] = (
            redis.Redis.from_url(found.redis_url),
            Store(found.database_url),
        )
    return _per_process[pid]


def _record(run: str, kind: str, entry: Any) -> None:
    record.append(_resources()[0], settings(), run, kind, entry)


def run_job(
    self: Task[Any, Any], run: str, job: str, pause: float = 0.5, write: bool = True
) -> bool:
    """Work for ``pause`` seconds, then write a business row and its event."""
    started = time.time()
    task_id = str(self.request.id)
    _record(
        run, record.STARTED, {"task_id": task_id, "pid": os.getpid(), "start": started}
    )
    outcome, created = "failed", None
    try:
        time.sleep(pause)
        if write:
            created = _resources()[1].write(
                dedup=isinstance(self, DedupTask),
                aggregate_id=f"{run}:{job}",
                task_id=task_id,
            )
        outcome = "done"
    except LockLostError:
        outcome = "rejected"  # a zombie's write, rolled back
        raise
    finally:
        entry = {"task_id": task_id, "pid": os.getpid(), "start": started}
        entry.update(end=time.time(), outcome=outcome, created=created)
        _record(run, record.FINISHED, entry)
    return bool(created)


def task_name(variant: str, job: str) -> str:
    return f"celery_dedup.demo.{variant}.{job}"


def _register() -> dict[tuple[str, str], Task[Any, Any]]:
    found: dict[tuple[str, str], Task[Any, Any]] = {}
    for name, job in JOBS.items():
        plain = app.task(
            name=task_name(PLAIN, name),
            bind=True,
            acks_late=job.acks_late,
            reject_on_worker_lost=job.reject_on_worker_lost,
        )
        found[PLAIN, name] = plain(run_job)
        dedup = app.task(
            name=task_name(DEDUP, name),
            base=DedupTask,
            bind=True,
            acks_late=job.acks_late,
            reject_on_worker_lost=job.reject_on_worker_lost,
            dedup_key=("run", "job"),
            dedup_lock=job.dedup_lock,
            dedup_lock_ttl=job.dedup_lock_ttl,
        )
        found[DEDUP, name] = dedup(run_job)
    return found


TASKS: Final = _register()


def task_for(variant: str, job: str) -> Task[Any, Any]:
    """The task of ``job`` in ``variant`` ("plain" or "dedup")."""
    return TASKS[variant, job]


@task_prerun.connect(weak=False)
def _delivered(
    task_id: str | None = None, kwargs: dict[str, Any] | None = None, **_: Any
) -> None:
    """Every delivery that reaches a process, run or dropped (redeliveries too)."""
    run = (kwargs or {}).get("run")
    if isinstance(run, str):
        _record(run, record.DELIVERED, {"task_id": task_id})


@signals.task_deduplicated.connect(weak=False)
def _dropped(task_id: str | None = None, stage: str = "", **_: Any) -> None:
    """A delivery that celery-dedup ended before its body."""
    if stage != "execution":
        return
    run = (getattr(current_task.request, "kwargs", None) or {}).get("run")
    if isinstance(run, str):
        _record(run, record.DROPPED, {"task_id": task_id})


_from_env = DemoSettings.from_env()
if _from_env is not None:
    configure(_from_env)
