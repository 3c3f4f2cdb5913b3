"""The one owner of what celery-dedup keeps in Redis: every key and script.

Each dedup key ``K`` (32 hex digits, see :mod:`celery_dedup.keys`) owns these
Redis keys, all under the hash tag ``{K}`` so that every script touches one
Redis Cluster slot:

============================  ===============================================
``<prefix>:{K}:claim``        the enqueue claim: the task id holding it
``<prefix>:{K}:lease``        the execution lease: a sorted set of holders
                              (see :func:`celery_dedup.lease.member`) scored
                              by expiry, in ms of Redis time
``<prefix>:{K}:fence``        the last fencing token handed out
``<prefix>:{K}:done:<id>``    task ``<id>`` ran to success (completion memory)
============================  ===============================================

Every script takes its KEYS in that one order: ``claim, lease, fence, done``
(the done marker of the task id in its ARGV), as :meth:`KeyNames.keys` lists
them, whether it uses all of them or not. Answers are the enums of
:mod:`celery_dedup.model`.

A Redis with replicas acknowledges a write before its replicas have it; a
failover then can lose an acquired lease (and a second holder start, whose
newer fence the outbox refuses to the first). With ``replicas`` > 0, every
acquire and renewal is followed on the same connection by ``WAIT replicas
timeout``, and one that too few replicas acknowledged counts as a Redis error
(:class:`NotReplicated`), which ``dedup_on_redis_error`` decides on.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, Final

import redis
from redis.cluster import RedisCluster

from .model import ClaimStatus, LeaseStatus, Renewal

CLAIM_PART: Final = "claim"
LEASE_PART: Final = "lease"
FENCE_PART: Final = "fence"
DONE_PART: Final = "done:"
#: The parts that hold a key (a claim, or a lease set).
HELD_PARTS: Final = frozenset({CLAIM_PART, LEASE_PART})


@dataclasses.dataclass(frozen=True)
class KeyNames:
    """The Redis keys of one dedup key."""

    key: str
    claim: str
    lease: str
    fence: str
    done_prefix: str

    def done(self, task_id: str) -> str:
        """The completion marker of ``task_id``."""
        return self.done_prefix + task_id

    def keys(self, task_id: str = "") -> list[str]:
        """KEYS of every script: claim, lease, fence, ``task_id``'s marker."""
        return [self.claim, self.lease, self.fence, self.done(task_id)]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How dedup keys are named under one ``dedup_key_prefix``."""

    prefix: str

    def names(self, key: str) -> KeyNames:
        base = f"{self.prefix}:{{{key}}}:"
        return KeyNames(
            key,
            base + CLAIM_PART,
            base + LEASE_PART,
            base + FENCE_PART,
            base + DONE_PART,
        )

    def parse(self, name: str | bytes) -> tuple[str, str] | None:
        """``(dedup key, part)`` of a Redis key under this prefix, else None."""
        text = name.decode() if isinstance(name, bytes) else name
        found = re.match(rf"^{re.escape(self.prefix)}:\{{([^{{}}]+)\}}:(.+)$", text)
        return (found[1], found[2]) if found else None

    def pattern(self, key: str = "*") -> str:
        """A ``SCAN MATCH`` pattern for every part of ``key`` (or of all keys)."""
        literal = key if key == "*" else glob_escape(key)
        return f"{glob_escape(self.prefix)}:{{{literal}}}:*"


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis ``MATCH`` pattern."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


# Every script: KEYS[1] claim, KEYS[2] lease set, KEYS[3] fencing counter,
# KEYS[4] the done marker of the task id the script is about.

# ARGV: task id, claim TTL (ms).
# Returns {ClaimStatus, holder}: NEW (claimed now), OWN (the task id held it;
# its TTL is raised to ARGV[2] if that is longer), TAKEN (holder is another
# task id), DONE (the task id already ran to success).
CLAIM: Final = """
local task_id, ttl = ARGV[1], tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {3, task_id}
end
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], task_id, 'PX', ttl)
  return {1, task_id}
end
if holder == task_id then
  if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
  return {2, holder}
end
return {0, holder}
"""

# ARGV: task id, claim TTL (ms).
# Raises the claim's TTL to ARGV[2] only if the task id still holds it: a
# claim freed meanwhile (its body already started or ended) stays freed.
# Returns 1 if it held the claim, else 0.
CONFIRM: Final = """
local task_id, ttl = ARGV[1], tonumber(ARGV[2])
if redis.call('GET', KEYS[1]) ~= task_id then
  return 0
end
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""

