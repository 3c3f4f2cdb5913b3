"""Start-up checks: settings that defeat a guarantee are named."""

from __future__ import annotations

import pytest
from celery import Celery

from celery_dedup import ConfigurationError, DedupTask
from celery_dedup.checks import problems


def make_app(**conf: object) -> Celery:
    app = Celery("checks", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.update(conf)
    return app


def test_a_sound_configuration_has_no_problems() -> None:
    assert problems(make_app()) == []


def test_completion_memory_shorter_than_the_visibility_timeout() -> None:
    app = make_app(
        dedup_done_ttl=600, broker_transport_options={"visibility_timeout": 3600}
    )
    (problem,) = problems(app)
    assert problem.startswith("dedup_done_ttl (600s) is shorter than")


def test_a_claim_shorter_than_the_time_limit() -> None:
    app = make_app(dedup_ttl=60)

    @app.task(base=DedupTask, name="checks.long", time_limit=600, shared=False)
    def long_job() -> None: ...

    app.finalize()
    (problem,) = problems(app)
    assert problem.startswith("checks.long: dedup_ttl (60s) is shorter")


def test_a_bad_setting_is_raised_by_the_check() -> None:
    with pytest.raises(ConfigurationError, match="dedup_lock"):
        problems(make_app(dedup_lock="sometimes"))
