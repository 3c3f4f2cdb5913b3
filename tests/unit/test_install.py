"""install(app) adopts foreign tasks: their own options and annotations hold."""

from __future__ import annotations

import pytest
from celery import Celery, Task

from celery_dedup import ConfigurationError, DedupTask, install
from celery_dedup.checks import problems


class VendorTask(Task):  # type: ignore[type-arg]
    """Someone else's base class."""


def make_app(**conf: object) -> Celery:
    app = Celery("adopting", broker="memory://", set_as_current=False)
    app.conf.update(dedup_redis_url="redis://127.0.0.1:1/0", **conf)
    return app


def test_annotations_survive_adoption() -> None:
    app = make_app(
        dedup_tasks={"x.vendor": {}},
        task_annotations={"x.vendor": {"dedup_lock": "until_expired"}},
    )

    @app.task(base=VendorTask, name="x.vendor", shared=False)
    def vendor() -> None: ...

    install(app)
    task = app.tasks["x.vendor"]
    assert isinstance(task, DedupTask)
    assert isinstance(task, VendorTask)
    assert task.dedup_options().lock == "until_expired"


def test_a_bad_annotation_is_named_at_adoption() -> None:
    app = make_app(
        dedup_tasks={"x.bad": {}}, task_annotations={"x.bad": {"dedup_lock": "often"}}
    )

    @app.task(base=VendorTask, name="x.bad", shared=False)
    def bad() -> None: ...

    install(app)
    task = app.tasks["x.bad"]  # adopted; Celery's finalize swallows errors
    with pytest.raises(ConfigurationError, match=r"x\.bad\.dedup_lock"):
        task.apply_async()  # so the bad option stops its first use
    with pytest.raises(ConfigurationError, match=r"x\.bad\.dedup_lock"):
        problems(app)  # and the worker's start-up


def test_install_is_idempotent() -> None:
    app = make_app()
    install(app)
    install(app)
    app.finalize()
