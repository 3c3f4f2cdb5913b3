"""``celery_dedup.testing`` from a user's side: a sample project (a tasks
module, a conftest that opts in, test files) run by pytest in a subprocess,
against a real Redis and in memory.

The plugin is opt-in: this suite never loads it, and only the subprocesses
started here do.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_dedup.testing import ENV_URL
from tests.rig import RedisServer

pytest_plugins = ("pytester",)

TASKS = """
from celery import Celery, shared_task

from celery_dedup import DedupTask

app = Celery("sample", broker="memory://", backend="cache+memory://")


@app.task(base=DedupTask, bind=True, dedup_key=("campaign_id",))
def close_campaign(self, campaign_id, note=""):
    return campaign_id


@shared_task(base=DedupTask)
def refresh(account_id):
    return account_id
"""

CONFTEST = """
import pytest

import tasks

pytest_plugins = ("celery_dedup.testing", "celery.contrib.pytest")


@pytest.fixture
def celery_config(dedup_config):
    return {**dedup_config}


@pytest.fixture(scope="session")
def celery_worker_parameters():
    return {"perform_ping_check": False}


@pytest.fixture
def app(dedup):
    return dedup.use(tasks.app)
"""

INI = """
[pytest]
filterwarnings =
    error
    ignore::DeprecationWarning
    ignore::PendingDeprecationWarning
    ignore::celery.platforms.SecurityWarning
"""

#: Every way of wiring an app; each passes.
TEST_CALLS = """
import os

from celery_dedup import DedupTask
from celery_dedup.testing import (
    assert_deduplicated,
    assert_not_deduplicated,
    held_keys,
    release_all,
)

import tasks


def test_the_mode(dedup, dedup_config):
    memory = os.environ["SAMPLE_MODE"] == "memory"
    assert dedup.memory is memory
    assert dedup_config["dedup_key_prefix"] == dedup.prefix
    if memory:
        import fakeredis

        assert isinstance(dedup.redis, fakeredis.FakeRedis)
    else:
        assert dedup.redis.ping()


def test_dedup_app(dedup_app):
    @dedup_app.task(base=DedupTask, bind=True)
    def job(self, n):
        return n

    first = job.delay(1)
    again = job.delay(n=1)
    assert_not_deduplicated(first)
    assert_deduplicated(again, of=first)
    assert [state.key for state in held_keys(dedup_app)] == [first.dedup_key]
    assert release_all(dedup_app) == 1
    assert held_keys(dedup_app) == []
    assert_not_deduplicated(job.delay(1))


def test_a_shared_task_binds_to_dedup_app(dedup_app):
    first = tasks.refresh.delay(7)
    assert first.app is dedup_app
    assert_deduplicated(tasks.refresh.delay(account_id=7), of=first.id)


def test_celery_app_from_celery_config(celery_app, dedup):
    @celery_app.task(base=DedupTask)
    def sync(account_id):
        return account_id

    first = sync.delay(3)
    dedup.assert_deduplicated(sync.delay(3), of=first)
    dedup.assert_not_deduplicated(sync.delay(4))
    assert len(dedup.held_keys()) == 2


def test_the_projects_own_app(app, dedup):
    assert app is tasks.app
    first = tasks.close_campaign.delay(42)
    assert_deduplicated(tasks.close_campaign.delay(42, note="again"), of=first)
    assert dedup.release_all() == 1
    assert_not_deduplicated(tasks.close_campaign.delay(42))
    tasks.close_campaign.delay(43)  # left held: the plugin releases it


def test_a_worker_runs_the_body_under_its_lease(celery_app, celery_worker):
    @celery_app.task(base=DedupTask, bind=True)
    def job(self, n):
        return [n, self.request.dedup_fence is not None, self.dedup_lease_valid()]

    celery_worker.reload()
    first = job.delay(5)
    assert_deduplicated(job.delay(5), of=first)
    assert first.get(timeout=20) == [5, True, True]
    assert held_keys(celery_app) == []  # released when the body succeeded
    assert_not_deduplicated(job.delay(5))


def test_nothing_is_left_from_earlier_tests(dedup):
    assert list(dedup.redis.scan_iter("dedup-test-*")) == []
    assert tasks.app.conf.get("dedup_key_prefix") is None  # put back
"""

#: Deliberate failures: their messages say what went wrong.
TEST_FAILURES = """
from celery_dedup import DedupTask
from celery_dedup.testing import assert_deduplicated, assert_not_deduplicated


def test_other_arguments_make_another_key(dedup_app):
    @dedup_app.task(base=DedupTask)
    def job(n):
        return n

    job.delay(1)
    assert_deduplicated(job.delay(2))


def test_the_same_arguments_are_deduplicated(dedup_app):
    @dedup_app.task(base=DedupTask)
    def job(n):
        return n

    job.delay(1)
    assert_not_deduplicated(job.delay(1))


def test_eager_calls_never_deduplicate(dedup_app):
    @dedup_app.task(base=DedupTask)
    def job(n):
        return n

    dedup_app.conf.task_always_eager = True
    job.delay(1)
    assert_deduplicated(job.delay(1))


def test_a_plain_task(dedup_app):
    @dedup_app.task
    def plain(n):
        return n

    assert_deduplicated(plain.delay(1))
