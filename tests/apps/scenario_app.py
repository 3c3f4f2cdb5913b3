"""The Celery app that the integration and scenario tests run in real workers.

Its Redis comes from ``DEDUP_TEST_REDIS_URL`` (set by the rig for the worker
processes) or from :func:`configure` (called by the rig in the test process).
Each task body records its run in Redis, so a test can count executions and
find overlaps after the fact.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded
from celery.signals import task_prerun

from celery_dedup import DedupTask, signals
from celery_dedup.connection import reset

app = Celery("scenario_app")
_recorder: dict[str, redis.Redis] = {}


def configure(url: str, dedup_url: str | None = None, **extra: Any) -> None:
    """Point the app (broker, results, dedup keys, recorder) at ``url``.

    ``dedup_url`` puts the dedup keys on another Redis; ``extra`` settings
    (for the workers: the JSON in ``DEDUP_TEST_CONF``) are applied on top.
    """
    base = url.rsplit("/", 1)[0]
    app.conf.update(
        broker_url=f"{base}/0",
        result_backend=f"{base}/1",
        dedup_redis_url=dedup_url or f"{base}/0",
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        task_default_queue=os.environ.get("DEDUP_TEST_QUEUE", "celery"),
        result_expires=600,
        **extra,
    )
    reset(app)
    _recorder["client"] = redis.Redis.from_url(f"{base}/2")


if "DEDUP_TEST_REDIS_URL" in os.environ:
    configure(
        os.environ["DEDUP_TEST_REDIS_URL"],
        os.environ.get("DEDUP_TEST_DEDUP_REDIS_URL"),
        **json.loads(os.environ.get("DEDUP_TEST_CONF", "{}")),
    )


@task_prerun.connect
def _delivered(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """Every delivery that reaches a process, run or not (redeliveries too)."""
    _recorder["client"].rpush(
        f"delivered:{task.name.rsplit('.', 1)[-1]}", task_id or ""
    )


@signals.lease_acquired.connect
def _acquired(sender: Any = None, signal: Any = None, **kwargs: Any) -> None:
    _recorder["client"].rpush("signals", json.dumps(["lease_acquired", sender, kwargs]))


@signals.lease_released.connect
def _released(sender: Any = None, signal: Any = None, **kwargs: Any) -> None:
    _recorder["client"].rpush("signals", json.dumps(["lease_released", sender, kwargs]))


@signals.lease_lost.connect
def _lost(
    key: str = "", task_id: str | None = None, reason: str = "", **_: Any
) -> None:
    _recorder["client"].rpush(
        "lease_lost", json.dumps({"task_id": task_id, "reason": reason})
    )


def record(name: str, task_id: str | None, started: float, **extra: Any) -> None:
    """Append one finished run of ``name`` to the Redis list ``runs:<name>``."""
    entry = {
        "task_id": task_id,
        "start": started,
        "end": time.time(),
        "pid": os.getpid(),
    }
    _recorder["client"].rpush(f"runs:{name}", json.dumps({**entry, **extra}))


def mark_started(name: str, task_id: str | None) -> None:
    """Say, before the body sleeps, which process runs it (to kill it)."""
    _recorder["client"].rpush(
        f"started:{name}", json.dumps({"task_id": task_id, "pid": os.getpid()})
    )


@app.task(base=DedupTask, bind=True)
def close_campaign(self: DedupTask, campaign_id: int, pause: float = 0.5) -> int:
    """Seed 000's job: find the winners of one campaign (takes ``pause`` s)."""
    started = time.time()
    mark_started("close_campaign", self.request.id)
    time.sleep(pause)
    record(
        "close_campaign",
        self.request.id,
        started,
        campaign_id=campaign_id,
        fence=getattr(self.request, "dedup_fence", None),
        lease_valid=self.dedup_lease_valid(),
    )
    return campaign_id


@app.task(base=DedupTask, bind=True, dedup_key=("x",))
def add(self: DedupTask, x: int, y: int = 0) -> int:
    """Keyed on ``x`` only."""
    record("add", self.request.id, time.time(), x=x, y=y)
    return x + y


class Flaky(Exception):
    """The failure that ``flaky`` retries on."""


