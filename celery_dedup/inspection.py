"""What the dedup keys in Redis hold, for ``celery dedup status | inspect | release``.

The layout of the keys and the scripts that read and release them belong to
:mod:`celery_dedup.store`. Keys are found with ``SCAN``, never ``KEYS``; each
key is read in one script, so its parts and the Redis clock are one snapshot.

Redis records neither the task name nor the lock mode of a key: they come
from the workers (:func:`tasks_from_workers`) and the result backend, and are
None (printed as ``-``) when nobody knows.

The only write is :func:`release`, a compare-and-delete: it deletes the claim
and the lease set only if they are still exactly as they were read (or
whatever they hold with ``force``), and never touches the fencing counter.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import redis
from redis.cluster import RedisCluster

from .lease import task_of
from .store import DONE_PART, HELD_PARTS, Layout, Store

#: A dedup key as ``status`` shows it: the 32 hex digits of :func:`keys.digest`.
KEY_PATTERN: Final = re.compile(r"^[0-9a-f]{32}$")


@dataclasses.dataclass(frozen=True)
class Claim:
    """The enqueue claim: the task id holding it and its seconds left."""

    task_id: str
    ttl: float | None  # None: no expiry (PTTL -1)

    def as_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "ttl": _round(self.ttl)}


@dataclasses.dataclass(frozen=True)
class Done:
    """A completion marker: this task id succeeded; remembered ``ttl`` more s."""

    task_id: str
    ttl: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "ttl": _round(self.ttl)}


@dataclasses.dataclass(frozen=True)
class Holder:
    """One member of the lease set: who holds it and until when."""

    member: str
    task_id: str
    host: str | None
    pid: int | None
    thread: int | None
    expires: int  # ms of Redis time
    score: str  # the expiry as Redis printed it (for RELEASE's comparison)
    ttl: float  # seconds left when read; <= 0: expired, not yet purged

    @property
    def live(self) -> bool:
        return self.ttl > 0

    @property
    def worker(self) -> str | None:
        if self.host is None:
            return None
        return self.host if self.pid is None else f"{self.host}/{self.pid}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "host": self.host,
            "pid": self.pid,
            "thread": self.thread,
            "ttl": _round(self.ttl),
            "live": self.live,
        }


@dataclasses.dataclass(frozen=True)
class KeyState:
    """One dedup key as read in one snapshot (``now``: ms of Redis time)."""

    key: str
    now: int
    claim: Claim | None
    leases: tuple[Holder, ...]
    fence: int | None
    done: tuple[Done, ...] = ()  # completion markers, read by inspect only

    @property
    def live_leases(self) -> tuple[Holder, ...]:
        return tuple(h for h in self.leases if h.live)

    @property
    def held(self) -> bool:
        """True while a claim or an unexpired lease holds the key."""
        return self.claim is not None or bool(self.live_leases)

    @property
    def holds(self) -> str:
        """``claim``, ``lease``, ``claim+lease`` or ``-`` (nothing held)."""
        parts = ["claim"] if self.claim else []
        parts += ["lease"] if self.live_leases else []
        return "+".join(parts) or "-"

    def task_ids(self) -> list[str]:
        """The claim holder and the live lease holders, each once, in that order."""
        ids = [self.claim.task_id] if self.claim else []
        ids += [h.task_id for h in self.live_leases]
        return list(dict.fromkeys(ids))

    def involves(self, task_id: str) -> bool:
        """Whether ``task_id`` holds the claim or is in the lease set."""
        return (self.claim is not None and self.claim.task_id == task_id) or any(
            h.task_id == task_id for h in self.leases
        )


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What the workers or the result backend know of one task id."""

    task_id: str
    name: str | None = None
    state: str | None = None  # active/reserved/scheduled, or a backend state
    worker: str | None = None
    started_at: float | None = None  # epoch seconds, by the worker's clock
    source: str | None = None  # "worker" or "result backend"

    def age(self, now: float) -> float | None:
        """Seconds since the worker started the body, if it said."""
        return None if self.started_at is None else max(0.0, now - self.started_at)


# -- finding keys ---------------------------------------------------------------


