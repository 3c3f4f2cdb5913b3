"""More tasks for the real workers, on ``scenario_app``'s app: canvas members,
and bodies shaped for the regression tests of the correctness core.

A worker started with ``app_module="tests.apps.canvas_app"`` knows these and
every ``scenario_app`` task (this module imports that one, and its ``app``).
Each body records its run as ``scenario_app``'s do.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from celery import Task

from celery_dedup import DedupTask
from tests.apps.scenario_app import _recorder, app, mark_started, record

__all__ = ["app"]


def tick(name: str, task_id: str | None) -> None:
    """One progress mark of a body that may be killed before it records a run."""
    _recorder["client"].rpush(
        f"ticks:{name}", json.dumps({"task_id": task_id, "at": time.time()})
    )


def _timed(task: Task, name: str, value: Any, pause: float) -> Any:  # type: ignore[type-arg]
    started = time.time()
    mark_started(name, task.request.id)
    time.sleep(pause)
    record(name, task.request.id, started, value=value)
    return value


@app.task(base=DedupTask, bind=True, dedup_key=("n",))
def member(self: DedupTask, n: int, pause: float = 0.3) -> int:
    """A canvas member keyed on ``n`` (default lock: until_executed)."""
    return _timed(self, "member", n, pause)  # type: ignore[no-any-return]


@app.task(base=DedupTask, bind=True, dedup_key=("n",), dedup_lock="while_executing")
def solo(self: DedupTask, n: int, pause: float = 0.5) -> int:
    """A canvas member keyed on ``n`` that holds its key only while it runs."""
    return _timed(self, "solo", n, pause)  # type: ignore[no-any-return]


@app.task(bind=True)
def after(self: Task, value: Any) -> list[Any]:  # type: ignore[type-arg]
    """A plain Celery callback: a chain's next step, a chord's body, a link."""
    record("after", self.request.id, time.time(), value=value)
    return ["after", value]


@app.task(base=DedupTask, bind=True, default_retry_delay=0.5)
def survivor(self: DedupTask, n: int, pause: float = 3.0) -> int:
    """Retried half a second after its process is lost (retry_on_worker_lost)."""
    return _timed(self, "survivor", n, pause)  # type: ignore[no-any-return]


@app.task(base=DedupTask, bind=True, dedup_key=("n",), time_limit=1)
def ticking(self: DedupTask, n: int, pause: float = 3.0) -> int:
    """Marks its progress every 20 ms; past 1 s the pool kills it. It ignores
    SIGTERM, as a body in C code would, so it dies by billiard's SIGKILL,
    0.1 s after the hard time limit was reported."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        started = time.time()
        mark_started("ticking", self.request.id)
        while True:
            tick("ticking", self.request.id)
            if time.time() - started >= pause:
                break
            time.sleep(0.02)
        record("ticking", self.request.id, started)
        return n
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.task(base=DedupTask, bind=True, dedup_key=("n",))
def handover(self: DedupTask, n: int, hops: int = 1, countdown: float = 2.0) -> int:
    """Replaces itself ``hops`` times by the same call of itself (same key),
    each replacement published with ``countdown``."""
    mark_started("handover", self.request.id)
    if hops > 0:
        replacement = handover.si(n, hops - 1, countdown).set(countdown=countdown)
        raise self.replace(replacement)
    record("handover", self.request.id, time.time(), value=n)
    return n


@app.task(base=DedupTask, bind=True, typing=False)
def untyped(self: DedupTask, a: int, b: int) -> int:
    """Celery does not check its arguments at the call (``typing=False``)."""
    return a + b


#: The processes that computed ``keyed_late``'s key.
KEYED_IN: list[int] = []


def late_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    KEYED_IN.append(os.getpid())
    return f"late-{args[0] if args else kwargs['n']}"


@app.task(base=DedupTask, bind=True, dedup_lock="while_executing", dedup_key=late_key)
def keyed_late(self: DedupTask, n: int) -> int:
    """While executing only: keyed where it runs, never at enqueue."""
    record("keyed_late", self.request.id, time.time())
    return n


@app.task(base=DedupTask, bind=True, serializer="pickle")
def pickled(self: DedupTask, error: BaseException) -> str:
    """Takes an exception instance (pickle serializer)."""
    record("pickled", self.request.id, time.time())
    return repr(error)