@app.task(
    base=DedupTask,
    bind=True,
    autoretry_for=(Flaky,),
    retry_backoff=False,
    default_retry_delay=0.2,
    max_retries=5,
)
def flaky(self: DedupTask, job: str, failures: int = 2, pause: float = 0.0) -> str:
    """Fails ``failures`` times, then succeeds; each attempt takes ``pause`` s."""
    started = time.time()
    time.sleep(pause)
    record("flaky", self.request.id, started, retries=self.request.retries)
    if self.request.retries < failures:
        raise Flaky(job)
    return job


@app.task(base=DedupTask, bind=True)
def doomed(self: DedupTask, job: str) -> None:
    """Always fails, no retries: a final failure."""
    record("doomed", self.request.id, time.time())
    raise RuntimeError(job)


@app.task(base=DedupTask, bind=True, soft_time_limit=1, time_limit=2)
def ending(self: DedupTask, how: str, pause: float = 0.0) -> str:
    """Ends its body as ``how`` says: ok, soft (limit), hard (limit), reject, ignore."""
    started = time.time()
    mark_started("ending", self.request.id)
    try:
        if how in ("soft", "hard"):
            while True:  # past the soft limit (1 s), and for "hard" past 2 s
                try:
                    time.sleep(0.1)
                except SoftTimeLimitExceeded:
                    if how == "soft":
                        raise
        time.sleep(pause)
        if how == "reject":
            raise Reject("rejected", requeue=False)
        if how == "ignore":
            raise Ignore()
        return how
    finally:
        record("ending", self.request.id, started, how=how)


def winners_table(metadata: Any, outbox_table: str) -> Any:
    """The business table that ``find_winners`` writes beside its event."""
    import sqlalchemy as sa

    name = f"{outbox_table}_winners"
    if name in metadata.tables:
        return metadata.tables[name]
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("campaign_id", sa.Integer, nullable=False),
        sa.Column("task_id", sa.String(64), nullable=False),
    )


@app.task(base=DedupTask, bind=True, dedup_key=("campaign_id",))
def find_winners(self: DedupTask, campaign_id: int, pause: float = 0.5) -> bool:
    """Seed 000's job with its side effects: a business row and one event,
    written in one transaction after ``pause`` seconds of work."""
    from sqlalchemy.orm import Session

    from celery_dedup.outbox import Outbox

    started = time.time()
    mark_started("find_winners", self.request.id)
    time.sleep(pause)
    outbox = Outbox.from_app(app)
    winners = winners_table(outbox.metadata, outbox.table_name)
    with Session(outbox.engine) as session, session.begin():
        session.execute(
            winners.insert().values(campaign_id=campaign_id, task_id=self.request.id)
        )
        created = outbox.add(
            session,
            "CAMPAIGN_CLOSING_FIND_QUEST_WINNERS",
            aggregate_id=f"campaign:{campaign_id}",
            payload={"campaign_id": campaign_id},
        )
    record("find_winners", self.request.id, started, created=created)
    return created


@app.task(
    base=DedupTask,
    bind=True,
    dedup_key=lambda args, kwargs: "reports",
    dedup_lock="while_executing",
    dedup_max_running=2,
)
def write_report(self: DedupTask, n: int, after: int | None = None) -> bool:
    """Two reports may be written at once (``dedup_max_running=2``), each with
    its own event. With ``after``, waits until report ``after``'s event is
    committed before it writes its own."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from celery_dedup.outbox import Outbox

    started = time.time()
    mark_started("write_report", self.request.id)
    outbox = Outbox.from_app(app)
    table = outbox.table
    deadline = time.monotonic() + 30
    while after is not None and time.monotonic() < deadline:
        with outbox.engine.connect() as conn:
            found = conn.execute(
                sa.select(table.c.id).where(table.c.aggregate_id == f"report:{after}")
            ).first()
        if found is not None:
            break
        time.sleep(0.05)
    with Session(outbox.engine) as session, session.begin():
        created = outbox.add(session, "REPORT_WRITTEN", aggregate_id=f"report:{n}")
    record("write_report", self.request.id, started, created=created)
    return created
