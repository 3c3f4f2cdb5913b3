"""Keys for periodic and start-up jobs: by epoch period, not by process."""

from __future__ import annotations

import pytest

from celery_dedup import ConfigurationError, once_per_period, per_period
from celery_dedup.periodic import time as periodic_time


def test_one_key_per_period(monkeypatch: pytest.MonkeyPatch) -> None:
    key = per_period(60)
    monkeypatch.setattr(periodic_time, "time", lambda: 120.0)
    start = key((1,), {"a": 2})
    monkeypatch.setattr(periodic_time, "time", lambda: 179.9)
    assert key((1,), {"a": 2}) == start  # same period, whoever asks
    assert key((2,), {"a": 2}) != start  # other arguments: another job
    monkeypatch.setattr(periodic_time, "time", lambda: 180.0)
    assert key((1,), {"a": 2}) != start  # the next period


def test_the_key_does_not_depend_on_who_made_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(periodic_time, "time", lambda: 1_000_000.5)
    assert per_period(3600)((), {}) == per_period(3600)((), {})


def test_once_per_period_options() -> None:
    options = once_per_period(30)
    assert options["dedup_lock"] == "until_expired"
    assert options["dedup_ttl"] == 30.0
    assert callable(options["dedup_key"])


@pytest.mark.parametrize("bad", [0, -1, "60", True])
def test_a_bad_period_is_named(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="per_period"):
        per_period(bad)  # type: ignore[arg-type]
