"""Dedup keys: bound to the signature, canonical, stable across processes."""

from __future__ import annotations

import datetime
import decimal
import os
import subprocess
import sys
import threading
import uuid
from typing import Any

import pytest

from celery_dedup import ConfigurationError
from celery_dedup.keys import canonical, check_key_names, make_key, task_signature
from celery_dedup.store import Layout


def job(campaign_id: int, region: str = "eu", *, dry_run: bool = False) -> None: ...


def variadic(*args: Any, **kwargs: Any) -> None: ...


SIG = task_signature(job)


def key(*args: Any, spec: Any = None, **kwargs: Any) -> str:
    return make_key("proj.job", SIG, spec, args, kwargs)


def test_positional_and_keyword_calls_are_one_job() -> None:
    assert key(1) == key(campaign_id=1) == key(1, "eu") == key(1, region="eu")
    assert key(1) == key(1, dry_run=False)


def test_distinct_arguments_are_distinct_jobs() -> None:
    assert len({key(1), key(2), key(1, "us"), key(1, dry_run=True)}) == 4


def test_the_task_name_is_part_of_the_key() -> None:
    assert make_key("a", SIG, None, (1,), {}) != make_key("b", SIG, None, (1,), {})


def test_argument_names_pick_what_counts() -> None:
    spec = ("campaign_id",)
    assert key(1, "eu", spec=spec) == key(1, "us", spec=spec)
    assert key(1, spec=spec) != key(2, spec=spec)


def test_a_callable_computes_the_key() -> None:
    def by_region(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        return str(kwargs.get("region"))

    assert key(1, region="x", spec=by_region) == key(2, region="x", spec=by_region)


def test_a_callable_must_return_a_string() -> None:
    with pytest.raises(ConfigurationError, match="expected a str"):
        key(1, spec=lambda args, kwargs: 42)


def test_a_string_is_the_key_itself() -> None:
    assert key(1, spec="campaign-1") == key(2, spec="campaign-1")
    assert key(1, spec="campaign-1") != key(1, spec="campaign-2")


def test_an_unknown_argument_name_is_named() -> None:
    with pytest.raises(ConfigurationError, match="no argument 'campaign'"):
        key(1, spec=("campaign",))


def test_an_argument_that_cannot_be_serialised_nor_pickled_is_named() -> None:
    with pytest.raises(ConfigurationError) as caught:
        key(threading.Lock())
    assert caught.value.setting == "argument 'campaign_id'"
    assert "nor pickle it" in caught.value.message


def test_other_values_are_keyed_by_their_pickle() -> None:
    # A task with the pickle serializer may take exceptions and objects.
    assert key(ValueError("x")) == key(ValueError("x"))
    assert key(ValueError("x")) != key(ValueError("y"))
    assert key(ValueError("x")) != key(KeyError("x"))
    assert key(ValueError("x")) != key("ValueError('x')")


def test_wrong_arguments_are_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"proj\.job"):
        key(1, 2, 3)


def test_wrong_arguments_are_keyed_raw_when_not_strict() -> None:
    # typing=False, or a delivery: the body raises the TypeError itself.
    sig = task_signature(job)
    loose = make_key("proj.job", sig, None, (1, 2, 3), {}, strict=False)
    assert loose == make_key("proj.job", sig, None, (1, 2, 3), {}, strict=False)
    assert loose != make_key("proj.job", sig, None, (1, 2, 4), {}, strict=False)
    assert make_key("proj.job", sig, None, (1,), {}, strict=False) == key(1)


def test_functions_taking_only_star_args_are_keyed_by_position() -> None:
    sig = task_signature(variadic)
    assert sig is None
    a = make_key("v", sig, None, (1, 2), {"k": 3})
    assert a == make_key("v", sig, None, [1, 2], {"k": 3})
    assert a != make_key("v", sig, None, (2, 1), {"k": 3})


