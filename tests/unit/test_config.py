"""Settings: read once, validated, and errors that name the setting."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_dedup import ConfigurationError, DedupTask
from celery_dedup.config import DedupConfig, from_mapping, get_config, resolve
from celery_dedup.connection import redis_url, reset


def test_defaults_when_nothing_is_set() -> None:
    assert from_mapping({"broker_url": "memory://"}) == DedupConfig()


def test_every_setting_is_read() -> None:
    config = from_mapping(
        {
            "dedup_enabled": False,
            "dedup_redis_url": "redis://127.0.0.1:1/3",
            "dedup_key_prefix": "jobs",
            "dedup_lock": "until_expired",
            "dedup_on_conflict": "raise",
            "dedup_ttl": 30,
            "dedup_lock_ttl": 10.5,
            "dedup_done_ttl": 600,
            "dedup_tasks": {"proj.t": {"dedup_lock": "while_executing"}},
            "dedup_on_redis_error": "proceed",
            "dedup_outbox_url": "sqlite://",
            "dedup_outbox_table": "events",
            "dedup_outbox_exchange": "proj.events",
            "dedup_outbox_relay": True,
        }
    )
    assert config == DedupConfig(
        enabled=False,
        redis_url="redis://127.0.0.1:1/3",
        key_prefix="jobs",
        lock="until_expired",
        on_conflict="raise",
        ttl=30.0,
        lock_ttl=10.5,
        done_ttl=600.0,
        tasks={"proj.t": {"dedup_lock": "while_executing"}},
        on_redis_error="proceed",
        outbox_url="sqlite://",
        outbox_table="events",
        outbox_exchange="proj.events",
        outbox_relay=True,
    )


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"dedup_tll": 5}, "dedup_tll"),
        ({"dedup_ttl": "60"}, "dedup_ttl"),
        ({"dedup_ttl": 0}, "dedup_ttl"),
        ({"dedup_ttl": True}, "dedup_ttl"),
        ({"dedup_lock_ttl": -1}, "dedup_lock_ttl"),
        ({"dedup_lock": "forever"}, "dedup_lock"),
        ({"dedup_on_conflict": "ignore"}, "dedup_on_conflict"),
        ({"dedup_enabled": "yes"}, "dedup_enabled"),
        ({"dedup_key_prefix": "a{b}"}, "dedup_key_prefix"),
        ({"dedup_outbox_table": "drop table;"}, "dedup_outbox_table"),
        ({"dedup_on_redis_error": "ignore"}, "dedup_on_redis_error"),
        ({"dedup_tasks": ["t"]}, "dedup_tasks"),
        ({"dedup_tasks": {"t": {"dedup_ttl": "x"}}}, "dedup_tasks['t'].dedup_ttl"),
        ({"dedup_tasks": {"t": {"ttl": 1}}}, "dedup_tasks['t'].ttl"),
        ({"dedup_ttl": float("inf")}, "dedup_ttl"),
        ({"dedup_ttl": 1e20}, "dedup_ttl"),
        ({"dedup_lock_ttl": float("nan")}, "dedup_lock_ttl"),
        ({"dedup_lock_ttl": float("inf")}, "dedup_lock_ttl"),
        ({"dedup_done_ttl": 0.0001}, "dedup_done_ttl"),
        (
            {"dedup_tasks": {"t": {"dedup_lock_ttl": 1e13}}},
            "dedup_tasks['t'].dedup_lock_ttl",
        ),
        ({"dedup_outbox_max_payload": 0}, "dedup_outbox_max_payload"),
        ({"dedup_outbox_max_payload": 1.5}, "dedup_outbox_max_payload"),
        ({"dedup_lease_replicas": -1}, "dedup_lease_replicas"),
        ({"dedup_lease_replicas": True}, "dedup_lease_replicas"),
        ({"dedup_lease_replicas_timeout": 0}, "dedup_lease_replicas_timeout"),
    ],
)
def test_a_bad_setting_is_named(settings: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        from_mapping(settings)
    assert caught.value.setting == named
    assert str(caught.value).startswith(f"{named}: ")


def test_read_once_and_cached_per_app() -> None:
    app = Celery("cached", broker="memory://", set_as_current=False)
    app.conf.dedup_ttl = 5
    first = get_config(app)
    app.conf.dedup_ttl = 7
    assert get_config(app) is first
    reset(app)
    assert get_config(app).ttl == 7


def test_unknown_setting_fails_when_the_app_first_uses_it(celery_app: Celery) -> None:
    celery_app.conf.dedup_lokc = "until_executing"
    reset(celery_app)
    with pytest.raises(ConfigurationError, match="dedup_lokc"):
        get_config(celery_app)


def test_precedence_call_over_attribute_over_dedup_tasks_over_setting() -> None:
    config = from_mapping(
        {"dedup_ttl": 1, "dedup_tasks": {"t": {"dedup_ttl": 2, "dedup_lock_ttl": 9}}}
    )
    assert resolve(config, "t", {}, {}).ttl == 2
    assert resolve(config, "t", {"dedup_ttl": 3}, {}).ttl == 3
    assert resolve(config, "t", {"dedup_ttl": 3}, {"dedup_ttl": 4}).ttl == 4
    assert resolve(config, "t", {"dedup_ttl": 3}, {}).lock_ttl == 9
    assert resolve(config, "other", {}, {}).ttl == 1


def test_redis_url_defaults_to_a_redis_broker_or_backend() -> None:
    app = Celery("u", broker="redis://h:1/2", set_as_current=False)
    assert redis_url(app) == "redis://h:1/2"
    app = Celery("u", broker="amqp://", backend="redis://h:3/4", set_as_current=False)
    assert redis_url(app) == "redis://h:3/4"


def test_redis_url_missing_is_a_clear_error() -> None:
    app = Celery("u", broker="amqp://", set_as_current=False)
    with pytest.raises(ConfigurationError, match="dedup_redis_url"):
        redis_url(app)
    app.conf.dedup_redis_url = "http://h"
    reset(app)
    with pytest.raises(ConfigurationError, match="dedup_redis_url"):
        redis_url(app)


def test_a_bad_task_option_is_named_with_the_task() -> None:
    app = Celery("opts", broker="memory://", set_as_current=False)

    @app.task(base=DedupTask, dedup_lock="sometimes", name="opts.bad", shared=False)
    def bad() -> None: ...

    with pytest.raises(ConfigurationError) as caught:
        app.finalize()
    assert caught.value.setting == "opts.bad.dedup_lock"


def test_an_unknown_task_option_is_named() -> None:
    app = Celery("opts", broker="memory://", set_as_current=False)

    @app.task(base=DedupTask, dedup_tll=5, name="opts.typo", shared=False)
    def typo() -> None: ...

    with pytest.raises(ConfigurationError, match=r"opts\.typo\.dedup_tll"):
        app.finalize()


def test_a_bare_string_key_attribute_is_refused() -> None:
    app = Celery("opts", broker="memory://", set_as_current=False)

    @app.task(base=DedupTask, dedup_key="x", name="opts.str", shared=False)
    def keyed(x: int) -> None: ...

    with pytest.raises(ConfigurationError, match=r"\('x',\)"):
        app.finalize()


def test_namespaced_and_uppercase_settings_are_read() -> None:
    import types

    settings = types.ModuleType("djangoish")
    settings.CELERY_BROKER_URL = "memory://"  # type: ignore[attr-defined]
    settings.CELERY_DEDUP_TTL = 5  # type: ignore[attr-defined]
    app = Celery("ns", set_as_current=False)
    app.config_from_object(settings, namespace="CELERY")
    assert get_config(app).ttl == 5.0

    settings.CELERY_DEDUP_TLL = 5  # type: ignore[attr-defined]
    app = Celery("ns", set_as_current=False)
    app.config_from_object(settings, namespace="CELERY")
    with pytest.raises(ConfigurationError, match="CELERY_DEDUP_TLL"):
        get_config(app)


def test_a_misspelt_call_option_is_an_error() -> None:
    app = Celery("typo", broker="memory://", set_as_current=False)

    @app.task(base=DedupTask, name="typo.job", shared=False)
    def job(n: int) -> None: ...

    with pytest.raises(ConfigurationError, match=r"apply_async: dedup_tll"):
        job.apply_async((1,), dedup_tll=5)
    with pytest.raises(ConfigurationError, match=r"apply_async: dedup_ttl"):
        job.apply_async((1,), dedup_ttl="soon")
    with pytest.raises(ConfigurationError, match=r"dedup_key_for: queue"):
        job.dedup_key_for((1,), queue="q")


def test_durations_reach_from_a_millisecond_to_the_bound() -> None:
    config = from_mapping({"dedup_ttl": 0.001, "dedup_done_ttl": 10**12})
    assert (config.ttl, config.done_ttl) == (0.001, 1e12)


def test_a_per_call_infinite_ttl_is_refused_naming_it(celery_app: Celery) -> None:
    @celery_app.task(base=DedupTask, shared=False)
    def job(n: int) -> int:
        return n

    with pytest.raises(ConfigurationError) as caught:
        job.apply_async((1,), dedup_ttl=float("inf"))
    assert "dedup_ttl" in str(caught.value)
    assert "inf" in str(caught.value)
