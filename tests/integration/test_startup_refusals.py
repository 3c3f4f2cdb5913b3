"""A mistake in the settings is caught before it costs a task (issue 10).

Each project is written to a temporary folder and run as users run it: a
real ``celery worker``, a real ``celery beat`` and ``celery dedup check``. A
setting that would fail every task stops the worker and beat, naming it; a
setting that does nothing is a warning at worker start; ``check`` reports
both and exits 1, whether or not a worker answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.rig import ROOT, RedisServer, Worker, free_port

pytestmark = pytest.mark.integration

PROJECT = """\
from celery import Celery

from celery_dedup import DedupTask

app = Celery("proj", broker={broker!r}, backend={backend!r})
app.conf.update({settings})


@app.task(base=DedupTask{options})
def job(user_id):
    return user_id


@app.task
def plain(user_id):
    return user_id
"""

#: An AMQP broker nobody listens on: the checks run before any connection.
AMQP = f"amqp://guest:guest@127.0.0.1:{free_port()}//"


def project(
    folder: Path,
    *,
    broker: str = AMQP,
    backend: str = "rpc://",
    options: str = "",
    **settings: object,
) -> dict[str, str]:
    """Write ``proj.py`` to ``folder``; the environment that imports it."""
    source = PROJECT.format(
        broker=broker,
        backend=backend,
        settings=", ".join(f"{k}={literal(v)}" for k, v in settings.items()),
        options=options,
    )
    (folder / "proj.py").write_text(source)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])}


def literal(value: object) -> str:
    """``value`` as Python source (``float('inf')`` has no literal)."""
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return f"float({str(value)!r})"
    return repr(value)


def python(
    folder: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """``python args...`` in ``folder``; its exit code is the test's to check."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def celery(
    folder: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    return python(folder, env, "-m", "celery", "-A", "proj", *args)


def start_worker(folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return celery(
        folder, env, "worker", "--pool", "solo", "--without-mingle",
        "--without-gossip", "--without-heartbeat", "--loglevel", "INFO",
    )  # fmt: skip


def start_beat(folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return celery(
        folder, env, "beat", "--schedule", str(folder / "schedule"),
        "--loglevel", "INFO",
    )  # fmt: skip


# Each: the project's settings, and what the refusal must name.
FATAL = {
    "no Redis (an AMQP broker, an rpc:// backend)": ({}, ["dedup_redis_url"]),
    "an infinite lease TTL": (
        {"dedup_redis_url": "redis://127.0.0.1:1/0", "dedup_lock_ttl": float("inf")},
        ["dedup_lock_ttl", "inf"],
    ),
    "a claim TTL Redis cannot hold": (
        {"dedup_redis_url": "redis://127.0.0.1:1/0", "dedup_ttl": 1e20},
        ["dedup_ttl", "1e+20"],
    ),
    "a dedup_tasks key naming no argument": (
        {
            "dedup_redis_url": "redis://127.0.0.1:1/0",
            "dedup_tasks": {"proj.job": {"dedup_key": ("usr",)}},
        },
        ["dedup_key", "proj.job has no argument 'usr'", "user_id"],
    ),
}


@pytest.mark.parametrize("case", list(FATAL))
def test_a_bad_setting_stops_the_worker_naming_it(tmp_path: Path, case: str) -> None:
    settings, named = FATAL[case]
    worker = start_worker(tmp_path, project(tmp_path, **settings))
    assert worker.returncode != 0, worker.stderr
    for text in named:
        assert text in worker.stderr
    assert "Traceback" not in worker.stderr
    assert "ready." not in worker.stderr


@pytest.mark.parametrize("case", list(FATAL))
def test_a_bad_setting_stops_beat_naming_it(tmp_path: Path, case: str) -> None:
    settings, named = FATAL[case]
    beat = start_beat(tmp_path, project(tmp_path, **settings))
    assert beat.returncode != 0, beat.stderr
    output = beat.stdout + beat.stderr
    for text in named:
        assert text in output
    assert "Traceback" not in output


@pytest.mark.parametrize("case", list(FATAL))
def test_check_reports_a_bad_setting_and_exits_1(tmp_path: Path, case: str) -> None:
    settings, named = FATAL[case]
    env = project(tmp_path, broker="memory://", **settings)
    found = celery(tmp_path, env, "dedup", "check", "--timeout", "0.2")
    assert found.returncode == 1, found.stdout + found.stderr
    assert "settings:\n" in found.stdout
    for text in named:
        assert text in found.stdout
    as_json = celery(tmp_path, env, "dedup", "check", "--timeout", "0.2", "--json")
    assert as_json.returncode == 1
    document = json.loads(as_json.stdout)
    assert document["ok"] is False
    assert any(named[0] in sentence for sentence in document["settings"])
    assert "No worker replied" in document["error"]


def test_a_task_key_naming_no_argument_fails_where_the_task_is_defined(
    tmp_path: Path,
) -> None:
    env = project(tmp_path, options=", dedup_key=('usr',)")
    script = "import proj; proj.app.finalize()"
    defined = python(tmp_path, env, "-c", script)
    assert defined.returncode != 0
    assert (
        "ConfigurationError: dedup_key: proj.job has no argument 'usr'; its "
        "arguments are user_id"
    ) in defined.stderr


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url()


def test_entries_that_do_nothing_and_a_short_lease_are_warned_about_at_start(
    tmp_path: Path, redis_url: str
) -> None:
    env = project(
        tmp_path,
        broker=redis_url,
        backend=redis_url,
        dedup_lock_ttl=0.5,
        dedup_lease_replicas=1,
        dedup_tasks={"proj.missing": {}, "proj.plain": {"dedup_ttl": 60}},
    )
    warnings = [
        "dedup_tasks['proj.missing']: no such task is registered",
        "dedup_tasks['proj.plain']: the task is not a DedupTask and "
        "celery_dedup.install(app) was not called",
        "proj.job: dedup_lock_ttl (0.5s) is under a second",
        "proj.job: dedup_lease_replicas_timeout (1s) is over a third of its "
        "dedup_lock_ttl (0.5s)",
    ]
    worker = Worker(
        "proj", "startup-checks", env, tmp_path, name="warned", concurrency=1
    )
    worker.env["PYTHONPATH"] = env["PYTHONPATH"]
    try:
        worker.start()
        log = worker.log()
    finally:
        worker.stop()
    for warning in warnings:  # logged before the log file is set up: stderr
        assert f"celery-dedup: {warning}" in log
    found = celery(tmp_path, env, "dedup", "check", "--timeout", "0.2")
    assert found.returncode == 1
    for warning in warnings:
        assert warning in found.stdout
    assert "No worker replied" in found.stdout


def test_install_makes_a_plain_tasks_entry_count(tmp_path: Path) -> None:
    env = project(
        tmp_path,
        dedup_redis_url="redis://127.0.0.1:1/0",
        dedup_tasks={"proj.plain": {"dedup_ttl": 60}},
    )
    with (tmp_path / "proj.py").open("a") as source:
        source.write("\nimport celery_dedup\ncelery_dedup.install(app)\n")
    script = textwrap.dedent(
        """
        import proj
        from celery_dedup.checks import problems
        print(problems(proj.app))
        """
    )
    found = python(tmp_path, env, "-c", script)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"
