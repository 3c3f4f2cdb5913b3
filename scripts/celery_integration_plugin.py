"""pytest plugin that runs Celery's own integration suite with celery-dedup in it.

Loaded by ``scripts/celery-integration`` into the suite of the Celery sdist
(``-p celery_integration_plugin``, with ``scripts/`` on ``PYTHONPATH``); see
``scripts/celery_integration.py`` for the whole procedure. It patches no file
of the sdist: it changes the suite's fixtures as they are set up.

``--dedup-mode plain``
    nothing of celery-dedup: the suite as Celery runs it (the baseline).
``--dedup-mode while_executing`` / ``until_executed``
    both apps of the suite (the session app the in-process worker runs, and
    the per-test app that publishes) are made with
    ``task_cls="celery_dedup:DedupTask"``, and every task opts in:

    - ``task_annotations={"*": {"dedup_lock": MODE}}`` opts in every task
      made from the app's Task class, tasks defined by the tests included;
    - ``dedup_lock=MODE`` as the setting, and a ``dedup_tasks`` entry for
      every task the suite registers (built from a scratch app finalized
      with the suite's ``celery_includes`` and ``celery_class_tasks``), so
      that ``celery_dedup.install(app)`` adopts the class-based tasks whose
      base is ``celery.Task`` and stamps ``send_task`` by name;
    - ``celery_dedup.install(app)`` on both apps: on each per-test app when
      it is made, on the session app just before its worker starts (once the
      suite has registered its class-based tasks, after finalize).

    Once the session worker is up, every task of the session app must be a
    DedupTask that opts in (``_dedup_on()``, now ``dedup_opted_in()``), with
    ``dedup_lock`` MODE (``add`` and ``auto_retry_class_task`` among them);
    the first per-test app is checked the same way. If not, the
    session stops at once (pytest exit status 3) with the names.

Whatever the mode, the plugin

- caps the suite's own ``timeout`` marks at ``--timeout`` (pytest-timeout
  lets a mark win over the command line) and its ``flaky`` reruns at
  ``--dedup-max-reruns``;
- writes ``--dedup-results FILE``: a JSON object with, for each test, its
  final outcome (passed, failed, error, skipped, xfailed, xpassed), its
  reruns, failed subtests, and for a failure a one-line reason.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

MODES = ("plain", "while_executing", "until_executed")
TASK_CLS = "celery_dedup:DedupTask"
#: A task every check looks at by name (the suite's ``add``).
PROBE_TASK = "t.integration.tasks.add"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("celery-dedup", "celery-dedup drop-in check")
    group.addoption("--dedup-mode", choices=MODES, default="plain")
    group.addoption("--dedup-results", default=None, help="write outcomes (JSON)")
    group.addoption(
        "--dedup-max-reruns",
        type=int,
        default=None,
        help="cap the reruns of the suite's flaky marks",
    )


class _State:
    """What the plugin learned during the session."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.mode: str = config.getoption("dedup_mode")
        self.results_path: str | None = config.getoption("dedup_results")
        self.max_reruns: int | None = config.getoption("dedup_max_reruns")
        self.tests: dict[str, dict[str, Any]] = {}
        self.task_names: list[str] = []
        self.checks: list[str] = []
        self.function_app_checked = False
        self.started = time.time()

    @property
    def dedup(self) -> bool:
        return self.mode != "plain"


_state: _State | None = None


def _s() -> _State:
    assert _state is not None
    return _state


def pytest_configure(config: pytest.Config) -> None:
    global _state  # noqa: PLW0603
    _state = _State(config)
    import celery  # noqa: PLC0415

    # --import-mode=append keeps the sdist's own celery/ off the front of
    # sys.path: the suite must test the installed release.
    rootdir = Path(str(config.rootpath)).resolve()
    where = Path(celery.__file__).resolve()
    if rootdir in where.parents:
        raise pytest.UsageError(
            f"celery-dedup plugin: celery was imported from the sdist ({where}), "
            "not the installed release; run with --import-mode=append"
        )
    _s().checks.append(f"celery {celery.__version__} from {where.parent}")
    if _s().dedup:
        _wrap_start_worker()


# -- timeouts and reruns ----------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    state = _s()
    timeout = state.config.getoption("timeout", None)
    for item in items:
        mark = item.get_closest_marker("timeout")
        if timeout and mark is not None:
            current = mark.kwargs.get("timeout", mark.args[0] if mark.args else None)
            if current is None or float(current) > float(timeout):
                item.add_marker(pytest.mark.timeout(float(timeout)), append=False)
        flaky = item.get_closest_marker("flaky")
        if state.max_reruns is not None and flaky is not None:
            reruns = flaky.kwargs.get("reruns", flaky.args[0] if flaky.args else 1)
            if reruns > state.max_reruns:
                kwargs = dict(flaky.kwargs, reruns=state.max_reruns)
                item.add_marker(pytest.mark.flaky(**kwargs), append=False)


