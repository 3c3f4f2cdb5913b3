"""Chaos soak: DedupTask under killed, paused and disconnected workers.

    python -m benchmarks.soak [--tasks 5000] [--keys 500] [--workers 4]
        [--concurrency 2] [--rate 50] [--duration-bound 900] [--lock-ttl 5]
        [--kill-every 3] [--seed 1] [--json PATH] [--keep-logs DIR]

Starts three private redis-servers on free ports (the broker; the dedup
lock store, kept on disk; an observer for results and records, which no
fault touches), a SQLite outbox, and ``--workers`` real ``celery worker``
processes (prefork, ``--concurrency`` children each, ``task_acks_late`` and
``task_reject_on_worker_lost``) running :mod:`benchmarks.soak_app`.

It then sends ``--tasks`` calls at ``--rate`` per second over ``--keys``
keys (the lock mode is the key's: key ``i`` has mode ``i % 5``; 40% of the
calls repeat a recent key, in bursts of duplicates), some with a countdown or
an eta, some retrying once, some writing an outbox event. Meanwhile:

- every ``--kill-every`` seconds a worker child is SIGKILLed (one running a
  body, when there is one);
- at 20% of the sending, the first worker is SIGSTOPped (its whole process
  group) while a body of the ``zombie`` key runs there, for longer than the
  lease; a second call of that key runs on another worker meanwhile, then
  the first worker gets SIGCONT: the zombie's fenced outbox write must fail;
- at 50%, the lock-store Redis is restarted (from its append-only file);
- at 75%, every broker connection is dropped (``CLIENT KILL TYPE normal``).

When every accepted task has a final state and the queues are empty (or
``--duration-bound`` seconds after the start, whichever comes first), it
checks the invariants, prints them as a table and exits 1 if one failed:
no task lost (each accepted task, or the task a duplicate was collapsed
onto, ran), at most one body per key at a time among bodies that held their
lease, fencing tokens in start order, outbox rows equal to the distinct
events written (and one ledger row each), no key held past its hold, and
every fault injected at least once.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib.metadata
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Final

import psutil
import sqlalchemy as sa
from celery import states

from benchmarks import soak_app
from celery_dedup import DuplicateTaskError, LockLostError
from celery_dedup.outbox import Outbox
from tests.rig import RedisServer, Worker, max_overlap, queue_length

QUEUE: Final = "soak"
MODES: Final = soak_app.MODES
#: Mode of the key that the paused worker runs when it is stopped.
ZOMBIE_MODE: Final = "while_executing"
#: What the workers' logs say they did: a figure, and the line that counts.
LOG_EVENTS: Final = {
    "rescheduled: key held by another task": r"Rescheduled .*: task \S+ holds the key",
    "rescheduled: own earlier delivery running": r"Rescheduled .*another delivery",
    "rescheduled: lock store unreachable": r"Rescheduled .*: Redis unavailable",
    "leases freed for killed children": r"Freeing the lease of",
    "copies dropped, result never stored": r"its process died before its result",
    "releases deferred (lock store down)": r"Could not release",
    "leases lost (found by the heartbeat or at the end)": r"Lease lost on",
    "outbox writes rejected by the fence": r"Outbox write rejected",
    "broker connection lost, re-established": r"Connection to broker lost",
}
#: The states a task ends in.
FINAL: Final = frozenset({states.SUCCESS, states.FAILURE, states.REVOKED})


@dataclasses.dataclass
class Call:
    """One ``apply_async`` the soak makes, and what it answered."""

    seq: int
    key: str
    mode: str
    pause: float
    retry: bool = False
    outbox: bool = False
    delay: float = 0.0  # seconds, as a countdown or an eta
    eta: bool = False
    probe: str = ""  # "bait" or "successor": the zombie probe's calls
    sent_at: float = 0.0
    task_id: str = ""
    deduplicated: bool = False
    refused: int = 0


@dataclasses.dataclass
class Body:
    """One execution of a body, from the observer's records."""

    task_id: str
    mode: str
    dedup_key: str
    fence: int | None
    pid: int
    start: float
    end: float | None = None
    outcome: str = ""
    lease_valid: bool = True
    wrote: Any = None
    killed: bool = False


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--tasks", type=int, default=5000, help="calls to make (default 5000)")
    add("--keys", type=int, default=500, help="distinct keys (default 500)")
    add("--workers", type=int, default=4, help="worker processes (default 4)")
    add("--concurrency", type=int, default=2, help="children per worker")
    add("--rate", type=float, default=50.0, help="calls per second (default 50)")
    add(
        "--duration-bound",
        type=float,
        default=900.0,
        help="seconds from the start by which everything must be done",
    )
    add("--lock-ttl", type=float, default=5.0, help="dedup_lock_ttl (default 5)")
    add(
        "--expired-ttl",
        type=float,
        default=5.0,
        help="dedup_ttl of the until_expired task (default 5)",
    )
    add("--kill-every", type=float, default=3.0, help="seconds between SIGKILLs")
    add(
        "--redis-down",
        type=float,
        default=2.0,
        help="seconds the lock-store Redis stays down when restarted (default 2)",
    )
    add("--seed", type=int, default=1)
    add("--json", type=Path, default=None, help="write the results here as JSON")
    add("--keep-logs", type=Path, default=None, help="copy the logs to this folder")
    options = parser.parse_args(argv)
    if options.workers < 2:
        parser.error("--workers: at least 2 (the paused one and another)")
    if options.keys < len(MODES):
        parser.error(f"--keys: at least {len(MODES)} (one per lock mode)")
    return options