def test_extra_types_are_canonical() -> None:
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    values = [
        when,
        decimal.Decimal("1.10"),
        uuid.UUID(int=7),
        b"\x00\xff",
        {3, 1, 2},
        frozenset({"b", "a"}),
        datetime.date(2026, 1, 2),
    ]
    for value in values:
        assert key(value) == key(value)
    assert key({1, 2, 3}) == key({3, 2, 1})
    assert key({"b": 1, "a": 2}) == key({"a": 2, "b": 1})
    assert key(1) != key(1.5)


def test_redis_keys_share_one_cluster_hash_tag() -> None:
    names = Layout("dedup").names("abc")
    assert names.keys("t") == [
        "dedup:{abc}:claim",
        "dedup:{abc}:lease",
        "dedup:{abc}:fence",
        "dedup:{abc}:done:t",
    ]


_PROBE = """
import datetime, decimal, sys
sys.path.insert(0, {root!r})
from celery_dedup.keys import make_key, task_signature
def job(campaign_id, region="eu", *, tags=frozenset(), when=None): ...
print(make_key("proj.job", task_signature(job), None, (7,),
      {{"tags": {{"a", "b", "c", "d"}}, "when": decimal.Decimal("2.50"),
        "region": "ü"}}))
"""


def test_keys_are_stable_across_processes_and_hash_seeds() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    seen = set()
    for seed in ("0", "1", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", _PROBE.format(root=root)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        seen.add(out.stdout.strip())
    assert len(seen) == 1
    (value,) = seen
    assert len(value) == 32
    int(value, 16)


UTC = datetime.timezone.utc
PLUS_ONE = datetime.timezone(datetime.timedelta(hours=1))


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ((1, 2), [1, 2], True),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}, True),
        ({1: "a"}, {"1": "a"}, True),
        ({1, 2}, frozenset({2, 1}), True),
        (1, 1.0, False),
        (True, 1, False),
        ("1", 1, False),
        ({1}, [1], False),
        (decimal.Decimal("1.0"), decimal.Decimal("1.00"), False),
        (decimal.Decimal("1"), 1, False),
        (
            datetime.datetime(2026, 1, 1),
            datetime.datetime(2026, 1, 1, tzinfo=UTC),
            False,
        ),
        (
            datetime.datetime(2026, 1, 1, 1, tzinfo=PLUS_ONE),
            datetime.datetime(2026, 1, 1, tzinfo=UTC),
            False,
        ),
        (datetime.date(2026, 1, 1), datetime.datetime(2026, 1, 1), False),
        (b"a", "a", False),
    ],
)
def test_key_equality_rules_as_documented(one: Any, other: Any, same: bool) -> None:
    """The table of docs/configuration.md (dedup_key)."""
    assert (canonical((one,), {}) == canonical((other,), {})) is same


def _run(self: Any, user_id: int, *rest: Any, when: str = "", **extra: Any) -> None:
    """A task's run: self, a parameter, *args, a keyword, **kwargs."""


@pytest.mark.parametrize("names", [("user_id",), ("*rest", "when"), ("**any",)])
def test_key_names_a_task_has_pass(names: tuple[str, ...]) -> None:
    check_key_names("t", task_signature(_run), names)


@pytest.mark.parametrize("names", [("usr",), ("rest",), ("user_id", "extra")])
def test_a_key_name_the_task_lacks_is_refused(names: tuple[str, ...]) -> None:
    def run(user_id: int, *rest: Any, when: str = "") -> None: ...

    with pytest.raises(ConfigurationError) as caught:
        check_key_names("proj.job", task_signature(run), names)
    assert caught.value.setting == "dedup_key"
    assert "proj.job has no argument" in str(caught.value)
    assert "*rest, user_id, when" in str(caught.value)


def test_without_a_signature_any_key_name_passes() -> None:
    def run(*args: Any, **kwargs: Any) -> None: ...

    check_key_names("t", task_signature(run), ("anything",))