# -- the apps of the suite ----------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Any:
    value = yield
    state = _s()
    name = fixturedef.argname
    if not state.dedup:
        if name == "celery_session_worker":
            _check_plain(request.getfixturevalue("celery_session_app"))
        return value
    # pytest caches the value the fixture returned: change it in place.
    if name == "celery_parameters":
        value["task_cls"] = TASK_CLS
    elif name == "celery_config":
        # The suite's own session fixture (t/integration/conftest.py), which a
        # plugin fixture cannot override: extend the dict it returned.
        value.update(_dedup_config(state, request))
    elif name == "celery_app":
        import celery_dedup  # noqa: PLC0415

        celery_dedup.install(value)
        if not state.function_app_checked:
            state.function_app_checked = True
            _check_dedup(value, "per-test app")
    return value


def _wrap_start_worker() -> None:
    """Call ``install(app)`` on the session app just before its worker starts.

    ``celery_session_worker`` registers the suite's class-based tasks
    (``celery_class_tasks``, base ``celery.Task``) with ``app.register_task``
    after the app is finalized; ``install`` adopts the ``dedup_tasks`` of an
    app at finalize, or at once if it is finalized already. So it is called
    here, when every task is registered, and before the prefork pool forks.
    """
    from celery.contrib.testing import worker  # noqa: PLC0415

    original = worker.start_worker

    def start_worker(app: Any, *args: Any, **kwargs: Any) -> Any:
        import celery_dedup  # noqa: PLC0415

        celery_dedup.install(app)
        _check_dedup(app, "session app (the worker's)")
        return original(app, *args, **kwargs)

    worker.start_worker = start_worker


def _dedup_config(state: _State, request: pytest.FixtureRequest) -> dict[str, Any]:
    state.task_names = _suite_task_names(request)
    return {
        "task_annotations": {"*": {"dedup_lock": state.mode}},
        "dedup_lock": state.mode,
        "dedup_tasks": {name: {} for name in state.task_names},
    }


def _suite_task_names(request: pytest.FixtureRequest) -> list[str]:
    """Every task name the suite's worker will know: finalize a scratch app
    with the suite's own ``celery_includes`` and ``celery_class_tasks``."""
    from celery import Celery  # noqa: PLC0415

    includes = request.getfixturevalue("celery_includes")
    class_tasks = request.getfixturevalue("celery_class_tasks")
    scratch = Celery(
        "celery-dedup-scan",
        set_as_current=False,
        broker="memory://",
        backend="cache+memory://",
    )
    try:
        for module in includes:
            scratch.loader.import_task_module(module)
        scratch.finalize(auto=True)
        names = set(scratch.tasks)
        # Not registered: binding a task class to an app applies the app's
        # annotations once (Task.__bound__), so the suite's app would miss them.
        for task in class_tasks:
            cls = task if isinstance(task, type) else type(task)
            names.add(
                getattr(cls, "name", None)
                or scratch.gen_task_name(cls.__name__, cls.__module__)
            )
        return sorted(names)
    finally:
        scratch.close()


def _check_dedup(app: Any, which: str) -> None:
    """Every task of ``app`` must be an opted-in DedupTask; stop if not."""
    from celery_dedup import DedupTask  # noqa: PLC0415

    state = _s()
    problems = []
    if not (isinstance(app.Task, type) and issubclass(app.Task, DedupTask)):
        problems.append(f"app.Task is {app.Task!r}, not a DedupTask subclass")
    tasks = dict(app.tasks)  # finalizes the app
    if PROBE_TASK not in tasks:
        problems.append(f"{PROBE_TASK} is not registered")
    for name, task in sorted(tasks.items()):
        if not isinstance(task, DedupTask):
            problems.append(f"{name}: {type(task).__mro__[1:3]} is not a DedupTask")
        elif not _opted_in(task):
            problems.append(f"{name}: a DedupTask, but it does not opt in")
        elif (lock := _lock(task)) != state.mode:
            problems.append(f"{name}: its dedup_lock resolves to {lock!r}")
    if problems:
        pytest.exit(
            f"celery-dedup plugin: the {which} does not run every task as an "
            f"opted-in DedupTask (mode {state.mode}):\n  " + "\n  ".join(problems),
            returncode=3,
        )
    state.checks.append(
        f"{which}: {len(tasks)} tasks, all DedupTask, opted in, with "
        f"dedup_lock {state.mode!r} ({PROBE_TASK}: "
        f"{' < '.join(c.__qualname__ for c in type(tasks[PROBE_TASK]).__mro__[:3])})"
    )