# ARGV: task id.
# Deletes the claim if the task id holds it (compare-and-delete).
# Returns 1 if it did, else 0.
RELEASE_CLAIM: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# ARGV: member, task id, lease TTL (ms), dedup_max_running, fencing counter
# TTL (ms), free_claim ("1": delete the claim if the task id holds it, once
# acquired), claim TTL (ms; > 0: take the claim here, for a message no
# publisher claimed; "0": leave the claim alone).
# Returns {ACQUIRED, token, 1 if it took the claim}; {DONE}; {SAME_TASK, ms,
# id}: another delivery of this task id holds the key; {BUSY, ms, id}: other
# task ids fill the key (ms: until the earliest holder's lease ends);
# {CLAIMED, ms, id}: another task id holds the claim the delivery asked for.
ACQUIRE: Final = """
local member, task_id = ARGV[1], ARGV[2]
local ttl, max_running = tonumber(ARGV[3]), tonumber(ARGV[4])
local fence_ttl, free_claim, claim_ttl = ARGV[5], ARGV[6], tonumber(ARGV[7])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {2}
end
local claim_holder = false
if claim_ttl > 0 then
  claim_holder = redis.call('GET', KEYS[1])
  if claim_holder and claim_holder ~= task_id then
    return {5, redis.call('PTTL', KEYS[1]), claim_holder}
  end
end
local expire = true
if redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) >= 0
    and redis.call('EXISTS', KEYS[2]) == 1 then
  local holders = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local prefix = #task_id .. ':' .. task_id .. '|'
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
  if #holders / 2 >= max_running then
    return {4, first - now, first_id}
  end
  expire = redis.call('PTTL', KEYS[2]) < ttl
end
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
local token = t[1] * 1000000 + t[2]
if token <= last then token = last + 1 end
redis.call('SET', KEYS[3], string.format('%d', token), 'PX', fence_ttl)
redis.call('ZADD', KEYS[2], now + ttl, member)
if expire then redis.call('PEXPIRE', KEYS[2], ttl) end
local claimed = 0
if claim_ttl > 0 then
  if not claim_holder then
    redis.call('SET', KEYS[1], task_id, 'PX', claim_ttl)
  end
  claimed = 1
elseif free_claim == '1' and redis.call('GET', KEYS[1]) == task_id then
  redis.call('DEL', KEYS[1])
end
return {1, token, claimed}
"""

# ARGV: member, lease TTL (ms), replacing what was left. The fence is kept
# at least as long as the lease, so that a lease set gone with its fence
# means Redis lost its data, not that the lease ran out.
# Returns a Renewal: 1 if the member still held the key (now renewed); 0 if
# it is gone or expired; 2 if the lease set and the fence are both gone.
RENEW: Final = """
local member, ttl = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local expiry = redis.call('ZSCORE', KEYS[2], member)
if not expiry or tonumber(expiry) <= now then
  if redis.call('EXISTS', KEYS[2]) == 0 and redis.call('EXISTS', KEYS[3]) == 0 then
    return 2
  end
  return 0
end
redis.call('ZADD', KEYS[2], now + ttl, member)
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
if redis.call('PTTL', KEYS[3]) < ttl then redis.call('PEXPIRE', KEYS[3], ttl) end
return 1
"""

# ARGV: member ("" for a body that ran without a lease), task id, free_claim
# ("1": delete the claim if the task id holds it), completion memory (ms; 0:
# the task did not succeed), "1" if the member is a holder (a prefix: see
# lease.holder) whose lease, whichever delivery took it, is given back.
# Returns 1 if the member was still in the set, else 0: then another
# execution took the key (acquiring purges expired members) or it was freed
# by force. Completion is recorded only for a member still there, or for a
# body that ran without a lease.
RELEASE: Final = """
local member, task_id, free_claim = ARGV[1], ARGV[2], ARGV[3]
local done_ttl = tonumber(ARGV[4])
local held = 0
if ARGV[5] == '1' then
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    if m:sub(1, #member) == member then
      held = math.max(held, redis.call('ZREM', KEYS[2], m))
    end
  end
elseif member ~= '' then
  held = redis.call('ZREM', KEYS[2], member)
end
if free_claim == '1' and redis.call('GET', KEYS[1]) == task_id then
  redis.call('DEL', KEYS[1])
end
if (held == 1 or member == '') and done_ttl > 0 then
  redis.call('SET', KEYS[4], '1', 'PX', done_ttl)
end
return held
"""

# ARGV: none.
# Returns {now (ms of Redis time), claim holder or false, claim PTTL (ms),
# {member, expiry, member, expiry, ...} (by expiry), fence or false}.
READ: Final = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return {now, redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1]),
        redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES'),
        redis.call('GET', KEYS[3])}
