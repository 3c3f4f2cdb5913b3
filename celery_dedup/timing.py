"""How long a claim lives, from a call's ``eta``, ``countdown`` and ``expires``."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any


def claim_ttl(ttl: float, options: Mapping[str, Any]) -> float:
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