def servers(client: redis.Redis | RedisCluster) -> list[redis.Redis]:
    """A client of each server holding keys: the one server, or every primary
    of a cluster (a replica holds copies, which would be read twice)."""
    if isinstance(client, RedisCluster):
        # Asked each time: a failover or resharding moves slots between nodes.
        primaries = client.get_primaries()  # type: ignore[no-untyped-call]
        return [client.get_redis_connection(node) for node in primaries]
    return [client]


def scan(
    client: redis.Redis | RedisCluster,
    layout: Layout,
    key: str = "*",
    count: int = 1000,
) -> dict[str, set[str]]:
    """The parts stored under each dedup key (all keys, or only ``key``).

    On a cluster each primary is scanned in turn, explicitly: SCAN walks one
    server's keys only."""
    parts: dict[str, set[str]] = {}
    for server in servers(client):
        for name in server.scan_iter(match=layout.pattern(key), count=count):
            parsed = layout.parse(name)
            if parsed is not None:
                parts.setdefault(parsed[0], set()).add(parsed[1])
    return parts


def parse_member(member: str) -> tuple[str, str | None, int | None, int | None]:
    """``(task id, host, pid, thread)`` of a lease member (see lease.member);
    a member written some other way is all task id."""
    try:
        task_id = task_of(member)
    except ValueError:
        return member, None, None, None
    rest = member.split(":", 1)[1][len(task_id) + 1 :]
    fields = rest.split("|")
    host = fields[0] if fields[0] not in ("", "None") else None
    numbers = [int(f) if f.isdigit() else None for f in fields[1:3]]
    numbers += [None] * (2 - len(numbers))
    return task_id, host, numbers[0], numbers[1]


def _state(key: str, reply: Sequence[Any]) -> KeyState:
    now, holder, pttl, flat, fence = reply
    now = int(now)
    claim = None
    if holder is not None:  # read with its PTTL in one script: -1 is no expiry
        claim = Claim(_text(holder), None if int(pttl) < 0 else int(pttl) / 1000)
    leases = []
    for member, score in zip(flat[::2], flat[1::2], strict=True):
        text, score_text = _text(member), _text(score)
        task_id, host, pid, thread = parse_member(text)
        expires = int(float(score_text))
        ttl = (expires - now) / 1000
        leases.append(
            Holder(text, task_id, host, pid, thread, expires, score_text, ttl)
        )
    return KeyState(key, now, claim, tuple(leases), _int(fence))