"""

# ARGV: force ("1": delete whatever claim and lease set hold; "0": only if
# they are as read), the claim holder read ("" for none), then the lease set
# read: member, expiry, member, expiry, ... as READ returned them.
# Returns {1, claim holder or false, {member, expiry, ...}} when it deleted
# them, {0, claim holder or false, {...}} when they changed (nothing deleted).
# The fencing counter is never touched: tokens must never go back.
FORCE_RELEASE: Final = """
local claim = redis.call('GET', KEYS[1])
local members = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
if ARGV[1] ~= '1' then
  local same = (claim or '') == ARGV[2] and #members == #ARGV - 2
  for i = 1, #members do
    same = same and members[i] == ARGV[i + 2]
  end
  if not same then
    return {0, claim, members}
  end
end
redis.call('DEL', KEYS[1], KEYS[2])
return {1, claim, members}
"""


@dataclasses.dataclass(frozen=True)
class Claim:
    """What CLAIM answered: the status and the task id holding the claim."""

    status: ClaimStatus
    holder: str


class NotReplicated(redis.RedisError):
    """A lease write that fewer replicas than ``dedup_lease_replicas``
    acknowledged in time: a failover could lose it."""


@dataclasses.dataclass(frozen=True)
class Acquired:
    """What ACQUIRE answered: a status, and the token or the holder and wait."""

    status: LeaseStatus
    token: int = 0
    wait: float = 0.0  # seconds until the earliest holder's lease ends
    holder: str | None = None
    took_claim: bool = False


class Store:
    """The scripts of :mod:`celery_dedup.store` on one Redis client."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        prefix: str,
        *,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        self.client = client
        self.layout = Layout(prefix)
        self.replicas = replicas
        self.replica_timeout = replica_timeout
        self._claim = client.register_script(CLAIM)
        self._confirm = client.register_script(CONFIRM)
        self._release_claim = client.register_script(RELEASE_CLAIM)
        self._acquire = client.register_script(ACQUIRE)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        self._read = client.register_script(READ)
        self._force_release = client.register_script(FORCE_RELEASE)

    def names(self, key: str) -> KeyNames:
        return self.layout.names(key)

    # -- the enqueue claim ---------------------------------------------------

    def claim(self, key: str, task_id: str, ttl: float) -> Claim:
        """Claim ``key`` for ``task_id`` for ``ttl`` seconds, or say who has it."""
        status, holder = self._claim(
            keys=self.names(key).keys(task_id), args=[task_id, ms(ttl)]
        )
        return Claim(ClaimStatus(int(status)), text(holder))

    def confirm(self, key: str, task_id: str, ttl: float) -> bool:
        """Give ``task_id``'s claim ``ttl`` seconds, if it still holds it."""
        return bool(
            self._confirm(keys=self.names(key).keys(task_id), args=[task_id, ms(ttl)])
        )

    def release_claim(self, key: str, task_id: str) -> bool:
        """Free the claim if ``task_id`` holds it; True if it did."""
        return bool(
            self._release_claim(keys=self.names(key).keys(task_id), args=[task_id])
        )

    # -- the execution lease -------------------------------------------------

    def acquire(
        self,
        key: str,
        member: str,
        task_id: str,
        *,
        ttl: float,
        max_running: int,
        fence_ttl: float,
        free_claim: bool,
        claim_ttl: float = 0,
    ) -> Acquired:
        """Try to take the lease (see ACQUIRE); ``claim_ttl`` > 0 also takes
        the claim, for that long, if it is free."""
        names = self.names(key).keys(task_id)
        argv: list[str | int] = [
            member,
            task_id,
            ms(ttl),
            max_running,
            ms(fence_ttl),
            "1" if free_claim else "0",
            ms(claim_ttl, 0),
        ]
        reply, acked = self._replicated(
            key, None, lambda c: self._acquire(keys=names, args=argv, client=c)
        )
        status = LeaseStatus(int(reply[0]))
        if status is LeaseStatus.ACQUIRED:
            took_claim = bool(reply[2])
            if acked < self.replicas:
                self.release(key, member, task_id, free_claim=took_claim, done_ttl=0)
                raise self._not_replicated("acquire", key, acked)
            return Acquired(status, token=int(reply[1]), took_claim=took_claim)
        if status is LeaseStatus.DONE:
            return Acquired(status)
        wait = max(0, int(reply[1])) / 1000
        return Acquired(status, wait=wait, holder=text(reply[2]))

    def renew(self, key: str, member: str, ttl: float, client: Any = None) -> Renewal:
        """Renew ``member``'s lease for ``ttl`` s; false if it no longer holds
        it (the answer says why).

        ``client``: another connection to the same Redis (the heartbeat's).
        """
        names, argv = self.names(key).keys(), [member, str(ms(ttl))]
        reply, acked = self._replicated(
            key, client, lambda c: self._renew(keys=names, args=argv, client=c)
        )
        renewal = Renewal(int(reply))
        if renewal is Renewal.RENEWED and acked < self.replicas:
            raise self._not_replicated("renewal", key, acked)
        return renewal

    def _replicated(
        self, key: str, client: Any, script: Callable[[Any], Any]
    ) -> tuple[Any, int]:
        """Run ``script(client)``; with :attr:`replicas`, follow it with WAIT
        on the same connection (a pipeline on the node of ``key``) and say
        how many replicas acknowledged it."""
        client = client or self.client
        if not self.replicas:
            return script(client), 0
        if isinstance(client, RedisCluster):  # its pipeline refuses EVALSHA
            cluster: Any = client
            node = cluster.get_node_from_key(self.names(key).claim)
            client = cluster.get_redis_connection(node)
        pipe = client.pipeline(transaction=False)
        script(pipe)
        pipe.execute_command("WAIT", self.replicas, ms(self.replica_timeout))
        reply, acked = pipe.execute()
        return reply, int(acked)

    def _not_replicated(self, what: str, key: str, acked: int) -> NotReplicated:
        return NotReplicated(
            f"the lease {what} of {key} reached {acked} of {self.replicas} "
            f"replica(s) within {self.replica_timeout:g}s (dedup_lease_replicas)"
        )

    def release(
        self,
        key: str,
        member: str,
        task_id: str,
        *,
        free_claim: bool,
        done_ttl: float,
        by_holder: bool = False,
    ) -> bool:
        """Give back a lease (``member`` "" if none was held; ``by_holder``:
        ``member`` is a :func:`~celery_dedup.lease.holder`, a dead process's),
        free the claim if ``free_claim``, remember success for ``done_ttl`` s
        if > 0."""
        return bool(
            self._release(
                keys=self.names(key).keys(task_id),
                args=[
                    member,
                    task_id,
                    "1" if free_claim else "0",
                    ms(done_ttl, 0),
                    "1" if by_holder else "0",
                ],
            )
        )

    # -- inspection ----------------------------------------------------------

    def read(self, keys: Sequence[str], batch: int = 200) -> list[list[Any]]:
        """READ's raw answer for each of ``keys``, ``batch`` per round trip."""
        if isinstance(self.client, RedisCluster):
            return self._read_on_cluster(keys, batch)
        replies: list[list[Any]] = []
        for start in range(0, len(keys), batch):
            pipe = self.client.pipeline(transaction=False)
            for key in keys[start : start + batch]:
                self._read(keys=self.names(key).keys(), client=pipe)
            replies += pipe.execute()
        return replies

    def _read_on_cluster(self, keys: Sequence[str], batch: int) -> list[list[Any]]:
        """:meth:`read` on a cluster, whose pipeline refuses EVALSHA: each
        node's keys in a pipeline on that node's own client, which loads the
        script first if the node lacks it. A slot moved meanwhile (a
        resharding) fails the read with MOVED: read again."""
        cluster: Any = self.client
        nodes: dict[str, Any] = {}
        by_node: dict[str, list[str]] = {}
        for key in dict.fromkeys(keys):
            node = cluster.get_node_from_key(self.names(key).claim)
            nodes[node.name] = node
            by_node.setdefault(node.name, []).append(key)
        replies: dict[str, list[Any]] = {}
        for name, some in by_node.items():
            server = Store(
                cluster.get_redis_connection(nodes[name]), self.layout.prefix
            )
            replies.update(zip(some, server.read(some, batch), strict=True))
        return [replies[key] for key in keys]

    def force_release(
        self, key: str, claim: str, members: Sequence[str], force: bool
    ) -> list[Any]:
        """FORCE_RELEASE's raw answer (see there)."""
        return list(
            self._force_release(
                keys=self.names(key).keys(),
                args=["1" if force else "0", claim, *members],
            )
        )

    def done_ttls(self, key: str, task_ids: Sequence[str]) -> list[int]:
        """PTTL (ms; -2: absent) of each task id's completion marker."""
        pipe = self.client.pipeline(transaction=False)
        names = self.names(key)
        for task_id in task_ids:
            pipe.pttl(names.done(task_id))
        return [int(x) for x in pipe.execute()]


def ms(seconds: float, floor: int = 1) -> int:
    """Seconds as whole milliseconds, at least ``floor``."""
    return max(floor, int(seconds * 1000))


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
