"""The execution lease: at most N bodies of a dedup key at once, fenced.

A lease is a member of a sorted set per key, scored by its expiry in Redis
time (so clocks of workers never matter). Each acquisition gets a fencing token
that is strictly greater than every token handed out for the key before: the
larger of "last token + 1" and the Redis clock in microseconds, so not even a
Redis restart that lost the counter makes a token go back.

One round trip acquires (and checks completion memory and the claim), one
renews, one releases (and records completion and frees the claim). A
heartbeat thread per process renews every live lease each third of its TTL.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Final

import redis

from . import signals

logger = logging.getLogger(__name__)

# KEYS[1] - the lease set (member -> expiry, ms of Redis time)
# KEYS[2] - the fencing counter
# KEYS[3] - this task id's completion marker
# KEYS[4] - the enqueue claim
# ARGV[1] - member: "<len(task id)>:<task id>|<host>|<pid>[|<thread>]"
# ARGV[2] - task id
# ARGV[3] - lease TTL (ms)
# ARGV[4] - how many members may hold the key at once
# ARGV[5] - fencing counter TTL (ms)
# ARGV[6] - "1": delete the claim if this task id holds it, once acquired
# ARGV[7] - claim TTL (ms) to take the claim here, at execution, for a message
#           no publisher claimed (until_expired); "0": leave the claim alone
# Returns {1, token, 1 if it took the claim} acquired; {2} the task id already
# completed; {3, ms, id} another execution of this task id holds the key;
# {4, ms, id} other task ids fill the key (ms: until the earliest holder's
# lease ends); {5, ms, id} another task id holds the claim ARGV[7] asked for.
ACQUIRE: Final = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {2}
end
local claim_ttl = tonumber(ARGV[7])
local claim_holder = false
if claim_ttl > 0 then
  claim_holder = redis.call('GET', KEYS[4])
  if claim_holder and claim_holder ~= ARGV[2] then
    return {5, redis.call('PTTL', KEYS[4]), claim_holder}
  end
end
local ttl = tonumber(ARGV[3])
local expire = true
if redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) >= 0
    and redis.call('EXISTS', KEYS[1]) == 1 then
  local holders = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  local prefix = #ARGV[2] .. ':' .. ARGV[2] .. '|'
  local first, first_id = nil, nil
  for i = 1, #holders, 2 do
    local n, rest = string.match(holders[i], '^(%d+):(.*)$')
    local id = rest:sub(1, tonumber(n))
    if holders[i]:sub(1, #prefix) == prefix then
      return {3, tonumber(holders[i + 1]) - now, id}
    end
    if not first or tonumber(holders[i + 1]) < first then
      first, first_id = tonumber(holders[i + 1]), id
    end
  end
  if #holders / 2 >= tonumber(ARGV[4]) then
    return {4, first - now, first_id}
  end
  expire = redis.call('PTTL', KEYS[1]) < ttl
end
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local token = t[1] * 1000000 + t[2]
if token <= last then token = last + 1 end
redis.call('SET', KEYS[2], string.format('%d', token), 'PX', ARGV[5])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if expire then redis.call('PEXPIRE', KEYS[1], ttl) end
local claimed = 0
if claim_ttl > 0 then
  if not claim_holder then
    redis.call('SET', KEYS[4], ARGV[2], 'PX', claim_ttl)
  end
  claimed = 1
elseif ARGV[6] == '1' and redis.call('GET', KEYS[4]) == ARGV[2] then
  redis.call('DEL', KEYS[4])
end
return {1, token, claimed}
"""

# KEYS[1] - the lease set
# ARGV[1] - member
# ARGV[2] - lease TTL (ms), replacing what was left
# Returns 1 if the member still held the key (now renewed), else 0.
RENEW: Final = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= now then
  return 0
end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""