class Inspector:
    """Reads (and releases) the dedup keys under one prefix of one Redis."""

    def __init__(
        self, client: redis.Redis | RedisCluster, prefix: str, batch: int = 200
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.batch = batch
        self.store = Store(client, prefix)
        self.layout = self.store.layout

    def read(self, keys: Iterable[str]) -> list[KeyState]:
        """Each key's snapshot, ``batch`` keys per round trip, in order."""
        keys = list(keys)
        replies = self.store.read(keys, self.batch)
        return [_state(k, r) for k, r in zip(keys, replies, strict=True)]

    def held(self) -> list[KeyState]:
        """Every key a claim or an unexpired lease holds, sorted by key."""
        found = scan(self.client, self.layout)
        candidates = sorted(k for k, parts in found.items() if parts & HELD_PARTS)
        return [state for state in self.read(candidates) if state.held]

    def key(self, key: str) -> KeyState | None:
        """Everything stored under ``key``, completion markers included;
        None if nothing is."""
        parts = scan(self.client, self.layout, key).get(key)
        if not parts:
            return None
        [state] = self.read([key])
        done = sorted(
            p.removeprefix(DONE_PART) for p in parts if p.startswith(DONE_PART)
        )
        return dataclasses.replace(state, done=self._done(key, done))

    def task(self, task_id: str) -> list[KeyState]:
        """The keys ``task_id`` holds (claim or lease, expired members too) or
        has a completion marker in, sorted by key."""
        found = scan(self.client, self.layout)
        candidates = sorted(k for k, parts in found.items() if parts & HELD_PARTS)
        marked = {k for k, parts in found.items() if DONE_PART + task_id in parts}
        states = []
        for state in self.read(sorted(set(candidates) | marked)):
            if state.involves(task_id) or state.key in marked:
                done = [task_id] if state.key in marked else []
                states.append(
                    dataclasses.replace(state, done=self._done(state.key, done))
                )
        return states

    def _done(self, key: str, task_ids: Sequence[str]) -> tuple[Done, ...]:
        if not task_ids:
            return ()
        ttls = self.store.done_ttls(key, task_ids)
        return tuple(
            Done(task_id, None if ms < 0 else ms / 1000)
            for task_id, ms in zip(task_ids, ttls, strict=True)
            if ms != -2
        )

    def watch(
        self,
        state: KeyState,
        seconds: float,
        every: float = 0.2,
    ) -> tuple[KeyState, list[Holder]]:
        """Read ``state``'s key again, at once and then every ``every`` s for
        up to ``seconds``: the newest snapshot and the lease holders renewed
        (or new) since ``state``.

        Stops at the first renewal, or once no lease is live any more.
        """
        deadline = time.monotonic() + seconds
        while True:
            [latest] = self.read([state.key])
            moved = renewed(state, latest)
            left = deadline - time.monotonic()
            if moved or not latest.live_leases or left <= 0:
                return latest, moved
            time.sleep(min(every, left))

    def release(self, state: KeyState, force: bool = False) -> tuple[bool, KeyState]:
        """Delete the claim and the lease set of ``state``'s key, if they are
        still as ``state`` read them (whatever they hold with ``force``).

        Returns whether it deleted them, and what they held at that moment.
        """
        expected = [x for h in state.leases for x in (h.member, h.score)]
        claim = state.claim.task_id if state.claim else ""
        done, holder, flat = self.store.force_release(state.key, claim, expected, force)
        # The snapshot's clock: TTLs are as of the read, not of the release.
        found = _state(state.key, [state.now, holder, -1, flat, state.fence])
        return bool(done), found


def renewed(before: KeyState, after: KeyState) -> list[Holder]:
    """Live holders of ``after`` that are new or expire later than in ``before``."""
    earlier = {h.member: h.expires for h in before.leases}
    return [
        h
        for h in after.live_leases
        if h.member not in earlier or h.expires > earlier[h.member]
    ]


def watch_time(state: KeyState, margin: float = 1.0) -> float:
    """How long to watch a lease to tell a live holder from a gone one.

    A holder renews every third of its lease TTL, so a live member always has
    between 2/3 and all of its TTL left: one with ``L`` seconds left is
    renewed within ``L/3`` seconds, or its holder has stopped renewing.
    """
    return max((h.ttl / 3 for h in state.live_leases), default=0.0) + margin


# -- describing keys ------------------------------------------------------------


def tasks_from_workers(reply: Mapping[str, Any] | None) -> dict[str, TaskInfo]:
    """Task ids the workers answered ``query_task`` for: name, state, worker."""
    found: dict[str, TaskInfo] = {}
    for hostname, tasks in (reply or {}).items():
        for task_id, answer in (tasks or {}).items():
            state, info = answer
            found[task_id] = TaskInfo(
                task_id,
                name=info.get("name"),
                state=state,
                worker=_worker(hostname, info.get("worker_pid")),
                started_at=info.get("time_start") if state == "active" else None,
                source="worker",
            )
    return found


def key_document(
    state: KeyState,
    tasks: Mapping[str, TaskInfo],
    modes: Mapping[str, str | None],
    now: float,
) -> dict[str, Any]:
    """One key in the ``--json`` output (schema in docs/operations.md)."""
    name = task_name(state, tasks)
    return {
        "key": state.key,
        "task": name,
        "mode": modes.get(name) if name else None,
        "holds": state.holds,
        "claim": state.claim.as_dict() if state.claim else None,
        "leases": [h.as_dict() for h in state.leases],
        "fence": state.fence,
        "holders": [
            _holder_document(state, tasks.get(task_id), task_id, now)
            for task_id in state.task_ids()
        ],
        "done": [{"task_id": d.task_id, "ttl": _round(d.ttl)} for d in state.done],
    }


def task_name(state: KeyState, tasks: Mapping[str, TaskInfo]) -> str | None:
    """The task name of the key's first holder anyone knows, else None."""
    for task_id in [*state.task_ids(), *(d.task_id for d in state.done)]:
        info = tasks.get(task_id)
        if info is not None and info.name:
            return info.name
    return None


def _holder_document(
    state: KeyState, info: TaskInfo | None, task_id: str, now: float
) -> dict[str, Any]:
    holds = ["claim"] if state.claim and state.claim.task_id == task_id else []
    leases = [h for h in state.live_leases if h.task_id == task_id]
    holds += ["lease"] if leases else []
    worker = leases[0].worker if leases else None
    return {
        "task_id": task_id,
        "holds": holds,
        "name": info.name if info else None,
        "state": info.state if info else None,
        "worker": worker or (info.worker if info else None),
        "age": _round(info.age(now)) if info else None,
        "source": info.source if info else None,
    }


def status_lines(documents: Sequence[Mapping[str, Any]]) -> list[str]:
    """The human table of ``status``: held keys grouped by task name."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for doc in documents:
        groups.setdefault(doc["task"] or "unknown task", []).append(doc)
    lines: list[str] = []
    headers = (
        "KEY", "HOLDS", "MODE", "TASK ID", "STATE", "WORKER", "AGE",
        "CLAIM TTL", "LEASE TTL", "FENCE",
    )  # fmt: skip
    for name in sorted(groups, key=lambda n: (n == "unknown task", n)):
        docs = groups[name]
        lines.append(f"{name}: {len(docs)} key{'s' if len(docs) != 1 else ''}")
        rows = [row for doc in docs for row in _status_rows(doc)]
        lines += ["  " + line for line in table(headers, rows)]
    return lines


def _status_rows(doc: Mapping[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for holder in doc["holders"]:
        task_id = holder["task_id"]
        claim = doc["claim"] if "claim" in holder["holds"] else None
        leases = [x for x in doc["leases"] if x["task_id"] == task_id and x["live"]]
        rows.append(
            (
                doc["key"],
                "+".join(holder["holds"]),
                _dash(doc["mode"]),
                task_id,
                _dash(holder["state"]),
                _dash(holder["worker"]),
                duration(holder["age"]),
                duration(claim["ttl"]) if claim else "-",
                duration(max(x["ttl"] for x in leases)) if leases else "-",
                _dash(doc["fence"]),
            )
        )
    return rows


def inspect_lines(doc: Mapping[str, Any]) -> list[str]:
    """The human description of one key (``inspect``)."""
    lines = [f"dedup key {doc['key']}: holds {doc['holds']}"]
    mode = f" (mode {doc['mode']}, as configured in this app)" if doc["mode"] else ""
    lines.append(f"  task:   {_dash(doc['task'])}{mode}")
    claim = doc["claim"]
    lines.append(
        f"  claim:  task {claim['task_id']}, expires in {duration(claim['ttl'])}"
        if claim
        else "  claim:  -"
    )
    leases = doc["leases"] or [None]
    for index, lease in enumerate(leases):
        label = "  lease:  " if index == 0 else "          "
        if lease is None:
            lines.append(label + "-")
            continue
        where = f"{_dash(lease['host'])} pid {_dash(lease['pid'])}"
        where += f" thread {lease['thread']}" if lease["thread"] is not None else ""
        ends = (
            f"expires in {duration(lease['ttl'])}"
            if lease["live"]
            else f"expired {duration(-lease['ttl'])} ago (not yet purged)"
        )
        lines.append(f"{label}task {lease['task_id']} on {where}, {ends}")
    lines.append(f"  fence:  {_dash(doc['fence'])}")
    for holder in doc["holders"]:
        state = (
            f"{holder['state']} (per the {holder['source']})"
            if holder["state"]
            else "state unknown"
        )
        lines.append(
            f"  holder: task {holder['task_id']}, {state}, worker "
            f"{_dash(holder['worker'])}, age {duration(holder['age'])}"
        )
    for done in doc["done"]:
        lines.append(
            f"  done:   task {done['task_id']} succeeded; remembered for "
            f"{duration(done['ttl'])}"
        )
    return lines


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart."""
    widths = [
        max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)
    ]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    ]


def duration(seconds: float | None) -> str:
    """``12.3s``, ``4m05s``, ``2h03m``, ``3d04h``; ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    for unit, size, small, small_size in (
        ("d", 86400, "h", 3600),
        ("h", 3600, "m", 60),
        ("m", 60, "s", 1),
    ):
        if whole >= size:
            return f"{whole // size}{unit}{whole % size // small_size:02d}{small}"
    raise AssertionError("unreachable")  # pragma: no cover


def _worker(hostname: str, pid: Any) -> str:
    return f"{hostname}/{pid}" if pid else hostname


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _int(value: bytes | str | None) -> int | None:
    return None if value is None else int(value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
