"""``dedup_redis_url`` for a Cluster or Sentinel, and ``dedup_redis_options``:
what each form parses to, and the ConfigurationError of a malformed one,
which the worker's start-up checks raise (no Redis is contacted)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from celery import Celery

from celery_dedup import BackendUnavailableError, ConfigurationError, DedupTask
from celery_dedup.checks import problems
from celery_dedup.connection import (
    Target,
    display_url,
    get_backend,
    parse_url,
    redis_url,
)
from tests.rig import free_port


def app_with(**conf: Any) -> Celery:
    app = Celery("urls", broker="memory://", set_as_current=False)
    app.conf.update(conf)

    @app.task(base=DedupTask, dedup_key=("n",), name=f"job-{uuid.uuid4().hex}")
    def job(n: int) -> None: ...

    return app


@pytest.mark.parametrize(
    ("url", "options", "expected"),
    [
        (
            "redis+cluster://a:7000,b:7001/",
            {},
            Target("cluster", "", (("a", 7000), ("b", 7001))),
        ),
        (
            "rediss+cluster://u:p%40ss@[::1]:7000,b",
            {},
            Target(
                "cluster",
                "",
                (("::1", 7000), ("b", 6379)),
                username="u",
                password="p@ss",
                ssl=True,
            ),
        ),
        (
            "redis+sentinel://:pw@s1:26379,s2/mymaster/3",
            {},
            Target(
                "sentinel",
                "",
                (("s1", 26379), ("s2", 26379)),
                master_name="mymaster",
                db=3,
                password="pw",
            ),
        ),
        (
            "sentinel://:pw@s1:26380;sentinel://s2:26381/2",
            {"master_name": "m", "sentinel_kwargs": {"password": "x"}},
            Target(
                "sentinel",
                "",
                (("s1", 26380), ("s2", 26381)),
                master_name="m",
                db=2,
                password="pw",
                sentinel_kwargs={"password": "x"},
            ),
        ),
    ],
)
def test_accepted_forms(url: str, options: dict[str, Any], expected: Target) -> None:
    target = parse_url(url, options)
    assert target == Target(**{**expected.__dict__, "url": url})


@pytest.mark.parametrize(
    ("url", "options", "setting", "message"),
    [
        ("redis+cluster://", {}, "dedup_redis_url", "host:port"),
        ("redis+cluster://a:7000,,b:1/", {}, "dedup_redis_url", "host:port"),
        ("redis+cluster://a:99999/", {}, "dedup_redis_url", "out of range"),
        ("redis+cluster://a:7000/3", {}, "dedup_redis_url", "no path"),
        ("redis+cluster://a:7000/?x=1", {}, "dedup_redis_url", "query"),
        ("redis+sentinel://s:26379", {}, "dedup_redis_url", "master name"),
        ("redis+sentinel://s:26379/m/x", {}, "dedup_redis_url", "database"),
        ("sentinel://s:26379/0", {}, "dedup_redis_options", "master name"),
        ("sentinel://s:1;redis://s:2", {"master_name": "m"}, "dedup_redis_url", ";"),
        (
            "sentinel://s:1/1;sentinel://s:2/2",
            {"master_name": "m"},
            "dedup_redis_url",
            "several databases",
        ),
        (
            "redis+sentinel://s:1/a",
            {"master_name": "b"},
            "dedup_redis_options",
            "differs",
        ),
        ("http://h", {}, "dedup_redis_url", r"redis\+cluster:"),
    ],
)
def test_malformed_urls_fail_the_start_up_checks(
    url: str, options: dict[str, Any], setting: str, message: str
) -> None:
    app = app_with(dedup_redis_url=url, dedup_redis_options=options)
    for check in (redis_url, problems):
        with pytest.raises(ConfigurationError, match=message) as caught:
            check(app)
        assert caught.value.setting == setting


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://u:secret@a:1/3",
        "sentinel://:secret@a:1;sentinel://:secret@b:x/0",
    ],
)
def test_a_password_stays_out_of_the_message(url: str) -> None:
    app = app_with(dedup_redis_url=url)
    with pytest.raises(ConfigurationError) as caught:
        redis_url(app)
    assert "secret" not in str(caught.value) and "**" in str(caught.value)


@pytest.mark.parametrize(
    ("options", "setting", "message"),
    [
        ("m", "dedup_redis_options", "a mapping"),
        ({"master": "m", "zz": 1}, "dedup_redis_options", "unknown option.*master, zz"),
        ({"master_name": 3}, "dedup_redis_options['master_name']", "str"),
        ({"sentinel_kwargs": 3}, "dedup_redis_options['sentinel_kwargs']", "Mapping"),
    ],
)
def test_redis_options_are_checked(options: Any, setting: str, message: str) -> None:
    app = app_with(dedup_redis_url="sentinel://h/0", dedup_redis_options=options)
    with pytest.raises(ConfigurationError, match=message) as caught:
        problems(app)
    assert caught.value.setting == setting


def test_display_url_masks_every_password() -> None:
    url = "sentinel://:pw1@s1:1;sentinel://u:pw2@s2:2/0"
    app = app_with(dedup_redis_url=url, dedup_redis_options={"master_name": "m"})
    assert display_url(app) == "sentinel://:**@s1:1;sentinel://u:**@s2:2/0"
    app = app_with(dedup_redis_url="redis://:pw@h:1/0")
    assert display_url(app) == "redis://:**@h:1/0"


def test_an_unreachable_cluster_is_a_redis_error() -> None:
    app = app_with(dedup_redis_url=f"redis+cluster://127.0.0.1:{free_port()}")
    with pytest.raises(redis.ConnectionError, match="Redis Cluster unreachable"):
        get_backend(app)


def test_options_are_refused_with_a_url_that_is_not_sentinel() -> None:
    app = app_with(
        dedup_redis_url="redis+cluster://a:1", dedup_redis_options={"master_name": "m"}
    )
    with pytest.raises(ConfigurationError, match="only a Sentinel") as caught:
        problems(app)
    assert caught.value.setting == "dedup_redis_options"


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://:s3cret@127.0.0.1:{p},127.0.0.1:{q}/",
        "redis+sentinel://:s3cret@127.0.0.1:{p},127.0.0.1:{q}/m",
    ],
)
def test_redis_down_at_enqueue_names_the_topology_password_masked(url: str) -> None:
    url = url.format(p=free_port(), q=free_port())
    app = app_with(dedup_redis_url=url)

    @app.task(base=DedupTask, name=f"down-{uuid.uuid4().hex}", shared=False)
    def job(n: int) -> int:
        return n

    with pytest.raises(BackendUnavailableError) as down:
        job.apply_async((1,))
    assert url.replace("s3cret", "**") in str(down.value)
    assert "s3cret" not in str(down.value)