# KEYS[1] - the lease set
# KEYS[2] - the enqueue claim
# KEYS[3] - this task id's completion marker
# ARGV[1] - member ("" when there is no lease to give back)
# ARGV[2] - task id
# ARGV[3] - "1": delete the claim if this task id holds it
# ARGV[4] - completion memory (ms); 0: the task did not succeed
# Returns 1 if the member was still in the set, else 0: then another execution
# took the key (acquiring purges expired members) or it was freed by force.
# Completion is only recorded for a member that was still there.
RELEASE: Final = """
local held = 0
if ARGV[1] ~= '' then
  held = redis.call('ZREM', KEYS[1], ARGV[1])
end
if ARGV[3] == '1' and redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('DEL', KEYS[2])
end
if held == 1 and tonumber(ARGV[4]) > 0 then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
end
return held
"""

ACQUIRED: Final = 1
DONE: Final = 2
SAME_TASK: Final = 3
BUSY: Final = 4
CLAIMED: Final = 5


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What ACQUIRE answered: a status, and the token or the holder and wait."""

    status: int
    token: int = 0
    wait: float = 0.0  # seconds until the earliest holder's lease ends
    holder: str | None = None
    took_claim: bool = False


def member(task_id: str, hostname: str | None, pid: int, thread: int | None) -> str:
    """Who holds a lease: the task id (length-prefixed, as it may hold any
    character), host and process; a prefork parent can rebuild it for a child."""
    held_by = f"{len(task_id)}:{task_id}|{hostname}|{pid}"
    return held_by if thread is None else f"{held_by}|{thread}"


def task_of(held_by: str) -> str:
    """The task id in a lease member."""
    length, rest = held_by.split(":", 1)
    return rest[: int(length)]


class Lease:
    """One held lease. Its token and validity live here, not in thread state."""

    def __init__(
        self,
        key: str,
        redis_key: str,
        member: str,
        token: int,
        ttl: float,
        asked_at: float,
        task_name: str | None = None,
    ) -> None:
        self.task_name = task_name
        self.key = key
        self.redis_key = redis_key
        self.member = member
        self.token = token
        self.ttl = ttl
        self.task_id = task_of(member)
        # Counted from before the request: never later than Redis's own expiry.
        self._expires = asked_at + ttl
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

    def _renewed(self, at: float) -> None:
        self._expires = at + self.ttl

    def lose(self, reason: str) -> None:
        """Mark the lease lost (once), log it and send ``lease_lost``."""
        if self._lost is None:
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


class Leases:
    """The lease scripts on one Redis client, and the process's heartbeat."""

    def __init__(self, client: redis.Redis, heartbeat_client: redis.Redis) -> None:
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._renew = heartbeat_client.register_script(RENEW)
        self._heartbeat_client = heartbeat_client
        self._heartbeat: Heartbeat | None = None
        self._lock = threading.Lock()

    def acquire(
        self,
        keys: tuple[str, str, str, str],
        member: str,
        ttl: float,
        max_running: int,
        fence_ttl: float,
        release_claim: bool,
        claim_ttl: float = 0,
    ) -> Outcome:
        """Try to take the lease; keys: lease set, fence, done marker, claim.

        ``claim_ttl`` > 0 also takes the claim (for that long) if it is free.
        """
        reply = self._acquire(
            keys=list(keys),
            args=[
                member,
                task_of(member),
                _ms(ttl),
                max_running,
                _ms(fence_ttl),
                "1" if release_claim else "0",
                _ms(claim_ttl, 0),
            ],
        )
        status = int(reply[0])
        if status == ACQUIRED:
            return Outcome(status, token=int(reply[1]), took_claim=bool(reply[2]))
        if status == DONE:
            return Outcome(status)
        return Outcome(
            status, wait=max(0, int(reply[1])) / 1000, holder=_text(reply[2])
        )

    def release(
        self,
        keys: tuple[str, str, str],
        member: str,
        task_id: str,
        release_claim: bool,
        done_ttl: float,
    ) -> bool:
        """Give back a lease (keys: lease set, claim, done marker)."""
        reply = self._release(
            keys=list(keys),
            args=[member, task_id, "1" if release_claim else "0", _ms(done_ttl, 0)],
        )
        return bool(reply)

    def renew(self, lease: Lease) -> bool:
        return bool(
            self._renew(keys=[lease.redis_key], args=[lease.member, _ms(lease.ttl)])
        )

    def watch(self, lease: Lease) -> None:
        """Renew ``lease`` every third of its TTL until :meth:`unwatch`."""
        self._thread().add(lease)

    def later(self, action: Callable[[], object], until: float) -> None:
        """Retry ``action`` (a release that failed) every second until it
        succeeds or ``until`` (monotonic) passes, when its key expires anyway.
        """
        self._thread().retry(action, until)

    def _thread(self) -> Heartbeat:
        with self._lock:
            if self._heartbeat is None or not self._heartbeat.is_alive():
                self._heartbeat = Heartbeat(self)
                self._heartbeat.start()
            return self._heartbeat

    def unwatch(self, lease: Lease) -> None:
        if self._heartbeat is not None:
            self._heartbeat.remove(lease)

    def close(self) -> None:
        """Close the heartbeat's connections (its thread idles, as a daemon)."""
        self._heartbeat_client.close()