def plan_calls(options: argparse.Namespace) -> list[Call]:
    """The workload, the same for a seed: keys, modes and flags of each call."""
    rng = random.Random(options.seed)
    calls: list[Call] = []
    for seq in range(options.tasks):
        if calls and rng.random() < 0.4:  # a burst: a key called just before
            index = int(rng.choice(calls[-10:]).key[1:])
        else:
            index = rng.randrange(options.keys)
        call = Call(
            seq=seq,
            key=f"k{index}",
            mode=MODES[index % len(MODES)],
            pause=round(rng.uniform(0.02, 0.2), 3),
            retry=rng.random() < 0.1,
            outbox=rng.random() < 0.3,
        )
        timing = rng.random()
        if timing < 0.2:
            call.delay = round(rng.uniform(0.5, 3.0), 2)
            call.eta = timing < 0.05
        calls.append(call)
    return calls


def versions() -> dict[str, str]:
    found = {
        name: importlib.metadata.version(name)
        for name in ("celery", "kombu", "redis", "billiard", "sqlalchemy")
    }
    server = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    found["redis-server"] = next(
        (w.removeprefix("v=") for w in server if w.startswith("v=")), "?"
    )
    found["python"] = platform.python_version()
    return found


class Soak:
    """The servers, the workers, the calls and the faults of one soak."""

    def __init__(self, options: argparse.Namespace, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.rng = random.Random(options.seed + 1)
        self.broker = RedisServer(self._dir("broker"))
        self.locks = RedisServer(self._dir("locks"), persistent=True)
        self.observer = RedisServer(self._dir("observer"))
        self.outbox_url = f"sqlite:///{workdir / 'outbox.db'}?timeout=60"
        self.workers: list[Worker] = []
        self.calls = plan_calls(options)
        self.probes: list[Call] = []
        self.refusals: collections.Counter[str] = collections.Counter()
        self.kills: list[dict[str, Any]] = []
        self.faults: dict[str, Any] = {
            "SIGKILL (worker child)": 0,
            "SIGKILL of a running body": 0,
            "SIGSTOP past the lease": 0,
            "lock-store Redis restarted": 0,
            "broker connections dropped": 0,
        }
        self.fault_log: list[str] = []
        self.stopped: Worker | None = None
        self.sending_done = threading.Event()
        self.started_at = time.monotonic()
        self.errors: list[str] = []

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir()
        return path

    # -- set-up ---------------------------------------------------------------

    def start(self) -> None:
        for server in (self.broker, self.locks, self.observer):
            server.start()
        env = {
            "SOAK_BROKER_URL": self.broker.url(),
            "SOAK_DEDUP_URL": self.locks.url(),
            "SOAK_OBSERVER_URL": self.observer.url(),
            "SOAK_OUTBOX_URL": self.outbox_url,
            "SOAK_QUEUE": QUEUE,
            "SOAK_LOCK_TTL": str(self.options.lock_ttl),
            "SOAK_EXPIRED_TTL": str(self.options.expired_ttl),
        }
        soak_app.configure(
            broker_url=env["SOAK_BROKER_URL"],
            dedup_url=env["SOAK_DEDUP_URL"],
            observer_url=env["SOAK_OBSERVER_URL"],
            outbox_url=self.outbox_url,
            queue=QUEUE,
            lock_ttl=self.options.lock_ttl,
            expired_ttl=self.options.expired_ttl,
        )
        outbox = Outbox(self.outbox_url, table_name=soak_app.TABLE)
        soak_app.ledger_table(outbox.metadata)
        outbox.metadata.create_all(outbox.engine)
        outbox.close()
        logs = self._dir("logs")
        for n in range(1, self.options.workers + 1):
            name = f"soak{n}"
            self.workers.append(
                Worker(
                    "benchmarks.soak_app",
                    f"{QUEUE},{QUEUE}.{name}",  # the shared queue and its own
                    env,
                    logs,
                    name=name,
                    concurrency=self.options.concurrency,
                )
            )
        with concurrent.futures.ThreadPoolExecutor(len(self.workers)) as pool:
            list(pool.map(lambda worker: worker.start(120), self.workers))
        self.observe = self.observer.client(0)
        self.results = self.observer.client(1)
        self.started_at = time.monotonic()

    def stop(self) -> None:
        if self.stopped is not None and self.stopped.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.stopped.pid, signal.SIGCONT)
        for worker in self.workers:
            try:
                worker.stop()
            except Exception as exc:  # keep stopping the others
                self.errors.append(f"stopping {worker.name}: {exc!r}")
        for server in (self.broker, self.locks, self.observer):
            server.stop()

    def keep_logs(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for log in self.workdir.rglob("*.log"):
            shutil.copy(log, folder / log.name)
        for log in self.workdir.rglob("*.stderr"):
            shutil.copy(log, folder / log.name)

    # -- calls ----------------------------------------------------------------

    def send(self, call: Call, queue: str = QUEUE) -> None:
        """Make the call; a refusal (Redis or broker down) is tried again."""
        task = soak_app.TASKS[call.mode]
        kwargs = {"retry": call.retry, "outbox": call.outbox}
        while True:
            options: dict[str, Any] = {"queue": queue}
            if call.eta:
                options["eta"] = datetime.datetime.now(
                    datetime.timezone.utc
                ) + datetime.timedelta(seconds=call.delay)
            elif call.delay:
                options["countdown"] = call.delay
            call.sent_at = time.time()
            try:
                result = task.apply_async(
                    (call.key, call.seq, call.pause), kwargs, **options
                )
            except Exception as exc:  # BackendUnavailableError, kombu's errors
                call.refused += 1
                self.refusals[type(exc).__name__] += 1
                if call.refused > 100:
                    raise
                time.sleep(0.2)
                continue
            call.task_id = result.id
            call.deduplicated = bool(result.deduplicated)
            return

    def send_all(self) -> None:
        rate = self.options.rate
        began = time.monotonic()
        for n, call in enumerate(self.calls):
            wait = began + n / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self.send(call)
            if n and n % 1000 == 0:
                self.progress(f"{n} calls sent")
        self.sending_done.set()

    def progress(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started_at:6.1f}s] {text}", flush=True)

    # -- faults ---------------------------------------------------------------

    def log_fault(self, text: str) -> None:
        self.fault_log.append(f"{time.monotonic() - self.started_at:.1f}s {text}")
        self.progress(text)

    def chaos(self) -> None:
        """Inject the faults until the sending is done (each runs once, the
        kills every ``--kill-every`` seconds)."""
        span = len(self.calls) / self.options.rate
        began = time.monotonic()
        plan = [
            (0.2 * span, self.pause_a_worker),
            (0.5 * span, self.restart_lock_store),
            (0.75 * span, self.drop_broker_connections),
        ]
        threads: list[threading.Thread] = []
        next_kill = min(self.options.kill_every, span / 4)
        while plan or not self.sending_done.is_set():
            now = time.monotonic() - began
            while plan and plan[0][0] <= now:
                _, fault = plan.pop(0)
                thread = threading.Thread(target=self._guarded, args=(fault,))
                thread.start()
                threads.append(thread)
            if now >= next_kill and not self.sending_done.is_set():
                self._guarded(self.kill_a_child)
                next_kill += self.options.kill_every
            time.sleep(0.05)
        for thread in threads:
            thread.join()

    def _guarded(self, fault: Any) -> None:
        try:
            fault()
        except Exception as exc:
            self.errors.append(f"{fault.__name__}: {exc!r}")
            self.log_fault(f"{fault.__name__} failed: {exc!r}")

    def children(self) -> dict[int, Worker]:
        found = {}
        for worker in self.workers:
            if worker is self.stopped or worker.process is None:
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(worker.pid).children():
                    found[child.pid] = worker
        return found

    def kill_a_child(self) -> None:
        children = self.children()
        busy = [int(pid) for pid in self.observe.hkeys("busy")]
        running = [pid for pid in busy if pid in children]
        if not children:
            return
        pid = self.rng.choice(running or sorted(children))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.kills.append({"pid": pid, "at": time.time()})
        self.observe.hdel("busy", str(pid))
        self.faults["SIGKILL (worker child)"] += 1
        if pid in running:
            self.faults["SIGKILL of a running body"] += 1

    def pause_a_worker(self) -> None:
        """SIGSTOP the first worker while it runs a body of the zombie key,
        past the lease; run the key elsewhere; then SIGCONT it."""
        target, other = self.workers[0], self.workers[1]
        lock_ttl = self.options.lock_ttl
        bait = Call(-1, "zombie", ZOMBIE_MODE, 1.5, outbox=True, probe="bait")
        self.probes.append(bait)
        self.send(bait, f"{QUEUE}.{target.name}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self._running(bait.task_id):
            time.sleep(0.02)
        self.stopped = target
        os.killpg(target.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        self.log_fault(f"SIGSTOP {target.name} (bait {bait.task_id[:8]} running)")
        self.faults["SIGSTOP past the lease"] += 1
        time.sleep(lock_ttl + 0.5)  # the bait's lease has expired by now
        successor = Call(-2, "zombie", ZOMBIE_MODE, 0.05, outbox=True)
        successor.probe = "successor"
        self.probes.append(successor)
        self.send(successor, f"{QUEUE}.{other.name}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.state(successor.task_id) not in (
            FINAL
        ):
            time.sleep(0.05)
        os.killpg(target.pid, signal.SIGCONT)
        self.stopped = None
        paused = time.monotonic() - stopped_at
        self.faults["SIGSTOP seconds"] = round(paused, 1)
        self.log_fault(f"SIGCONT {target.name} after {paused:.1f}s")

    def _running(self, task_id: str) -> bool:
        return any(
            json.loads(entry)["task_id"] == task_id
            for entry in self.observe.hvals("busy")
        )

    def restart_lock_store(self) -> None:
        began = time.monotonic()
        self.locks.stop()
        time.sleep(self.options.redis_down)
        self.locks.start()
        down = time.monotonic() - began
        self.faults["lock-store Redis restarted"] += 1
        self.faults["lock-store downtime seconds"] = round(down, 2)
        self.log_fault(f"lock-store Redis restarted ({down:.2f}s down)")

    def drop_broker_connections(self) -> None:
        client = self.broker.client()
        killed = client.client_kill_filter(_type="normal")
        client.close()
        self.faults["broker connections dropped"] += 1
        self.faults["broker clients killed"] = killed
        self.log_fault(f"broker: CLIENT KILL TYPE normal ({killed} connections)")

    # -- the end --------------------------------------------------------------

    def state(self, task_id: str) -> str:
        raw = self.results.get(f"celery-task-meta-{task_id}")
        return str(json.loads(raw)["status"]) if raw else states.PENDING

    def states(self, ids: list[str]) -> dict[str, str]:
        pipe = self.results.pipeline(transaction=False)
        for task_id in ids:
            pipe.get(f"celery-task-meta-{task_id}")
        return {
            task_id: str(json.loads(raw)["status"]) if raw else states.PENDING
            for task_id, raw in zip(ids, pipe.execute(), strict=True)
        }

    def drain(self) -> bool:
        """Wait until every accepted task ended, no body runs and the queues
        are empty; False if the duration bound came first."""
        deadline = self.started_at + self.options.duration_bound
        pending = sorted(
            {c.task_id for c in self.all_calls() if c.task_id and not c.deduplicated}
        )
        shown = time.monotonic()
        while time.monotonic() < deadline:
            found = self.states(pending)
            pending = [t for t, state in found.items() if state not in FINAL]
            if not pending and self.idle():
                return True
            if time.monotonic() - shown > 10:
                self.progress(f"draining: {len(pending)} tasks not ended yet")
                shown = time.monotonic()
            time.sleep(0.5)
        return False

    def idle(self) -> bool:
        client = self.broker.client()
        try:
            names = [QUEUE, *(f"{QUEUE}.{w.name}" for w in self.workers)]
            waiting = sum(queue_length(client, name) for name in names)
            unacked = int(client.hlen("unacked"))
        finally:
            client.close()
        alive = {p for w in self.workers for p in _child_pids(w)}
        running = [int(p) for p in self.observe.hkeys("busy") if int(p) in alive]
        return waiting == 0 and unacked == 0 and not running

    def all_calls(self) -> list[Call]:
        return [*self.calls, *self.probes]

    def held_keys(self) -> dict[str, Any]:
        """What the lock store still holds: lease sets (waited for, up to a
        lease TTL) and claims past their hold."""
        client = self.locks.client()
        try:
            deadline = time.monotonic() + self.options.lock_ttl + 1
            while True:
                leases = {
                    name.decode(): client.zrange(name, 0, -1, withscores=True)
                    for name in client.scan_iter(match="dedup:{*}:lease", count=1000)
                }
                leases = {name: members for name, members in leases.items() if members}
                if not leases or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            claims = {
                name.decode(): (client.get(name), client.pttl(name))
                for name in client.scan_iter(match="dedup:{*}:claim", count=1000)
            }
        finally:
            client.close()
        mode_of = {c.task_id: c.mode for c in self.all_calls() if c.task_id}
        window_ms = (self.options.expired_ttl + 3.0 + 1.0) * 1000  # ttl + delay
        held: list[str] = []
        expired_window = 0
        for name, (holder, pttl) in claims.items():
            mode = mode_of.get(holder.decode() if holder else "", "?")
            if mode == "until_expired" and 0 < pttl <= window_ms:
                expired_window += 1  # inside its until_expired window
            else:
                held.append(f"{name} held by {holder!r} ({mode}, pttl {pttl} ms)")
        held += [f"{name}: {members!r}" for name, members in leases.items()]
        return {
            "held": held,
            "claims_left": len(claims),
            "until_expired_in_window": expired_window,
            "lease_sets_left": len(leases),
        }

    def outbox_rows(self) -> tuple[set[str], set[str], int]:
        """(aggregate ids of the events, task ids of the ledger, total rows)."""
        engine = sa.create_engine(self.outbox_url)
        try:
            with engine.connect() as conn:
                events = conn.execute(
                    sa.text(f"SELECT aggregate_id FROM {soak_app.TABLE}")
                ).all()
                ledger = conn.execute(
                    sa.text(f"SELECT task_id FROM {soak_app.TABLE}_ledger")
                ).all()
        finally:
            engine.dispose()
        return (
            {row[0].removeprefix("task:") for row in events},
            {row[0] for row in ledger},
            len(events),
        )

    def worker_events(self) -> dict[str, int]:
        """Counts of what the workers did, from their logs and the observer."""
        counts = dict.fromkeys(LOG_EVENTS, 0)
        restored = 0
        patterns = {name: re.compile(p) for name, p in LOG_EVENTS.items()}
        for worker in self.workers:
            if not worker.logfile.exists():
                continue
            for line in worker.logfile.read_text(errors="replace").splitlines():
                for name, pattern in patterns.items():
                    if pattern.search(line):
                        counts[name] += 1
                found = re.search(r"Restoring (\d+) unacknowledged", line)
                if found:
                    restored += int(found[1])
        counts["unacked messages restored (kombu)"] = restored
        raw = self.observe.hgetall("dropped")
        dropped = {k.decode(): int(v) for k, v in raw.items()}
        counts["deliveries dropped: onto another task"] = dropped.get("other", 0)
        counts["deliveries dropped: own task already succeeded"] = dropped.get("own", 0)
        return counts

    def records(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.observe.lrange(name, 0, -1)]

    def metas(self, ids: set[str]) -> dict[str, dict[str, Any]]:
        ordered = sorted(ids)
        pipe = self.results.pipeline(transaction=False)
        for task_id in ordered:
            pipe.get(f"celery-task-meta-{task_id}")
        return {
            task_id: json.loads(raw)
            for task_id, raw in zip(ordered, pipe.execute(), strict=True)
            if raw
        }


def _child_pids(worker: Worker) -> list[int]:
    if worker.process is None:
        return []
    try:
        return [child.pid for child in psutil.Process(worker.pid).children()]
    except psutil.NoSuchProcess:
        return []


# -- the checks ---------------------------------------------------------------


def bodies_of(
    started: list[dict[str, Any]],
    ended: list[dict[str, Any]],
    kills: list[dict[str, Any]],
) -> tuple[list[Body], int]:
    """Every body, with its end: recorded, or the SIGKILL of its process.
    Returns the bodies and how many neither ended nor were killed (they are
    taken to run to the end of time)."""
    # One body: its task id, process and start (a retry has the task id of
    # its first try, and no fence when dedup_max_running allows two).
    ends = {(e["task_id"], e["pid"], e["start"]): e for e in ended}
    kills_of: dict[int, list[float]] = collections.defaultdict(list)
    for kill in kills:
        kills_of[kill["pid"]].append(kill["at"])
    bodies, vanished = [], 0
    for s in started:
        body = Body(
            s["task_id"], s["mode"], s["dedup_key"], s["fence"], s["pid"], s["start"]
        )
        end = ends.get((s["task_id"], s["pid"], s["start"]))
        if end is not None:
            body.end = end["end"]
            body.outcome = end["outcome"]
            body.lease_valid = end["lease_valid"]
            body.wrote = end["wrote"]
        else:
            after = [t for t in kills_of.get(s["pid"], []) if t >= s["start"]]
            if after:
                body.end, body.killed, body.outcome = min(after), True, "killed"
            else:
                vanished += 1
                body.outcome = "vanished"
        bodies.append(body)
    return bodies, vanished


def overlaps(bodies: list[Body]) -> dict[str, Any]:
    """Per key: the most bodies at once, among those that held their lease
    (and among all), and fencing tokens out of start order."""
    by_key: dict[str, list[Body]] = collections.defaultdict(list)
    for body in bodies:
        by_key[body.dedup_key].append(body)
    most_valid = most_all = 0
    inversions: list[str] = []
    worst: list[str] = []
    for key, group in by_key.items():
        spans = [
            {"start": b.start, "end": b.end if b.end is not None else float("inf")}
            for b in group
        ]
        valid = [span for span, b in zip(spans, group, strict=True) if b.lease_valid]
        most_all = max(most_all, max_overlap(spans))
        here = max_overlap(valid)
        if here > 1:
            worst.append(key)
        most_valid = max(most_valid, here)
        # (no fence when more than one holder is allowed: dedup_max_running)
        fenced = (b for b in group if b.lease_valid and b.fence is not None)
        ordered = sorted(fenced, key=lambda b: b.start)
        inversions += [
            f"{key}: {a.fence} then {b.fence}"
            for a, b in itertools.pairwise(ordered)
            if b.fence <= a.fence
        ]
    return {
        "most_valid": most_valid,
        "most_all": most_all,
        "keys_over": worst,
        "inversions": inversions,
    }


def classify(
    soak: Soak, bodies: list[Body], metas: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Each call's outcome: completed, collapsed onto a task that ran,
    dropped at execution onto one, lease lost (reported), or lost."""
    ran_ok = {b.task_id for b in bodies if b.outcome == "ok"}
    ran = {b.task_id for b in bodies if b.end is not None and not b.killed}
    backend = soak_app.app.backend

    def error_of(task_id: str) -> Any:
        meta = metas.get(task_id)
        if meta is None or meta["status"] != states.FAILURE:
            return None
        return backend.exception_to_python(meta["result"])

    def resolve(task_id: str | None, seen: frozenset[str]) -> str:
        """'ran', 'lease_lost' or 'lost: why' for the task a call counts on."""
        if task_id is None or task_id in seen:
            return "lost: a cycle of duplicates"
        meta = metas.get(task_id)
        state = meta["status"] if meta else states.PENDING
        if state == states.SUCCESS:
            return "ran" if task_id in ran_ok else "lost: SUCCESS without a body"
        if state == states.PENDING and task_id in ran_ok:
            # Its child was killed after the body succeeded, before Celery
            # stored the result; the redelivered copy was dropped (a known
            # limit, which the worker logs as an error): ran once, no result.
            return "result_lost"
        error = error_of(task_id)
        if isinstance(error, DuplicateTaskError):
            return resolve(error.existing_task_id, seen | {task_id})
        if isinstance(error, LockLostError):
            return "lease_lost" if task_id in ran else "lost: LockLostError unrun"
        return f"lost: {state} {error!r}" if error is not None else f"lost: {state}"

    per_mode: dict[str, collections.Counter[str]] = {
        mode: collections.Counter() for mode in MODES
    }
    lost: list[str] = []
    for call in soak.calls:
        counts = per_mode[call.mode]
        counts["calls"] += 1
        if call.deduplicated:
            kind, onto = "collapsed at enqueue", resolve(call.task_id, frozenset())
        else:
            counts["published"] += 1
            meta = metas.get(call.task_id)
            error = error_of(call.task_id)
            if meta and meta["status"] == states.SUCCESS:
                kind, onto = "completed", resolve(call.task_id, frozenset())
            elif isinstance(error, DuplicateTaskError):
                kind = "dropped at execution"
                onto = resolve(error.existing_task_id, frozenset({call.task_id}))
                if call.mode == "until_and_while_executing":
                    onto = "lost: this mode never drops at execution"
            elif isinstance(error, LockLostError):
                kind, onto = "lease lost", resolve(call.task_id, frozenset())
            else:
                kind, onto = "lost", resolve(call.task_id, frozenset())
                if onto == "result_lost":
                    kind = "result never stored"
        if onto.startswith("lost"):
            counts["lost"] += 1
            lost.append(f"#{call.seq} {call.mode} {call.key} {call.task_id}: {onto}")
        else:
            counts[kind] += 1
            if onto == "lease_lost" and kind != "lease lost":
                counts["onto a lease lost"] += 1
    probes = {call.probe: resolve(call.task_id, frozenset()) for call in soak.probes}
    return {"per_mode": per_mode, "lost": lost, "probes": probes}


def check(soak: Soak, drained: bool, wall: float) -> dict[str, Any]:
    """Read every record back and decide each invariant."""
    started, ended = soak.records("started"), soak.records("ended")
    bodies, vanished = bodies_of(started, ended, soak.kills)
    ids = {c.task_id for c in soak.all_calls() if c.task_id}
    ids |= {b.task_id for b in bodies}
    metas = soak.metas(ids)
    # A holder named by a DuplicateTaskError is a task id we know, or one
    # whose publish we were told had failed: read it too.
    extra = set()
    for meta in metas.values():
        if meta["status"] == states.FAILURE:
            error = soak_app.app.backend.exception_to_python(meta["result"])
            holder = getattr(error, "existing_task_id", None)
            if holder and holder not in metas:
                extra.add(holder)
    metas.update(soak.metas(extra))
    outcomes = classify(soak, bodies, metas)
    over = overlaps(bodies)
    keys = soak.held_keys()
    events, ledger, rows = soak.outbox_rows()
    written = {b.task_id for b in bodies if b.wrote in (True, False)}
    rejected = sum(1 for b in bodies if b.wrote == "rejected")
    per_mode = outcomes["per_mode"]
    total = collections.Counter[str]()
    for counts in per_mode.values():
        total.update(counts)
    refused = sum(c.refused for c in soak.all_calls())
    faults = soak.faults
    injected = all(
        faults[name] >= 1
        for name in (
            "SIGKILL (worker child)",
            "SIGSTOP past the lease",
            "lock-store Redis restarted",
            "broker connections dropped",
        )
    )
    invariants = [
        ("tasks lost", total["lost"], "0", total["lost"] == 0),
        (
            "max overlapping bodies per key (lease held)",
            over["most_valid"],
            "<= 1",
            over["most_valid"] <= 1,
        ),
        (
            "fencing tokens out of start order",
            len(over["inversions"]),
            "0",
            not over["inversions"],
        ),
        (
            "outbox rows == distinct events (ledger rows)",
            f"{rows} == {len(written)} ({len(ledger)})",
            "equal",
            rows == len(events) == len(written) == len(ledger)
            and events == written == ledger,
        ),
        ("keys held after their TTL", len(keys["held"]), "0", not keys["held"]),
        ("bodies that vanished (no end, not killed)", vanished, "0", vanished == 0),
        ("every fault injected", "yes" if injected else "no", "yes", injected),
        ("drained within --duration-bound", drained, "True", drained),
        ("soak errors", len(soak.errors), "0", not soak.errors),
    ]
    figures = {
        "tasks sent": len(soak.calls),
        "published (accepted)": total["published"],
        "collapsed at enqueue (deduplicated)": total["collapsed at enqueue"],
        "refused at enqueue, sent again": refused,
        "tasks completed (SUCCESS)": total["completed"],
        "dropped at execution onto a running holder": total["dropped at execution"],
        "ended LockLostError (lease lost, reported)": total["lease lost"],
        "collapsed onto a task that lost its lease": total["onto a lease lost"],
        "tasks lost": total["lost"],
        "ran once, result never stored (killed before Celery stored it)": total[
            "result never stored"
        ],
        "bodies run (reruns and retries included)": len(bodies),
        "bodies killed mid-run": sum(1 for b in bodies if b.killed),
        "bodies ended with the lease lost": sum(1 for b in bodies if not b.lease_valid),
        "max overlapping bodies per key, lease held": over["most_valid"],
        "max overlapping bodies per key, lease-lost ones too": over["most_all"],
        "outbox rows": rows,
        "distinct events written": len(written),
        "ledger rows": len(ledger),
        "zombie outbox writes rejected by the fence": rejected,
        "claims left (until_expired, in their window)": keys["until_expired_in_window"],
        "keys held after their TTL": len(keys["held"]),
        "wall time (s)": round(wall, 1),
    }
    return {
        "figures": figures,
        "per_mode": {mode: dict(counts) for mode, counts in per_mode.items()},
        "faults": faults,
        "worker_events": soak.worker_events(),
        "fault_log": soak.fault_log,
        "refusals": dict(soak.refusals),
        "probes": outcomes["probes"],
        "invariants": [
            {"name": name, "value": value, "bound": bound, "ok": bool(ok)}
            for name, value, bound, ok in invariants
        ],
        "passed": all(ok for *_, ok in invariants),
        "details": {
            "lost": outcomes["lost"][:50],
            "keys_over": over["keys_over"][:50],
            "inversions": over["inversions"][:50],
            "held": keys["held"][:50],
            "errors": soak.errors,
            "outbox_missing": sorted(written - events)[:50],
            "outbox_unexpected": sorted(events - written)[:50],
            "ledger_mismatch": sorted(ledger ^ events)[:50],
        },
    }


def table(rows: list[tuple[str, Any]], head: tuple[str, str]) -> str:
    width = max(len(head[0]), *(len(name) for name, _ in rows))
    lines = [f"| {head[0]:<{width}} | {head[1]} |", f"|{'-' * (width + 2)}|---|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    out = [table(list(result["figures"].items()), ("figure", "value")), ""]
    out.append(table(list(result["faults"].items()), ("fault injected", "count")))
    out.append("")
    out.append(table(list(result["worker_events"].items()), ("the workers", "count")))
    out.append("")
    modes = result["per_mode"]
    columns = [
        "calls",
        "published",
        "collapsed at enqueue",
        "completed",
        "dropped at execution",
        "lease lost",
        "lost",
    ]
    out.append("| mode | " + " | ".join(columns) + " |")
    out.append("|---" * (len(columns) + 1) + "|")
    for mode, counts in modes.items():
        cells = " | ".join(str(counts.get(c, 0)) for c in columns)
        out.append(f"| {mode} | {cells} |")
    out.append("")
    checks = [
        (i["name"], f"{i['value']} (bound {i['bound']}): {'ok' if i['ok'] else 'FAIL'}")
        for i in result["invariants"]
    ]
    out.append(table(checks, ("invariant", "result")))
    for name, items in result["details"].items():
        if items:
            out.append(f"\n{name}:")
            out += [f"  {item}" for item in items]
    verdict = "PASSED" if result["passed"] else "FAILED"
    out.append(f"\nsoak {verdict}")
    return "\n".join(out)


def run(options: argparse.Namespace) -> dict[str, Any]:
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    soak = Soak(options, workdir)
    try:
        soak.start()
        soak.progress(
            f"{options.workers} workers x {options.concurrency} ready; sending "
            f"{options.tasks} calls at {options.rate:g}/s"
        )
        chaos = threading.Thread(target=soak.chaos, name="chaos")
        chaos.start()
        try:
            soak.send_all()
        finally:
            soak.sending_done.set()
            chaos.join()
        soak.progress("all calls sent; draining")
        drained = soak.drain()
        soak.progress("checking")
        result = check(soak, drained, time.monotonic() - began)
        result["figures"]["wall time (s)"] = round(time.monotonic() - began, 1)
    finally:
        soak.stop()
        if options.keep_logs is not None:
            soak.keep_logs(options.keep_logs)
        shutil.rmtree(workdir, ignore_errors=True)
    result["options"] = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()
    }
    result["versions"] = versions()
    result["machine"] = {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
    }
    return result


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # runs the clean-up


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    signal.signal(signal.SIGTERM, _terminated)
    result = run(options)
    print(report(result))
    if options.json is not None:
        options.json.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
