"""The ownership rule (S11), from inspect replies to a report, no servers."""

from __future__ import annotations

from typing import Any

from celery_dedup.ownership import Conflict, analyse, task_names


def queues(*names: str) -> list[dict[str, Any]]:
    """An ``active_queues()`` reply: queue dicts as Celery sends them."""
    return [{"name": name, "routing_key": name, "exclusive": False} for name in names]


def test_workers_of_one_service_are_clean() -> None:
    report = analyse(
        {"a@h": ["books.parse", "books.index"], "b@h": ["books.index", "books.parse"]},
        {"a@h": queues("jobs"), "b@h": queues("jobs")},
    )
    assert report.ok
    [jobs] = report.queues
    assert (jobs.name, jobs.workers, jobs.conflicts, jobs.shared) == (
        "jobs",
        ("a@h", "b@h"),
        (),
        (),
    )


def test_two_services_on_one_queue_conflict() -> None:
    # Given seed 001: the API and the workers both take books.parse
    report = analyse(
        {"api@h": ["books.parse", "api.mail"], "workers@h": ["books.parse", "audio"]},
        {"api@h": queues("jobs"), "workers@h": queues("jobs")},
    )
    assert not report.ok
    [jobs] = report.queues
    assert jobs.conflicts == (
        Conflict("api.mail", served_by=("api@h",), missing_from=("workers@h",)),
        Conflict("audio", served_by=("workers@h",), missing_from=("api@h",)),
    )
    assert jobs.shared == ("books.parse",)
    assert report.as_dict()["queues"]["jobs"]["conflicts"][0] == {
        "task": "api.mail",
        "served_by": ["api@h"],
        "missing_from": ["workers@h"],
    }


def test_a_subset_is_a_conflict_too() -> None:
    # An old release without the new task, mid-deploy, drops its messages.
    report = analyse(
        {"old@h": ["a"], "new@h": ["a", "b"]},
        {"old@h": queues("jobs"), "new@h": queues("jobs")},
    )
    [jobs] = report.queues
    assert jobs.conflicts == (Conflict("b", ("new@h",), ("old@h",)),)


def test_celery_builtins_and_task_details_are_ignored() -> None:
    # One worker has a result backend (celery.chord_unlock) and a rate limit.
    report = analyse(
        {
            "a@h": ["celery.chord_unlock", "celery.backend_cleanup", "proj.add"],
            "b@h": ["proj.add [rate_limit=10/m]"],
        },
        {"a@h": queues("jobs"), "b@h": queues("jobs")},
    )
    assert report.ok, report.describe()
    assert task_names(["celery.ping", "proj.add [rate_limit=1/s]"]) == {"proj.add"}


def test_a_worker_on_two_queues_is_checked_on_each() -> None:
    # Given a worker on jobs and mail, and another service on mail only
    report = analyse(
        {"both@h": ["jobs.run", "mail.send"], "mailer@h": ["mail.send"]},
        {"both@h": queues("jobs", "mail"), "mailer@h": queues("mail")},
    )
    jobs, mail = report.queues
    assert (jobs.name, jobs.workers, jobs.ok) == ("jobs", ("both@h",), True)
    assert (mail.name, mail.workers) == ("mail", ("both@h", "mailer@h"))
    assert mail.conflicts == (Conflict("jobs.run", ("both@h",), ("mailer@h",)),)
    assert not report.ok


def test_no_workers_is_not_ok() -> None:
    for registered, active in ((None, None), ({}, {})):
        report = analyse(registered, active)
        assert (report.workers, report.queues, report.unchecked) == ((), (), ())
        assert not report.ok


def test_a_worker_that_answered_once_is_unchecked() -> None:
    report = analyse(
        {"a@h": ["x"], "slow@h": ["x"]},
        {"a@h": queues("jobs")},
    )
    assert report.workers == ("a@h", "slow@h")
    assert report.unchecked == ("slow@h",)
    assert [q.workers for q in report.queues] == [("a@h",)]
    assert not report.ok
    assert "worker slow@h: answered only one inspection" in report.describe()[-1]


def test_the_text_names_the_task_and_both_workers() -> None:
    report = analyse(
        {"api@h": ["parse", "mail"], "workers@h": ["parse"]},
        {"api@h": queues("jobs"), "workers@h": queues("jobs")},
    )
    assert report.describe() == [
        "queue jobs: 2 workers (api@h, workers@h): their registered tasks differ",
        "  mail: registered by api@h; not by workers@h, which drop it as unregistered",
        "  registered by every worker, so whichever takes a message runs its own "
        "code: parse",
    ]
