"""Set up, replay the scenarios, tear down: the demo from start to finish.

Everything the demo starts (a private redis-server, the workers, publisher
processes) and writes (a temporary folder with the SQLite database and logs;
on a Redis given with ``--redis-url``, keys under its own prefix) is removed
in a ``finally``, also after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import redis

from . import app
from .lab import Figures, Lab, Run
from .processes import (
    CONCURRENCY,
    Processes,
    Worker,
    check_redis,
    start_redis,
    wait_for,
)
from .progress import Progress
from .scenarios import SCENARIOS, Scenario
from .settings import DemoSettings
from .store import Store

WORKERS = 2
LABELS = {app.PLAIN: "plain Celery", app.DEDUP: "DedupTask"}


@dataclasses.dataclass
class Outcome:
    """One scenario: both variants' figures and the verdicts."""

    scenario: Scenario
    variants: dict[str, Figures]

    @property
    def meets_design(self) -> bool:
        figures = self.variants.get(app.DEDUP)
        return figures is not None and self.scenario.meets_design(figures)

    @property
    def shows_problem(self) -> bool | None:
        check = self.scenario.shows_problem
        figures = self.variants.get(app.PLAIN)
        return None if check is None or figures is None else check(figures)


@dataclasses.dataclass
class DemoResult:
    outcomes: list[Outcome]
    seconds: float
    redis_url: str
    private_redis: bool

    @property
    def ok(self) -> bool:
        return all(outcome.meets_design for outcome in self.outcomes)


def run_demo(
    scenario_ids: Sequence[str], progress: Progress, redis_url: str | None = None
) -> DemoResult:
    """Replay ``scenario_ids`` with both variants; clean up whatever happens."""
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="celery-dedup-demo-"))
    processes = Processes(workdir)
    settings: DemoSettings | None = None
    store: Store | None = None
    shared = redis_url is not None
    try:
        if redis_url is None:
            redis_url = start_redis(processes)
            progress.say(f"Started redis-server at {redis_url} (in {workdir})")
        else:
            check_redis(redis_url)
            progress.say(f"Using the Redis at {redis_url} (work folder {workdir})")
        settings = _settings(redis_url, workdir, shared=shared)
        processes.env.update(settings.to_env())
        app.configure(settings)
        store = Store(settings.database_url)
        store.create()
        _start_workers(processes, settings, progress)
        lab = Lab(settings, processes, store, progress)
        try:
            outcomes = [_play(lab, SCENARIOS[s]) for s in scenario_ids]
        finally:
            lab.close()
        return DemoResult(outcomes, time.monotonic() - began, redis_url, not shared)
    finally:
        with _no_interrupts():
            progress.finish_line()
            processes.end_all()
            if settings is not None and settings.shared_redis:
                _delete_keys(settings)
            if store is not None:
                store.close()
            shutil.rmtree(workdir, ignore_errors=True)


def _settings(redis_url: str, workdir: Path, *, shared: bool) -> DemoSettings:
    namespace = "celery-dedup-demo"
    if shared:  # a Redis others use: a name of our own, deleted at the end
        namespace += f"-{uuid.uuid4().hex[:8]}"
    return DemoSettings(
        redis_url=redis_url,
        namespace=namespace,
        queue="celery-dedup-demo",
        database_url=f"sqlite:///{workdir / 'demo.sqlite3'}",
        shared_redis=shared,
    )


def _start_workers(
    processes: Processes, settings: DemoSettings, progress: Progress
) -> None:
    progress.say(f"Starting {WORKERS} celery workers ({CONCURRENCY} processes each)")
    workers = [
        Worker(processes, f"worker{n}", settings.queue) for n in range(1, WORKERS + 1)
    ]
    wait_for(lambda: all(w.ready() for w in workers), 60, "the workers to be ready")


def _play(lab: Lab, scenario: Scenario) -> Outcome:
    variants = {}
    for variant in app.VARIANTS:
        run = Run(lab, scenario.id, variant)
        lab.progress.start(scenario.title, LABELS[variant])
        began = time.monotonic()
        figures = scenario.play(run)
        figures.seconds = round(time.monotonic() - began, 1)
        lab.progress.done(figures.note)
        variants[variant] = figures
    return Outcome(scenario, variants)


def _delete_keys(settings: DemoSettings) -> None:
    """Delete every key the demo wrote to a Redis it did not start."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        batch: list[Any] = []
        for key in client.scan_iter(match=f"{settings.namespace}:*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Let a second Ctrl-C (or a SIGTERM) not cut the clean-up short."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