def _opted_in(task: Any) -> bool:
    """``DedupTask._dedup_on()``, under whichever name this celery-dedup has
    (it is ``dedup_opted_in()`` in newer versions)."""
    for name in ("dedup_opted_in", "_dedup_on"):
        method = getattr(task, name, None)
        if callable(method):
            return bool(method())
    raise AttributeError(f"{type(task).__name__} has no _dedup_on/dedup_opted_in")


def _lock(task: Any) -> str:
    """The lock mode a call of ``task`` without options gets."""
    for name in ("dedup_options", "_dedup_options"):
        method = getattr(task, name, None)
        if callable(method):
            return str(method({}).lock)
    raise AttributeError(f"{type(task).__name__} has no dedup_options")


def _check_plain(app: Any) -> None:
    try:
        from celery_dedup import DedupTask  # noqa: PLC0415
    except ImportError:
        return
    found = [n for n, t in app.tasks.items() if isinstance(t, DedupTask)]
    if found:
        pytest.exit(
            f"celery-dedup plugin: plain run, but DedupTasks found: {found[:5]}",
            returncode=3,
        )
    _s().checks.append(f"session app: {len(app.tasks)} tasks, none a DedupTask")


# -- outcomes -----------------------------------------------------------------


def _entry(nodeid: str) -> dict[str, Any]:
    return _s().tests.setdefault(
        nodeid,
        {
            "outcome": None,
            "reruns": 0,
            "subtests_failed": 0,
            "subtests_passed": 0,
            "reason": None,
        },
    )


def _reason(report: pytest.TestReport) -> str:
    """One line: the crash message, and the deepest celery_dedup frame."""
    longrepr = report.longrepr
    message = ""
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        message = str(crash.message)
    elif isinstance(longrepr, tuple) and len(longrepr) == 3:
        message = str(longrepr[2])
    else:
        message = str(longrepr)
    message = " ".join(message.split())[:300]
    where = None
    entries = getattr(getattr(longrepr, "reprtraceback", None), "reprentries", [])
    for entry in entries:
        loc = getattr(entry, "reprfileloc", None)
        if loc is not None and "celery_dedup" in str(loc.path):
            where = f"{Path(str(loc.path)).name}:{loc.lineno}"
    return f"{message} [in {where}]" if where else message


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _entry(report.nodeid)
    if hasattr(report, "context"):  # a subtest (pytest >= 9)
        if report.failed:
            entry["subtests_failed"] += 1
            entry["reason"] = entry["reason"] or "subtest: " + _reason(report)
        elif report.passed:
            entry["subtests_passed"] += 1
        return
    if report.outcome == "rerun":  # pytest-rerunfailures: this attempt is void
        entry.update(outcome=None, reason=None, subtests_failed=0, subtests_passed=0)
        entry["reruns"] += 1
        return
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if report.passed:
            outcome = "xpassed" if xfail else "passed"
        elif report.skipped:
            outcome = "xfailed" if xfail else "skipped"
        else:
            outcome = "failed"
        entry["outcome"] = outcome
        # pytest >= 9 fails a test whose subtests failed ("contains 1 failed
        # subtest"): the first failed subtest's reason says more.
        if (report.failed and not entry["subtests_failed"]) or report.skipped:
            entry["reason"] = _reason(report)
    elif report.failed:  # setup or teardown
        if entry["outcome"] != "failed":
            entry["outcome"] = "error"
            entry["reason"] = f"{report.when}: " + _reason(report)
    elif report.skipped and report.when == "setup":
        entry["outcome"] = "skipped"
        entry["reason"] = _reason(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = _s()
    for entry in state.tests.values():
        if entry["outcome"] == "passed" and entry["subtests_failed"]:
            entry["outcome"] = "failed"
        if entry["outcome"] is None:  # interrupted mid-test
            entry["outcome"] = "error"
            entry["reason"] = entry["reason"] or "interrupted"
    if not state.results_path:
        return
    data = {
        "mode": state.mode,
        "exitstatus": int(exitstatus),
        "duration": round(time.time() - state.started, 1),
        "python": sys.version.split()[0],
        "checks": state.checks,
        "dedup_tasks": len(state.task_names),
        "tests": state.tests,
        "pid": os.getpid(),
    }
    Path(state.results_path).write_text(json.dumps(data, indent=1))
