"""User code that must type-check under ``mypy --strict`` with celery-types
(``tox -e type`` checks it with the package): what ``delay`` and
``apply_async`` of a DedupTask return says whether the call was deduplicated.
Never imported by the tests."""

from __future__ import annotations

from celery import Celery

from celery_dedup import DedupResult, DedupTask

app = Celery("proj")


@app.task(base=DedupTask, dedup_key=("user_id",))
def send_welcome(user_id: int) -> None:
    del user_id


@app.task(base=DedupTask, bind=True)
def rebuild(self: DedupTask, report: str) -> str:
    return f"{self.request.id}: {report}"


def signup(user_id: int) -> bool:
    result: DedupResult = send_welcome.delay(user_id)
    return result.deduplicated


def nightly() -> str | None:
    result = rebuild.apply_async(("sales",), countdown=60, dedup_ttl=600)
    return None if result.deduplicated else result.dedup_key