"""

#: What pytest-xdist sets in a worker's environment.
XDIST_WORKER_ENV = (
    "PYTEST_XDIST_WORKER",
    "PYTEST_XDIST_WORKER_COUNT",
    "PYTEST_XDIST_TESTRUNUID",
)

PASSING = TEST_CALLS.count("\ndef test_")
FAILING = TEST_FAILURES.count("\ndef test_")

#: What the failing tests print.
MESSAGES = [
    "*AssertionError: expected the call to be deduplicated, but it published "
    "task *: its dedup key * was free. Other keys held under prefix "
    "'dedup-test-*' (a call is dropped only if its arguments make the same "
    "key; see dedup_key):",
    "*  * claim by *, * left",
    "*AssertionError: expected a new task to be published, but the call was "
    "deduplicated: task * holds its dedup key * (claim by *, * left). An "
    "earlier call with the same key*",
    "*AssertionError: expected the call to be deduplicated, but task * ran "
    "eagerly (task_always_eager, or apply())*",
    "*AssertionError: expected what a DedupTask's delay() or apply_async() "
    "returns (it has .deduplicated), got <AsyncResult: *>: is the task's base "
    "DedupTask*",
]


@pytest.fixture
def sample(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The sample project, with no Redis named in the environment, run as a
    pytest of its own (not an xdist worker, even when this one is)."""
    for name in (ENV_URL, "PYTEST_ADDOPTS", *XDIST_WORKER_ENV):
        monkeypatch.delenv(name, raising=False)
    pytester.makepyfile(
        tasks=TASKS,
        conftest=CONFTEST,
        test_calls=TEST_CALLS,
        test_failures=TEST_FAILURES,
    )
    pytester.makefile(".ini", pytest=INI)
    return pytester.path


@pytest.fixture
def basetemp() -> Iterator[str]:
    """A short --basetemp: pytest-redis puts its server's Unix socket in it,
    whose path may not exceed 107 bytes."""
    path = tempfile.mkdtemp(prefix="dd-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(pytester: pytest.Pytester, basetemp: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--basetemp={basetemp}/t", *args, timeout=180
    )


def check(result: pytest.RunResult, header: str) -> None:
    result.stdout.fnmatch_lines([f"celery-dedup: {header}"])
    result.stdout.fnmatch_lines(MESSAGES, consecutive=False)
    result.assert_outcomes(passed=PASSING, failed=FAILING)


@pytest.mark.integration
def test_a_private_redis_server_is_started(
    sample: Path,
    pytester: pytest.Pytester,
    basetemp: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAMPLE_MODE", "redis")
    result = run(pytester, basetemp)
    check(result, "a private redis-server (pytest-redis), when first needed")
    assert list(Path(basetemp).rglob("redis-server.*.log")), "no server ran"


@pytest.mark.integration
@pytest.mark.parametrize(
    "args",
    [["--dedup-memory"], ["-o", "dedup_memory=true"]],
    ids=["option", "ini"],
)
def test_in_memory_with_no_redis_at_all(
    sample: Path,
    pytester: pytest.Pytester,
    basetemp: str,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
) -> None:
    monkeypatch.setenv("SAMPLE_MODE", "memory")
    result = run(pytester, basetemp, "-p", "no:pytest_redis", *args)
    check(result, "in memory (fakeredis)")


@pytest.mark.integration
def test_a_redis_named_by_the_environment_is_used_and_left_clean(
    sample: Path,
    pytester: pytest.Pytester,
    basetemp: str,
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
    redis_client: redis.Redis,
) -> None:
    url = redis_server.url(5)
    monkeypatch.setenv(ENV_URL, url)
    monkeypatch.setenv("SAMPLE_MODE", "redis")
    shared = redis_server.client(5)
    shared.set("theirs", "1")
    try:
        result = run(pytester, basetemp, "-p", "no:pytest_redis")
        check(result, f"Redis at {url} (${ENV_URL})")
        assert shared.keys("*") == [b"theirs"]  # ours released and deleted
    finally:
        shared.close()


@pytest.mark.integration
def test_pytest_redis_is_loaded_when_plugins_do_not_autoload(
    sample: Path,
    pytester: pytest.Pytester,
    basetemp: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("SAMPLE_MODE", "redis")
    result = run(pytester, basetemp, "test_calls.py", "-k", "not worker")
    result.assert_outcomes(passed=PASSING - 1)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["-p", "no:pytest_redis"],
            "celery_dedup.testing starts its redis-server through pytest-redis, "
            "which is disabled (-p no:pytest_redis)*",
        ),
        (
            ["--redis-exec", "/nonexistent/redis-server"],
            "celery_dedup.testing: redis-server not found "
            "(/nonexistent/redis-server): install Redis*",
        ),
        (
            ["--dedup-redis-url", "redis://127.0.0.1:1/0"],
            "celery_dedup.testing: Redis redis://127.0.0.1:1/0 "
            "(from --dedup-redis-url) is unreachable: *",
        ),
    ],
    ids=["pytest-redis disabled", "no redis-server", "unreachable"],
)
def test_without_a_redis_the_error_says_what_to_do(
    sample: Path,
    pytester: pytest.Pytester,
    basetemp: str,
    args: list[str],
    message: str,
) -> None:
    result = run(pytester, basetemp, "test_calls.py", "-k", "dedup_app", *args)
    result.stdout.fnmatch_lines([message])
    result.assert_outcomes(errors=2)


def test_this_suite_does_not_load_the_plugin(request: pytest.FixtureRequest) -> None:
    assert not request.config.pluginmanager.has_plugin("celery_dedup.testing")
    with pytest.raises(pytest.FixtureLookupError):
        request.getfixturevalue("dedup")
    entry_points = importlib.metadata.entry_points(group="pytest11")
    assert not [ep for ep in entry_points if ep.value.startswith("celery_dedup")]