class Heartbeat(threading.Thread):
    """Renews the leases held in this process; one thread for all of them.

    A failed renewal is retried until the lease would have expired; then the
    lease counts as lost. A renewal that finds another owner loses it at once.
    """

    def __init__(self, leases: Leases) -> None:
        super().__init__(name="celery-dedup-heartbeat", daemon=True)
        self._leases = leases
        self._due: dict[Lease, float] = {}
        self._retries: list[tuple[Callable[[], object], float]] = []
        self._wake = threading.Condition()
        self._sleeps_until = 0.0  # when the thread wakes by itself next

    def retry(self, action: Callable[[], object], until: float) -> None:
        with self._wake:
            self._retries.append((action, until))
            self._wake.notify()

    def add(self, lease: Lease) -> None:
        due = time.monotonic() + lease.ttl / 3
        with self._wake:
            self._due[lease] = due
            if due < self._sleeps_until:  # else it wakes in time: let it sleep
                self._wake.notify()

    def remove(self, lease: Lease) -> None:
        with self._wake:
            self._due.pop(lease, None)

    def run(self) -> None:
        next_retry = 0.0
        while True:
            with self._wake:
                now = time.monotonic()
                due = [lease for lease, at in self._due.items() if at <= now]
                retries = self._retries if now >= next_retry else []
                if not due and not retries:
                    wake_at = min(self._due.values(), default=now + 60)
                    if self._retries:
                        wake_at = min(wake_at, next_retry)
                    self._sleeps_until = wake_at
                    self._wake.wait(timeout=max(0.0, wake_at - now))
                    self._sleeps_until = 0.0
                    continue
                if retries:
                    self._retries = []
                    next_retry = now + 1.0
            for lease in due:
                self._beat(lease)
            for action, until in retries:
                self._try(action, until)

    def _try(self, action: Callable[[], object], until: float) -> None:
        try:
            action()
        except redis.RedisError:
            if time.monotonic() < until:
                with self._wake:
                    self._retries.append((action, until))

    def _beat(self, lease: Lease) -> None:
        started = time.monotonic()
        try:
            renewed = self._leases.renew(lease)
        except redis.RedisError as exc:
            if not lease.valid:
                lease.lose(f"Redis unreachable until the lease expired ({exc!r})")
                self.remove(lease)
            else:
                self._reschedule(lease, started + min(1.0, lease.ttl / 10))
            return
        if renewed:
            lease._renewed(started)
            self._reschedule(lease, started + lease.ttl / 3)
        else:
            lease.lose("another execution holds the key, or the lease expired")
            self.remove(lease)

    def _reschedule(self, lease: Lease, at: float) -> None:
        with self._wake:
            if lease in self._due:
                self._due[lease] = at


def _ms(seconds: float, floor: int = 1) -> int:
    return max(floor, int(seconds * 1000))


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
