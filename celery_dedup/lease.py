"""The execution lease as a body holds it, and the process's background thread.

A lease is a member of the key's lease set (see :mod:`celery_dedup.store`):
at most ``dedup_max_running`` members per key, each with an expiry in Redis
time, so workers' clocks never matter. Each acquisition gets a fencing token
strictly greater than every token handed out for the key before.

One :class:`Heartbeat` thread per process renews every lease held there each
third of its TTL, and runs the Redis work that must not wait in the caller's
thread: a release that failed (retried until its keys would have expired
anyway), a dead child's lease (freed once the process is gone), a revoked
message's claim. :meth:`Heartbeat.flush` runs what is left when the process
exits, so a key never stays held because a process ended.

Under the ``gevent`` and ``eventlet`` pools, threading is monkey-patched and
the heartbeat is a greenlet: it renews only while the body yields to the
event loop. Such a worker logs a warning saying so as it starts (or, in a
process that has no start-up, at its first lease).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Final

import redis

from . import signals
from .model import Renewal

logger = logging.getLogger(__name__)

#: How often a job whose moment has not come is looked at again (seconds).
POLL: Final = 0.02
#: How much sooner than Redis a lease counts as expired here: Redis scores a
#: lease by its clock in whole milliseconds, rounded down (seconds).
CLOCK_MARGIN: Final = 0.002
#: How often a job whose Redis call failed is tried again (seconds).
RETRY: Final = 1.0


#: Numbers this process's leases, so that no two deliveries share a member.
_deliveries = itertools.count(1)
#: Whether this process already warned that its heartbeat is a greenlet.
_warned_green = False

GREEN_WARNING: Final = (
    "celery-dedup: threads are %s greenlets in this process, so the lease "
    "heartbeat renews only while a body yields (I/O, sleep). A body that "
    "computes without yielding for more than about two thirds of "
    "dedup_lock_ttl can lose its lease and end with LockLostError, and "
    "another body of its key may start meanwhile: keep dedup_lock_ttl well "
    "above the longest such stretch."
)


def green_threads() -> str | None:
    """The library whose monkey-patching made this process's threads
    greenlets ("gevent", "eventlet"), or None for real threads."""
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("threading"):
        return "gevent"
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is not None and patcher.is_monkey_patched("thread"):
        return "eventlet"
    return None


def warn_if_green() -> None:
    """Warn once per process when the heartbeat cannot run beside a body
    (at ``worker_init``, and at the first lease)."""
    global _warned_green  # noqa: PLW0603
    library = green_threads()
    if library is not None and not _warned_green:
        _warned_green = True
        logger.warning(GREEN_WARNING, library)


def holder(task_id: str, hostname: str | None, pid: int, thread: int | None) -> str:
    """Who runs a delivery: the task id (length-prefixed, as it may hold any
    character), host, process and thread (empty for the main thread). Every
    member of its leases starts with it, so a prefork parent can free the
    lease of a dead child."""
    lane = "" if thread is None else thread
    return f"{len(task_id)}:{task_id}|{hostname}|{pid}|{lane}|"


def member(task_id: str, hostname: str | None, pid: int, thread: int | None) -> str:
    """A new lease member: the :func:`holder` and a number unique in this
    process. A release retried late then never frees a later delivery's
    lease of the same task id in the same process (a retry, a redelivery)."""
    return f"{holder(task_id, hostname, pid, thread)}{next(_deliveries)}"


def task_of(held_by: str) -> str:
    """The task id in a lease member."""
    length, rest = held_by.split(":", 1)
    return rest[: int(length)]


class Lease:
    """One held lease. Its token and validity live here, not in thread state."""

    def __init__(
        self,
        key: str,
        member: str,
        token: int,
        ttl: float,
        asked_at: float,
        task_name: str | None = None,
        max_running: int = 1,
    ) -> None:
        self.task_name = task_name
        self.key = key
        self.member = member
        self.token = token
        self.ttl = ttl
        self.max_running = max_running
        self.task_id = task_of(member)
        # Counted from before the request, less the millisecond Redis's clock
        # rounds down by (scores are whole ms): never later than its expiry.
        self._expires = asked_at + ttl - CLOCK_MARGIN
        self._lost: str | None = None

    @property
    def valid(self) -> bool:
        """False once the lease is lost, or could have expired unrenewed."""
        return self._lost is None and time.monotonic() < self._expires

    @property
    def lost_reason(self) -> str | None:
        if self._lost is None and time.monotonic() >= self._expires:
            return "not renewed before it expired"
        return self._lost

    def renewed(self, at: float) -> None:
        """A renewal sent at monotonic ``at`` succeeded."""
        self._expires = at + self.ttl - CLOCK_MARGIN

    def lose(self, reason: str) -> None:
        """Mark the lease lost (once), log it and send ``lease_lost``."""
        if self._lost is not None:
            return
        self._lost = reason
        logger.info(
            "Lease lost on %s by %s[%s]: %s",
            self.key,
            self.task_name,
            self.task_id,
            reason,
            extra={
                "dedup_key": self.key,
                "task_id": self.task_id,
                "task_name": self.task_name,
            },
        )
        signals.lease_lost.send(
            sender=self.task_name, key=self.key, task_id=self.task_id, reason=reason
        )


@dataclasses.dataclass(eq=False)
class Job:
    """Redis work for the background thread: ``action`` once ``ready()``,
    retried on a Redis error, given up at ``until`` (monotonic)."""

    action: Callable[[], object]
    until: float
    ready: Callable[[], bool] | None = None
    poll: float = POLL
    at: float = 0.0  # when to look at it next


class Heartbeat:
    """Renews this process's leases and runs its deferred Redis work.

    ``renew(lease)`` answers a :class:`~celery_dedup.model.Renewal`, true
    while the lease is held; a false one says why it is lost. A Redis error
    is retried until the lease would have expired, and the lease is lost then.
    """

    def __init__(self, renew: Callable[[Lease], Renewal]) -> None:
        self._renew = renew
        self._wake = threading.Condition()
        self._reset()
        # A prefork child is forked from a process whose thread may hold the
        # lock: hold it across the fork, so that the child's copy is free.
        os.register_at_fork(
            before=self._wake.acquire,
            after_in_parent=self._wake.release,
            after_in_child=self._wake.release,
        )

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._due: dict[Lease, float] = {}
        self._jobs: list[Job] = []
        self._sleeps_until = 0.0  # when the thread wakes by itself next

    # -- what callers use ----------------------------------------------------

    def watch(self, lease: Lease) -> None:
        """Renew ``lease`` every third of its TTL until :meth:`unwatch`."""
        due = time.monotonic() + lease.ttl / 3
        with self._started():
            self._due[lease] = due
            if due < self._sleeps_until:  # else it wakes in time: let it sleep
                self._wake.notify()

    def unwatch(self, lease: Lease) -> None:
        with self._wake:
            self._due.pop(lease, None)

    def later(
        self,
        action: Callable[[], object],
        until: float,
        *,
        ready: Callable[[], bool] | None = None,
        poll: float = POLL,
        delay: float = 0.0,
    ) -> None:
        """Run ``action`` in the background, once ``ready()`` (every ``poll``
        seconds), after ``delay``; retried every second on a Redis error; given
        up at ``until`` (monotonic), when what it frees expires anyway."""
        job = Job(action, until, ready, poll, time.monotonic() + delay)
        with self._started():
            self._jobs.append(job)
            self._wake.notify()

    def flush(self, timeout: float) -> int:
        """Run every pending job that is ready now, in this thread, retrying
        for up to ``timeout`` seconds (a process about to exit); returns how
        many were left undone. A job whose moment has not come (a revoke not
        seen) is dropped: nothing is left to wait for it."""
        deadline = time.monotonic() + timeout
        with self._wake:
            jobs, self._jobs = self._jobs, []
        while jobs and time.monotonic() < deadline:
            jobs = [job for job in jobs if not self._run(job, force=True)]
            if jobs:
                time.sleep(POLL)
        if jobs:
            logger.warning(
                "celery-dedup: %d deferred Redis release(s) not done at exit; "
                "their keys expire by their TTL",
                len(jobs),
            )
        return len(jobs)

    # -- the thread ----------------------------------------------------------

    def _started(self) -> threading.Condition:
        """The condition, with the thread running (a forked child starts anew:
        its parent's leases and jobs are the parent's to finish)."""
        if self._pid != os.getpid():  # its lock may have been held at the fork
            self._wake = threading.Condition()
            self._reset()
        with self._wake:
            if self._thread is None or not self._thread.is_alive():
                warn_if_green()
                self._thread = threading.Thread(
                    target=self._loop, name="celery-dedup-heartbeat", daemon=True
                )
                self._thread.start()
        return self._wake

    def _loop(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                due = [lease for lease, at in self._due.items() if at <= now]
                jobs = [job for job in self._jobs if job.at <= now]
                if not due and not jobs:
                    wake_at = min(
                        [*self._due.values(), *(j.at for j in self._jobs)],
                        default=now + 60,
                    )
                    self._sleeps_until = wake_at
                    self._wake.wait(timeout=max(0.0, wake_at - now))
                    self._sleeps_until = 0.0
                    continue
                self._jobs = [job for job in self._jobs if job.at > now]
            for lease in due:
                self._beat(lease)
            for job in jobs:
                if not self._run(job, force=False):
                    with self._wake:
                        self._jobs.append(job)

    def _run(self, job: Job, *, force: bool) -> bool:
        """Try ``job``; True when it is finished with (done or given up).
        ``force``: at exit; a job that is not ready is given up."""
        now = time.monotonic()
        if now >= job.until:
            return True
        if job.ready is not None and not job.ready():
            job.at = now + job.poll
            return force
        try:
            job.action()
        except redis.RedisError:
            job.at = now + RETRY
            return False
        except Exception:
            logger.exception("celery-dedup: a deferred Redis call failed")
        return True

    def _beat(self, lease: Lease) -> None:
        started = time.monotonic()
        try:
            renewed = self._renew(lease)
        except redis.RedisError as exc:
            if lease.valid:
                self._reschedule(lease, started + min(1.0, lease.ttl / 10))
            elif self._drop(lease):
                lease.lose(f"Redis unreachable until the lease expired ({exc!r})")
            return
        if renewed:
            lease.renewed(started)
            self._reschedule(lease, started + lease.ttl / 3)
        elif self._drop(lease):
            # Still watched: its body did not end and give it back meanwhile.
            lease.lose(Renewal(renewed).reason)

    def _drop(self, lease: Lease) -> bool:
        """Stop renewing ``lease``; False if its body already unwatched it."""
        with self._wake:
            return self._due.pop(lease, None) is not None

    def _reschedule(self, lease: Lease, at: float) -> None:
        with self._wake:
            if lease in self._due:
                self._due[lease] = at
