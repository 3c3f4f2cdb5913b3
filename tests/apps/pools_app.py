"""The scenario app plus a task for the pool tests (``tests/scenarios/test_pools.py``).

A worker started with ``-A tests.apps.pools_app`` runs every task of
:mod:`tests.apps.scenario_app` and :func:`hold`, which records the lease
member its body ran under, so a test can tell which thread or greenlet ran it.
"""

from __future__ import annotations

import time
from typing import Any

from celery_dedup import DedupTask
from tests.apps.scenario_app import app, mark_started, record

__all__ = ["app", "hold"]


def compute(seconds: float) -> int:
    """Burn the CPU for ``seconds`` without yielding to anything (no I/O, no
    sleep: under gevent no other greenlet runs meanwhile)."""
    until = time.monotonic() + seconds
    spins = 0
    while time.monotonic() < until:
        spins += sum(range(200))
    return spins


@app.task(
    base=DedupTask,
    bind=True,
    dedup_key=("job",),
    dedup_lock="while_executing",
)
def hold(self: DedupTask, job: str, seconds: float, burst: float = 0.0) -> str:
    """Hold the key of ``job`` for ``seconds``: in steps of a 0.05 s sleep,
    each after ``burst`` seconds of computing without yielding."""
    started = time.time()
    mark_started("hold", self.request.id)
    lease: Any = getattr(self.request, "dedup_lease", None)
    deadline = time.monotonic() + seconds
    while True:
        if burst:
            compute(burst)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    record(
        "hold",
        self.request.id,
        started,
        job=job,
        member=lease.member if lease is not None else None,
        fence=getattr(self.request, "dedup_fence", None),
        lease_valid=self.dedup_lease_valid(),
    )
    return job
