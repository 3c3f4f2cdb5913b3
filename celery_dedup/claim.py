"""The enqueue claim: one Redis key per dedup key, naming the task that holds it.

Taken in one round trip before a publish; released (owner-checked) when the
task finishes, starts or fails, as its lock mode says, or when the publish
itself fails.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any, Final

import redis

# KEYS[1] - the claim key
# KEYS[2] - the completion marker of the task id asking (see lease.py)
# ARGV[1] - the task id asking for it
# ARGV[2] - time to live, in milliseconds
# Returns {1, id} for a new claim, {2, id} when ARGV[1] already held it (its TTL
# is raised to ARGV[2] if that is longer), {0, holder id} when another holds
# it, {3, id} when that very task id already ran to success.
CLAIM: Final = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {3, ARGV[1]}
end
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, ARGV[1]}
end
if holder == ARGV[1] then
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
  return {2, holder}
end
return {0, holder}
"""

# KEYS[1] - the claim key
# ARGV[1] - the task id that believes it holds it
# Returns 1 if it held the claim and it is now deleted, else 0.
RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

NEW: Final = 1
OWN: Final = 2
TAKEN: Final = 0
DONE: Final = 3


@dataclasses.dataclass(frozen=True)
class ClaimResult:
    """What the claim script answered: NEW, OWN, TAKEN or DONE, and the holder."""

    status: int
    holder: str

    @property
    def acquired(self) -> bool:
        return self.status in (NEW, OWN)


class Claims:
    """The claim scripts, registered once on one Redis client."""

    def __init__(self, client: redis.Redis) -> None:
        self._claim = client.register_script(CLAIM)
        self._release = client.register_script(RELEASE)

    def claim(self, key: str, done: str, task_id: str, ttl: float) -> ClaimResult:
        """Claim ``key`` for ``task_id`` for ``ttl`` seconds, or report its holder.

        ``done`` is the task id's completion marker: a task id that already
        succeeded is not published again.
        """
        status, holder = self._claim(keys=[key, done], args=[task_id, _ms(ttl)])
        return ClaimResult(int(status), _text(holder))

    def release(self, key: str, task_id: str) -> bool:
        """Delete ``key`` if ``task_id`` holds it; True if it did."""
        return bool(self._release(keys=[key], args=[task_id]))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def ttl_for(ttl: float, options: Mapping[str, Any]) -> float:
    """How long a claim lives: ``ttl`` plus the wait for an ``eta`` or
    ``countdown``, but never past ``expires`` (after which the task won't run)."""
    eta, countdown, expires = (
        options.get("eta"),
        options.get("countdown"),
        options.get("expires"),
    )
    if eta is None and countdown is None and expires is None:
        return ttl
    now = datetime.datetime.now(datetime.timezone.utc)
    delay = _seconds_until(eta, now) if eta is not None else float(countdown or 0)
    total = ttl + max(0.0, delay)
    if expires is not None:
        left = (
            float(expires)
            if isinstance(expires, int | float)
            else _seconds_until(expires, now)
        )
        total = min(total, max(left, 0.001))
    return float(total)


def _seconds_until(moment: object, now: datetime.datetime) -> float:
    if isinstance(moment, str):  # a retry carries eta and expires as ISO 8601
        moment = datetime.datetime.fromisoformat(moment)
    if not isinstance(moment, datetime.datetime):
        return 0.0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return (moment - now).total_seconds()
