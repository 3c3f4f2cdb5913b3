"""What a scenario works with: the tasks, the records, Redis and the processes.

A :class:`Lab` is built once per demo run; each scenario variant gets a
:class:`Run` of it, named ``<scenario>-<variant>`` (the name is an argument of
every call, so each run has its own dedup keys and records).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import kombu
import redis
from celery import Task

from ..store import HELD_PARTS, Layout
from . import app, record
from .processes import DemoError, Processes
from .progress import Progress
from .settings import DemoSettings
from .store import Store


@dataclasses.dataclass
class Figures:
    """What one scenario variant did (the JSON result and the table's row)."""

    executions: int = 0  # bodies that started
    completed: int = 0  # bodies that ran to the end (and wrote, if they write)
    max_at_once: int = 0  # the most bodies inside the job at one moment
    events: int | None = None  # event rows written (None: the job writes none)
    business_rows: int | None = None
    lost: int = 0  # jobs asked for that never completed
    keys_held: int = 0  # dedup claim/lease keys left in Redis afterwards
    calls: int = 0  # apply_async calls made
    published: int = 0  # calls that published a message
    deduplicated: int = 0  # calls answered with the existing task instead
    deliveries: int = 0  # deliveries that reached a worker process
    dropped: int = 0  # deliveries ended by celery-dedup before the body
    rejected: int = 0  # writes rejected as a zombie's (LockLostError)
    killed: int = 0  # bodies whose process the demo killed
    backlog_max: int | None = None  # the most messages waiting in the queue
    seconds: float = 0.0
    note: str = ""


class Lab:
    """The demo's Redis, database and processes, shared by every scenario."""

    def __init__(
        self,
        settings: DemoSettings,
        processes: Processes,
        store: Store,
        progress: Progress,
    ) -> None:
        self.settings = settings
        self.processes = processes
        self.store = store
        self.progress = progress
        self.redis = redis.Redis.from_url(settings.redis_url)

    def close(self) -> None:
        self.redis.close()

    def held_keys(self) -> int:
        """Dedup claim and lease keys in Redis now (SCAN, never KEYS)."""
        layout = Layout(self.settings.key_prefix)
        return sum(
            1
            for name in self.redis.scan_iter(match=layout.pattern(), count=500)
            if (parsed := layout.parse(name)) and parsed[1] in HELD_PARTS
        )

    def queue_length(self) -> int:
        """Messages waiting in the demo's queue."""
        name = self.settings.queue
        if self.settings.shared_redis:
            name = f"{self.settings.namespace}:{name}"
        return int(self.redis.llen(name))

    def redeliver(self) -> None:
        """What the broker does once a visibility timeout passes: hand every
        message unacknowledged for over 1 s to a consumer again (one pass of
        kombu's restore, as a worker with ``visibility_timeout=1`` would run)."""
        options: dict[str, Any] = {"visibility_timeout": 1}
        if self.settings.shared_redis:
            options["global_keyprefix"] = f"{self.settings.namespace}:"
        with kombu.Connection(
            self.settings.redis_url, transport_options=options
        ) as connection:
            channel: Any = connection.default_channel
            channel.qos.restore_visible(num=100, interval=1)

    def publish_burst(
        self, task_name: str, kwargs: dict[str, Any], *, each: int, span: float
    ) -> list[dict[str, Any]]:
        """Three publisher processes, each ``each`` calls over ``span`` seconds,
        starting together; what every call returned."""
        start_at = time.time() + 1.0  # time for them to import Celery first
        argv = [sys.executable, "-m", "celery_dedup.demo.publish", task_name,
                json.dumps(kwargs), str(each), str(span), str(start_at)]  # fmt: skip
        names = [f"publisher{n}" for n in range(1, 4)]
        publishers = [
            self.processes.spawn(argv, name=name, stdout=subprocess.PIPE)
            for name in names
        ]
        calls = []
        for name, publisher in zip(names, publishers, strict=True):
            out, _ = publisher.communicate(timeout=span + 30)
            self.processes.end(publisher)
            if publisher.returncode != 0:
                raise DemoError(f"{name} failed:\n{self.processes.stderr(name)}")
            calls += [json.loads(line) for line in out.decode().splitlines()]
        return calls


class Run:
    """One scenario variant: its task, records and figures."""

    def __init__(self, lab: Lab, scenario: str, variant: str) -> None:
        self.lab = lab
        self.variant = variant
        self.name = f"{scenario}-{variant}"
        self.killed_at: dict[int, float] = {}
        self.figures = Figures()

    def task(self, job: str) -> Task[Any, Any]:
        return app.task_for(self.variant, job)

    def call(self, job: str, key: str, **kwargs: Any) -> Any:
        """``apply_async`` of ``job`` for ``key``, counted in the figures."""
        result = self.task(job).apply_async(
            kwargs={"run": self.name, "job": key, **kwargs}
        )
        self.figures.calls += 1
        if getattr(result, "deduplicated", False):
            self.figures.deduplicated += 1
        else:
            self.figures.published += 1
        return result

    def entries(self, kind: str) -> list[dict[str, Any]]:
        return record.entries(self.lab.redis, self.lab.settings, self.name, kind)

    def started(self) -> list[dict[str, Any]]:
        return self.entries(record.STARTED)

    def finished(self) -> list[dict[str, Any]]:
        return self.entries(record.FINISHED)

    def settled(self, published: int) -> bool:
        """Every published message ran to its end or was dropped."""
        ended = len(self.finished()) + len(self.entries(record.DROPPED))
        return ended >= published

    def wait(self, check: Callable[[], object], timeout: float) -> bool:
        """Poll ``check`` for up to ``timeout`` s; whether it came true."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def first_body(self, timeout: float = 20) -> dict[str, Any]:
        """The first body to start (its task id, pid and start time)."""
        if not self.wait(self.started, timeout):
            raise TimeoutError(f"{self.name}: no body started in {timeout:g}s")
        return self.started()[0]

    def kill(self, pid: int) -> None:
        """SIGKILL the pool process running a body, as the OOM killer would."""
        os.kill(pid, signal.SIGKILL)
        self.killed_at[pid] = time.time()
        self.figures.killed += 1

    def sleep_until(self, moment: float) -> None:
        time.sleep(max(0.0, moment - time.time()))

    def _end(self, body: dict[str, Any], ends: dict[tuple[str, int], float]) -> float:
        """When a body ended: its own record, else when the demo killed it."""
        killed = self.killed_at.get(body["pid"], body["start"])
        return float(ends.get((body["task_id"], body["pid"]), killed))

    def measure(self, aggregate: str | None) -> Figures:
        """Fill in the figures from the records, the database and Redis."""
        figures = self.figures
        started, finished = self.started(), self.finished()
        ends = {(f["task_id"], f["pid"]): f["end"] for f in finished}
        spans = [(s["start"], self._end(s, ends)) for s in started]
        figures.executions = len(started)
        figures.completed = sum(f["outcome"] == "done" for f in finished)
        figures.rejected = sum(f["outcome"] == "rejected" for f in finished)
        figures.max_at_once = record.max_overlap(spans)
        figures.lost = 0 if figures.completed else 1
        figures.deliveries = len(self.entries(record.DELIVERED))
        figures.dropped = len(self.entries(record.DROPPED))
        if aggregate is not None:
            figures.events, figures.business_rows = self.lab.store.counts(
                f"{self.name}:{aggregate}"
            )
        # A release follows the body's last record by a moment: let it land.
        self.wait(lambda: self.lab.held_keys() == 0, 2.0)
        figures.keys_held = self.lab.held_keys()
        return figures
