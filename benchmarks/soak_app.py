"""The app `benchmarks/soak.py` runs in its workers: one task per lock mode.

Every task is keyed on its ``key`` argument only, so the other arguments
(``seq``, the body's ``pause``, ``retry``, ``outbox``) vary between calls of
one job. Each body records itself in the observer Redis (db 0), which no
fault touches:

- ``busy``: a hash, pid -> the body running in that process right now;
- ``started``: a list, one JSON entry per body that began (task id, mode,
  dedup key, fencing token, pid, attempt, start time);
- ``ended``: a list, the same entry with its end time, outcome (``ok``,
  ``retry``, ``fenced``, ``error``), whether its lease was still valid and
  what its outbox write did.

A body with ``retry`` retries once (``self.retry``); one with ``outbox``
writes one event (aggregate ``task:<task id>``) and a ledger row in one
transaction, fenced with its lease's token.

The processes are configured from the environment (``SOAK_*``, set by the
soak for its workers) or by :func:`configure` (the soak's own process).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Final

import redis
import sqlalchemy as sa
from celery import Celery
from celery.exceptions import Retry
from sqlalchemy.orm import Session

from celery_dedup import DedupTask, LockLostError, signals
from celery_dedup.connection import reset
from celery_dedup.outbox import Outbox

#: The lock modes, one task each (``soak.<mode>``).
MODES: Final = (
    "until_executed",
    "until_executing",
    "until_and_while_executing",
    "until_expired",
    "while_executing",
)
#: The outbox table (its fence table and the ledger are named after it).
TABLE: Final = "soak_outbox"
#: The event each outbox body writes.
EVENT: Final = "SOAK_JOB_DONE"

#: The Redis broker hands a message its consumer took and never acked (the
#: consumer's connection was dropped) to another consumer after this long;
#: Celery's default, an hour, would outlast the soak. Longer than any body
#: or countdown here.
VISIBILITY_TIMEOUT: Final = 20.0

app = Celery("soak_app")
_observer: dict[str, redis.Redis] = {}


def configure(
    *,
    broker_url: str,
    dedup_url: str,
    observer_url: str,
    outbox_url: str,
    queue: str,
    lock_ttl: float,
    expired_ttl: float,
) -> None:
    """Point the app at the soak's servers. ``observer_url`` is the base URL
    of the observer Redis: db 0 holds the records, db 1 the results."""
    base = observer_url.rsplit("/", 1)[0]
    app.conf.update(
        broker_url=broker_url,
        result_backend=f"{base}/1",
        result_expires=3600,
        dedup_redis_url=dedup_url,
        dedup_lock_ttl=lock_ttl,
        dedup_tasks={"soak.until_expired": {"dedup_ttl": expired_ttl}},
        dedup_outbox_url=outbox_url,
        dedup_outbox_table=TABLE,
        # A killed child's message goes back to the queue (see worker-killed).
        task_acks_late=os.environ.get("SABOTAGE") != "acks",
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    )
    reset(app)
    _observer["client"] = redis.Redis.from_url(f"{base}/0")


if "SOAK_BROKER_URL" in os.environ:
    configure(
        broker_url=os.environ["SOAK_BROKER_URL"],
        dedup_url=os.environ["SOAK_DEDUP_URL"],
        observer_url=os.environ["SOAK_OBSERVER_URL"],
        outbox_url=os.environ["SOAK_OUTBOX_URL"],
        queue=os.environ["SOAK_QUEUE"],
        lock_ttl=float(os.environ["SOAK_LOCK_TTL"]),
        expired_ttl=float(os.environ["SOAK_EXPIRED_TTL"]),
    )


@signals.task_deduplicated.connect
def _deduplicated(
    task_id: str | None = None,
    existing_task_id: str | None = None,
    stage: str = "",
    **_: Any,
) -> None:
    """Count the deliveries a worker dropped: onto another task, or onto
    their own task id, which already succeeded (a redelivered copy)."""
    if stage == "execution" and "client" in _observer:
        whose = "own" if task_id == existing_task_id else "other"
        _observer["client"].hincrby("dropped", whose)


def ledger_table(metadata: sa.MetaData) -> sa.Table:
    """The business table written beside each event: one row per task id."""
    name = f"{TABLE}_ledger"
    if name in metadata.tables:
        return metadata.tables[name]
    return sa.Table(
        name,
        metadata,
        sa.Column("task_id", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("fence", sa.BigInteger, nullable=True),
    )


def _write_event(task_id: str, key: str, fence: int | None) -> bool:
    """The event of ``task_id`` and its ledger row, in one transaction,
    fenced by the running body's token. True if the event is new."""
    outbox = Outbox.from_app(app)
    ledger = ledger_table(outbox.metadata)
    with Session(outbox.engine) as session, session.begin():
        created = outbox.add(
            session,
            EVENT,
            aggregate_id=f"task:{task_id}",
            payload={"key": key, "fence": fence},
        )
        if created:  # a rerun of a committed body finds both rows there
            session.execute(
                ledger.insert().values(task_id=task_id, key=key, fence=fence)
            )
    return created


def _body(
    task: DedupTask,
    mode: str,
    key: str,
    seq: int,
    pause: float,
    *,
    retry: bool,
    outbox: bool,
) -> int:
    request = task.request
    observer = _observer["client"]
    pid = str(os.getpid())
    entry: dict[str, Any] = {
        "task_id": request.id,
        "mode": mode,
        "key": key,
        "dedup_key": getattr(request, "dedup_key", None),
        "fence": getattr(request, "dedup_fence", None),
        "pid": os.getpid(),
        "attempt": request.retries,
        "start": time.time(),
    }
    text = json.dumps(entry)
    observer.pipeline().hset("busy", pid, text).rpush("started", text).execute()
    outcome, wrote = "error", None
    try:
        time.sleep(pause)
        if outbox:
            try:
                wrote = _write_event(request.id, key, entry["fence"])
            except LockLostError:
                wrote = "rejected"
                raise
        if retry and request.retries == 0:
            raise task.retry(countdown=0.3)
        outcome = "ok"
        return seq
    except Retry:
        outcome = "retry"
        raise
    except LockLostError:
        outcome = "fenced"
        raise
    finally:
        entry.update(
            end=time.time(),
            outcome=outcome,
            wrote=wrote,
            lease_valid=task.dedup_lease_valid(),
        )
        observer.pipeline().hdel("busy", pid).rpush(
            "ended", json.dumps(entry)
        ).execute()


def _task(mode: str) -> Any:
    def work(
        self: DedupTask,
        key: str,
        seq: int,
        pause: float,
        retry: bool = False,
        outbox: bool = False,
    ) -> int:
        return _body(self, mode, key, seq, pause, retry=retry, outbox=outbox)

    work.__name__ = work.__qualname__ = mode
    return app.task(
        base=DedupTask,
        bind=True,
        name=f"soak.{mode}",
        dedup_key=("key",),
        dedup_lock=mode,
        max_retries=3,
        dedup_max_running=2 if os.environ.get("SABOTAGE") == "overlap" else None,
    )(work)


#: The task of each lock mode.
TASKS: Final = {mode: _task(mode) for mode in MODES}
