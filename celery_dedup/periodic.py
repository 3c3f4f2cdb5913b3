"""Periodic and start-up jobs: one run per period for the whole fleet.

Every container enqueues the same bootstrap job at start-up, and every beat
process ticks the same schedule (seeds 002 and S10). Give the task a key that
names the period, not the process or the moment::

    @app.task(base=DedupTask, **once_per_period(3600))
    def refresh_usage(): ...

    refresh_usage.delay()          # at start-up, in every container: one run

Periods are counted from the Unix epoch, so every process agrees on them
whenever it started; the claim lives one period (``until_expired``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .exceptions import ConfigurationError
from .keys import canonical


def per_period(seconds: float) -> Callable[[tuple[Any, ...], dict[str, Any]], str]:
    """A ``dedup_key``: the call's arguments and the current period's number.

    Two calls with the same arguments in the same ``seconds``-long period
    (epoch-aligned) are one job, on any host whose clock is within a small
    fraction of a period of the others'.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ConfigurationError("per_period", f"expected seconds, got {seconds!r}")
    if not seconds > 0:
        raise ConfigurationError("per_period", f"must be > 0, got {seconds!r}")

    def key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        period = int(time.time() // seconds)
        return f"per {seconds:g}s #{period} {canonical(args, kwargs)}"

    key.__qualname__ = key.__name__ = f"per_period({seconds:g})"
    return key


def once_per_period(seconds: float) -> dict[str, Any]:
    """Task options for a job that runs once per period, however often and
    from however many processes it is enqueued (bootstrap, beat, both)."""
    return {
        "dedup_key": per_period(seconds),
        "dedup_lock": "until_expired",
        "dedup_ttl": float(seconds),
    }
