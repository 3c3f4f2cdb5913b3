"""The Django example (``examples/django``) passes its own tests.

They run as a user runs them, ``python manage.py test`` in the example's
folder, against the PostgreSQL of the outbox tests (``DEDUP_TEST_POSTGRES_URL``)
and this session's private Redis, with a key prefix, a queue and a test
database of their own. Three runs: tasks with ``base=DedupTask``;
``CELERY_TASK_CLS=celery_dedup:DedupTask`` (every task a DedupTask); and
Django on psycopg2 rather than psycopg 3.

What the example's tests check: a double click (two POSTs) publishes one
task; ``delay_on_commit`` and ``apply_async_on_commit`` publish after the
commit and nothing on rollback; the ``CELERY_DEDUP_*`` settings are read;
the outbox is written through Django's connection, in its transaction.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import pytest
import sqlalchemy as sa

from tests.integration.outbox_fixtures import POSTGRES_URL
from tests.rig import ROOT, RedisServer

pytestmark = pytest.mark.integration

EXAMPLE = ROOT / "examples" / "django"

#: manage.py, run so that the test can hide psycopg 3 from Django and learn
#: which driver and which task class the run had.
MANAGE = """
import runpy, sys
if sys.argv.pop(1) == "psycopg2":
    sys.modules["psycopg"] = None  # Django falls back to psycopg2
sys.argv[0] = "manage.py"
try:
    runpy.run_path("manage.py", run_name="__main__")
finally:
    from django.db import connection
    from celery_dedup import DedupTask
    from proj.celery import app
    print("driver:", connection.Database.__name__)
    print("app-wide:", issubclass(app.Task, DedupTask))
"""

#: Tests of the example that each run must pass (among the others).
REQUIRED = (
    "test_a_double_click_enqueues_one_task",
    "test_the_celery_dedup_settings_are_read",
    "test_the_task_classes",
    "test_delay_on_commit_publishes_after_the_commit",
    "test_delay_on_commit_publishes_nothing_on_rollback",
    "test_apply_async_on_commit",
    "test_the_task_writes_its_event_with_the_order",
    "test_a_rollback_takes_the_event_with_it",
    "test_a_stale_fence_rolls_back_the_whole_django_transaction",
)


def _admin_engine() -> sa.engine.Engine:
    """The test server, in autocommit (to drop a test database left behind)."""
    url = sa.engine.make_url(POSTGRES_URL).set(drivername="postgresql+psycopg2")
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as exc:
        engine.dispose()
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL is not reachable at {url}: {exc.orig}")
    return engine


@pytest.mark.parametrize(
    ("mode", "driver", "app_wide"),
    [
        ("base", "psycopg", False),
        ("task_cls", "psycopg", True),
        ("psycopg2", "psycopg2", False),
    ],
)
def test_the_django_example_passes_its_tests(
    redis_server: RedisServer, mode: str, driver: str, app_wide: bool
) -> None:
    if not os.environ.get("CI"):
        pytest.importorskip("django")
    admin = _admin_engine()
    run = f"djex_{uuid.uuid4().hex[:10]}"
    url = sa.engine.make_url(POSTGRES_URL)
    outbox_url = url.set(drivername=f"postgresql+{driver}")
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CELERY_", "POSTGRES_", "DJANGO_"))
    }
    env.update(
        POSTGRES_HOST=url.host or "127.0.0.1",
        POSTGRES_PORT=str(url.port or 5432),
        POSTGRES_USER=url.username or "postgres",
        POSTGRES_PASSWORD=url.password or "",
        POSTGRES_DB=url.database or "test",
        POSTGRES_TEST_DB=f"test_{run}",
        CELERY_BROKER_URL=redis_server.url(),
        CELERY_DEDUP_REDIS_URL=redis_server.url(),
        CELERY_DEDUP_KEY_PREFIX=run,
        CELERY_TASK_DEFAULT_QUEUE=run,
        CELERY_DEDUP_OUTBOX_URL=outbox_url.render_as_string(hide_password=False),
    )
    if mode == "task_cls":
        env["CELERY_TASK_CLS"] = "celery_dedup:DedupTask"
    client = redis_server.client()
    try:
        done = subprocess.run(
            [sys.executable, "-c", MANAGE, mode, "test", "--noinput", "-v", "2"],
            check=False,
            cwd=EXAMPLE,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        assert re.search(r"^Ran \d+ tests? in .*\n\nOK$", output, re.M), output
        for name in REQUIRED:
            assert re.search(rf"^{name} \(.*\) \.\.\. ok$", output, re.M), output
        assert f"driver: {driver}\n" in done.stdout
        assert f"app-wide: {app_wide}\n" in done.stdout
        assert "SAWarning" not in output, output
        # The example's tests leave no dedup key and no message behind.
        assert list(client.scan_iter(f"{run}:*")) == []
        assert client.llen(run) == 0
    finally:
        client.delete(run, f"_kombu.binding.{run}", f"_kombu.binding_permanent.{run}")
        for key in client.scan_iter(f"{run}:*"):
            client.delete(key)
        client.close()
        with admin.connect() as conn:  # Django drops it, unless interrupted
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "test_{run}"'))
        admin.dispose()
