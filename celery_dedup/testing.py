"""A pytest plugin to test deduplication in your own project.

Opt in from your top-level ``conftest.py``, as with Celery's own
``celery.contrib.pytest``::

    pytest_plugins = ("celery_dedup.testing",)

It is not registered as a ``pytest11`` entry point on purpose: that would load
it into every pytest run of every project that installs celery-dedup.

Fixtures: :func:`dedup_redis_url` (a real Redis: the one you name, or a
private ``redis-server`` started through pytest-redis), :func:`dedup_memory`
(in memory: fakeredis runs the real Lua scripts), :func:`dedup_config` (the
settings to merge into ``celery_config``), :func:`dedup_app` (a ready app) and
:func:`dedup` (a :class:`Dedup`: helpers bound to the test). Every key a test
holds is released when it ends. Helpers: :func:`assert_deduplicated`,
:func:`assert_not_deduplicated`, :func:`held_keys`, :func:`release_all`.

Install what it uses with ``pip install 'celery-dedup[testing]'``
(pytest-redis, and fakeredis with Lua).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import pytest
import redis
from celery.contrib.testing.app import TestApp, setup_default_app
from celery.result import EagerResult

from . import connection
from .connection import Client
from .exceptions import ConfigurationError
from .inspection import Inspector, KeyState, duration, servers
from .store import glob_escape

if TYPE_CHECKING:
    from celery import Celery
    from fakeredis import FakeServer

__all__ = [
    "ENV_URL",
    "MEMORY_URL",
    "Dedup",
    "assert_deduplicated",
    "assert_not_deduplicated",
    "held_keys",
    "release_all",
]

#: The environment variable naming a Redis for the tests (over the ini option).
ENV_URL: Final = "CELERY_DEDUP_TEST_REDIS_URL"

#: ``dedup_redis_url`` in memory mode. It names no server, so an app that the
#: plugin did not bind to fakeredis fails at once (no such socket) instead of
#: reaching some Redis.
MEMORY_URL: Final = "unix:///nonexistent/celery-dedup-in-memory-mode.sock"

_INSTALL: Final = "pip install 'celery-dedup[testing]'"
_MISSING: Final = object()
_HAVE_PYTEST_REDIS: Final = importlib.util.find_spec("pytest_redis") is not None

if _HAVE_PYTEST_REDIS:
    from pytest_redis.factories import redis_proc as _redis_proc

    # None: any free port (pytest-redis documents it; its annotation omits it).
    _ANY_PORT: Any = None
    #: The private redis-server: pytest-redis' process fixture, on loopback
    #: and a free port, started only when :func:`dedup_redis_url` needs it.
    #: pytest-redis' ``redis_*`` ini options apply; override it with a
    #: ``pytest_redis.factories.redis_proc(...)`` of your own to change more.
    dedup_redis_proc = _redis_proc(host="127.0.0.1", port=_ANY_PORT)


# -- options --------------------------------------------------------------------


def pytest_addoption(
    parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager
) -> None:
    group = parser.getgroup("celery-dedup")
    group.addoption(
        "--dedup-redis-url",
        dest="dedup_redis_url",
        default=None,
        help=f"Redis for the dedup tests (over ${ENV_URL} and the ini option)",
    )
    group.addoption(
        "--dedup-memory",
        dest="dedup_memory",
        action="store_true",
        default=False,
        help="test dedup in memory (fakeredis runs the Lua scripts), no Redis",
    )
    parser.addini(
        "dedup_redis_url",
        default=None,
        help="Redis for the dedup tests; unset: a private redis-server (pytest-redis)",
    )
    parser.addini(
        "dedup_memory",
        type="bool",
        default=False,
        help="test dedup in memory (fakeredis), as --dedup-memory does",
    )
    # pytest-redis' fixture reads its own ini options: load its plugin if
    # pytest did not (PYTEST_DISABLE_PLUGIN_AUTOLOAD), unless it was disabled.
    if _HAVE_PYTEST_REDIS and not pluginmanager.is_blocked("pytest_redis"):
        import pytest_redis.plugin  # noqa: PLC0415 - only if pytest did not

        if not pluginmanager.is_registered(pytest_redis.plugin):
            pluginmanager.register(pytest_redis.plugin, "pytest_redis")


def pytest_report_header(config: pytest.Config) -> str:
    if _memory(config):
        return "celery-dedup: in memory (fakeredis)"
    url, source = _configured_url(config)
    if url:
        return f"celery-dedup: Redis at {connection.masked(url)} ({source})"
    if not _HAVE_PYTEST_REDIS:
        return "celery-dedup: no Redis named, and pytest-redis is not installed"
    return "celery-dedup: a private redis-server (pytest-redis), when first needed"


def _memory(config: pytest.Config) -> bool:
    return bool(config.getoption("dedup_memory") or config.getini("dedup_memory"))


def _configured_url(config: pytest.Config) -> tuple[str | None, str]:
    """The Redis URL given for the tests, and where it was given."""
    for url, source in (
        (config.getoption("dedup_redis_url"), "--dedup-redis-url"),
        (os.environ.get(ENV_URL), f"${ENV_URL}"),
        (config.getini("dedup_redis_url"), "the dedup_redis_url ini option"),
    ):
        if url:
            return str(url), source
    return None, ""


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="session")
def dedup_memory(pytestconfig: pytest.Config) -> bool:
    """Whether the tests run in memory (``--dedup-memory``, or the
    ``dedup_memory`` ini flag): fakeredis, with the real Lua scripts, instead
    of a Redis server. Override it to choose per folder."""
    return _memory(pytestconfig)


@pytest.fixture(scope="session")
def dedup_redis_url(request: pytest.FixtureRequest) -> str:
    """The URL of a real Redis for the session.

    The one named by ``--dedup-redis-url``, ``$CELERY_DEDUP_TEST_REDIS_URL``
    or the ``dedup_redis_url`` ini option (in that order), as is; else a
    private ``redis-server`` on a free loopback port, started through
    pytest-redis and stopped at the end of the session. Tests share it: each
    test keeps its keys under its own prefix (:func:`dedup_key_prefix`), so a
    shared Redis is never flushed.
    """
    url, source = _configured_url(request.config)
    if url:
        _check_reachable(url, source)
        return url
    if not _HAVE_PYTEST_REDIS:
        pytest.fail(
            "celery_dedup.testing needs a Redis: install pytest-redis to start "
            f"a private redis-server ({_INSTALL}), name one with ${ENV_URL} or "
            "the dedup_redis_url ini option, or test in memory (--dedup-memory)",
            pytrace=False,
        )
    if request.config.pluginmanager.is_blocked("pytest_redis"):
        pytest.fail(
            "celery_dedup.testing starts its redis-server through pytest-redis, "
            "which is disabled (-p no:pytest_redis): enable it, name a Redis "
            f"with ${ENV_URL}, or test in memory (--dedup-memory)",
            pytrace=False,
        )
    executable = request.config.getoption("redis_exec") or request.config.getini(
        "redis_exec"
    )
    if not executable or shutil.which(str(executable)) is None:
        pytest.fail(
            "celery_dedup.testing: redis-server not found "
            f"({executable or 'not on PATH'}): "
            "install Redis (apt-get install redis-server, brew install redis), "
            f"point --redis-exec at it, name a running one with ${ENV_URL}, or "
            "test in memory (--dedup-memory)",
            pytrace=False,
        )
    server = request.getfixturevalue("dedup_redis_proc")
    auth = ""
    if server.password:  # pytest-redis' redis_password option
        user = urllib.parse.quote(getattr(server, "username", None) or "", safe="")
        auth = f"{user}:{urllib.parse.quote(server.password, safe='')}@"
    return f"redis://{auth}{server.host}:{server.port}/0"


@pytest.fixture(scope="session")
def _dedup_fake_server() -> FakeServer:
    """The session's fakeredis server, in memory mode."""
    if importlib.util.find_spec("fakeredis") is None:
        pytest.fail(
            f"in-memory dedup tests need fakeredis with Lua ({_INSTALL})",
            pytrace=False,
        )
    if importlib.util.find_spec("lupa") is None:
        pytest.fail(
            "in-memory dedup tests need fakeredis' Lua support, which runs the "
            f"scripts: pip install 'fakeredis[lua]' ({_INSTALL})",
            pytrace=False,
        )
    import fakeredis  # noqa: PLC0415 - the testing extra, in memory mode only

    return fakeredis.FakeServer()


@pytest.fixture
def dedup_redis(request: pytest.FixtureRequest, dedup_memory: bool) -> Iterator[Client]:
    """A client of the Redis this test's dedup keys are in: the session's
    fakeredis in memory mode, else :func:`dedup_redis_url`'s."""
    if dedup_memory:
        client = _fake_client(request.getfixturevalue("_dedup_fake_server"))
    else:
        client = _connect(request.getfixturevalue("dedup_redis_url"))
    yield client
    client.close()


@pytest.fixture
def dedup_key_prefix(dedup_redis: Client) -> Iterator[str]:
    """A ``dedup_key_prefix`` of this test's own. When the test ends every key
    under it is released, then deleted (fencing counters and completion
    markers too: nothing else uses the prefix)."""
    prefix = f"dedup-test-{uuid.uuid4().hex[:16]}"
    yield prefix
    _purge(dedup_redis, prefix)


@pytest.fixture
def dedup_config(
    request: pytest.FixtureRequest, dedup_memory: bool, dedup_key_prefix: str
) -> dict[str, Any]:
    """The settings that point an app at this test's Redis and prefix, to
    merge into ``celery_config`` (with ``celery.contrib.pytest``)::

        @pytest.fixture
        def celery_config(dedup_config):
            return {**dedup_config}

    The ``celery_app`` built from it is bound for the test (to fakeredis in
    memory mode) and its keys released at the end. In memory mode
    ``dedup_redis_url`` is :data:`MEMORY_URL`, which names no server: an app
    of your own needs :meth:`Dedup.use`.
    """
    url = MEMORY_URL if dedup_memory else request.getfixturevalue("dedup_redis_url")
    return {"dedup_redis_url": url, "dedup_key_prefix": dedup_key_prefix}


@pytest.fixture
def dedup(
    request: pytest.FixtureRequest,
    dedup_memory: bool,
    dedup_redis: Client,
    dedup_key_prefix: str,
    dedup_config: dict[str, Any],
) -> Iterator[Dedup]:
    """This test's :class:`Dedup`: its Redis, prefix and settings, the apps
    it wired (:meth:`Dedup.use`), and the helpers."""
    server = request.getfixturevalue("_dedup_fake_server") if dedup_memory else None
    helper = Dedup(dedup_redis, dedup_key_prefix, dedup_config, server)
    yield helper
    helper.close()


@pytest.fixture
def dedup_app(dedup: Dedup) -> Iterator[Celery]:
    """A Celery app for this test: the in-memory broker and result backend of
    ``celery.contrib.pytest``'s ``celery_app``, ``task_always_eager`` off, and
    :func:`dedup_config`. It is the current app during the test, so
    ``shared_task`` tasks bind to it."""
    app = TestApp(
        "dedup-test", set_as_current=False, config={"task_always_eager": False}
    )
    with setup_default_app(app):  # puts the previous apps back after
        app.set_default()
        app.set_current()
        yield dedup.use(app)


@pytest.fixture(autouse=True)
def _dedup_wire_celery_app(request: pytest.FixtureRequest) -> None:
    """Bind ``celery_app`` (``celery.contrib.pytest``) to the test's Redis when
    its ``celery_config`` merges :func:`dedup_config`."""
    names = request.fixturenames
    if "celery_app" not in names or "dedup_config" not in names:
        return
    app = request.getfixturevalue("celery_app")
    helper: Dedup = request.getfixturevalue("dedup")
    if app.conf.get("dedup_key_prefix") == helper.prefix:
        helper.use(app)


# -- the helper object ----------------------------------------------------------


class Dedup:
    """One test's Redis and prefix, and the apps wired to them.

    Use :meth:`use` for an app of your own (your project's app), which keeps
    it pointed at this test's Redis until the test ends.
    """

    def __init__(
        self,
        redis: Client,
        prefix: str,
        config: Mapping[str, Any],
        fake_server: FakeServer | None = None,
    ) -> None:
        #: A client of the Redis the test's keys are in.
        self.redis = redis
        #: The test's ``dedup_key_prefix``.
        self.prefix = prefix
        #: The settings :meth:`use` applies (see :func:`dedup_config`).
        self.config = dict(config)
        self._fake_server = fake_server
        self._apps: list[tuple[Celery, dict[str, Any]]] = []

    @property
    def memory(self) -> bool:
        """True in memory mode (fakeredis)."""
        return self._fake_server is not None

    def use(self, app: Celery) -> Celery:
        """Point ``app`` at this test's Redis and prefix until the test ends.

        Sets the ``dedup_*`` settings of :attr:`config` in ``app.conf`` and
        forgets the app's cached settings and Redis client; in memory mode
        binds it to fakeredis. At the end of the test its keys are released
        and its settings put back. Only ``dedup_*`` settings change: the app
        keeps its broker (set ``broker_url = "memory://"`` in its test config)
        and ``task_always_eager``. Returns ``app``.
        """
        if any(app is used for used, _ in self._apps):
            return app
        saved = {name: app.conf.get(name, _MISSING) for name in self.config}
        app.conf.update(self.config)
        if self._fake_server is not None:
            connection.use_client(app, _fake_client(self._fake_server))
        else:
            connection.reset(app)
        self._apps.append((app, saved))
        return app

    def held_keys(self) -> list[KeyState]:
        """The keys a claim or a live lease holds under this test's prefix."""
        return Inspector(self.redis, self.prefix).held()

    def release_all(self) -> int:
        """Release every key held under this test's prefix; how many were."""
        return _release(Inspector(self.redis, self.prefix))

    def assert_deduplicated(self, result: object, of: object = None) -> None:
        """:func:`assert_deduplicated`."""
        __tracebackhide__ = True
        assert_deduplicated(result, of)

    def assert_not_deduplicated(self, result: object) -> None:
        """:func:`assert_not_deduplicated`."""
        __tracebackhide__ = True
        assert_not_deduplicated(result)

    def close(self) -> None:
        """Release the keys of every app :meth:`use` wired, put their settings
        back and unbind them (the fixture's teardown)."""
        errors: list[BaseException] = []
        while self._apps:
            app, saved = self._apps.pop()
            try:
                release_all(app)
            except (redis.RedisError, ConfigurationError) as exc:
                errors.append(exc)
            for name, value in saved.items():
                if value is _MISSING:
                    app.conf.pop(name, None)
                else:
                    app.conf[name] = value
            if self._fake_server is not None:
                connection.use_client(app, None)
            else:
                connection.reset(app)
        if errors:
            raise errors[0]


# -- helpers --------------------------------------------------------------------


def held_keys(app: Celery) -> list[KeyState]:
    """The keys a claim or a live lease holds under ``app``'s
    ``dedup_key_prefix``, in ``app``'s Redis, sorted by key (what ``celery
    dedup status`` lists): each a :class:`~celery_dedup.inspection.KeyState`
    (``.key``, ``.claim``, ``.leases``, ``.holds``, ``.task_ids()``)."""
    return _inspector(app).held()


def release_all(app: Celery) -> int:
    """Release every key held under ``app``'s prefix, as ``celery dedup
    release --force`` does (the fencing counters stay); how many were held."""
    return _release(_inspector(app))


def assert_deduplicated(result: object, of: object = None) -> None:
    """Assert that a ``DedupTask`` call published nothing: ``result`` (what
    ``delay`` or ``apply_async`` returned) is ``deduplicated``, and, given
    ``of`` (a task id or a result), is that task."""
    __tracebackhide__ = True
    if not _deduplicated(result):
        raise AssertionError(
            "expected the call to be deduplicated, but " + _why_published(result)
        )
    if of is not None:
        expected = of if isinstance(of, str) else getattr(of, "id", of)
        if getattr(result, "id", None) != expected:
            raise AssertionError(
                f"the call was deduplicated onto task {_id(result)}, which holds "
                f"its dedup key {_key(result)}, not onto {expected}"
            )


def assert_not_deduplicated(result: object) -> None:
    """Assert that a ``DedupTask`` call published a task: ``result`` (what
    ``delay`` or ``apply_async`` returned) is not ``deduplicated``."""
    __tracebackhide__ = True
    if _deduplicated(result):
        key = _key(result)
        held = _describe_key(result, key)
        raise AssertionError(
            "expected a new task to be published, but the call was "
            f"deduplicated: task {_id(result)} holds its dedup key {key}"
            f"{held}. An earlier call with the same key (the same arguments, or "
            "the same values of those dedup_key names) holds it: a claim lasts "
            "until its task succeeds (dedup_lock) or dedup_ttl ends. "
            "release_all(app) frees every key"
        )


# -- internals ------------------------------------------------------------------


def _fake_client(server: FakeServer) -> Client:
    import fakeredis  # noqa: PLC0415 - the testing extra, in memory mode only

    return fakeredis.FakeRedis(server=server)


def _connect(url: str) -> Client:
    """A client of ``url`` as an app builds it (one server, a cluster, or a
    master found through Sentinel)."""
    return connection._client(connection.parse_url(url), 5.0)


def _check_reachable(url: str, source: str) -> None:
    __tracebackhide__ = True
    where = f"{connection.masked(url)} (from {source})"
    try:
        client = _connect(url)
        try:
            client.ping()
        finally:
            client.close()
    except ConfigurationError as exc:
        problem = f"bad Redis URL {where}: {exc}"
    except redis.RedisError as exc:
        problem = f"Redis {where} is unreachable: {exc}"
    else:
        return
    pytest.fail(f"celery_dedup.testing: {problem}", pytrace=False)


def _inspector(app: Celery) -> Inspector:
    backend = connection.get_backend(app)
    return Inspector(backend.redis, backend.config.key_prefix)


def _release(inspector: Inspector) -> int:
    return sum(inspector.release(state, force=True)[0] for state in inspector.held())


def _purge(client: Client, prefix: str) -> None:
    """Release every key under ``prefix``, then delete what is left."""
    _release(Inspector(client, prefix))
    for server in servers(client):
        names = list(server.scan_iter(match=f"{glob_escape(prefix)}:*", count=1000))
        for name in names:
            server.delete(name)


def _deduplicated(result: object) -> bool:
    __tracebackhide__ = True
    flag = getattr(result, "deduplicated", None)
    if not isinstance(flag, bool):
        raise AssertionError(
            "expected what a DedupTask's delay() or apply_async() returns (it "
            f"has .deduplicated), got {result!r}: is the task's base DedupTask "
            "(or its app's task_cls, or install(app))?"
        )
    return flag


def _id(result: object) -> str:
    return str(getattr(result, "id", None))


def _key(result: object) -> str:
    return str(getattr(result, "dedup_key", None))


def _why_published(result: object) -> str:
    task_id = _id(result)
    app = getattr(result, "app", None)
    eager = bool(app is not None and app.conf.task_always_eager)
    if isinstance(result, EagerResult) or eager:
        return (
            f"task {task_id} ran eagerly (task_always_eager, or apply()): celery-dedup "
            "takes no claim in eager mode. Turn task_always_eager off "
            "(dedup_app has it off)"
        )
    key = getattr(result, "dedup_key", None)
    if key is None:
        return (
            f"it published task {task_id} without a claim: the task does "
            "not deduplicate (dedup_enabled = False, or DedupTask is the "
            "app-wide task_cls and the task has no dedup_* option), or its "
            "dedup_lock takes no claim at enqueue (while_executing)"
        )
    text = f"it published task {task_id}: its dedup key {key} was free"
    if app is None:
        return text
    try:
        others = [s for s in held_keys(app) if s.key != key]
        prefix = connection.get_backend(app).config.key_prefix
    except (redis.RedisError, ConfigurationError) as exc:
        return f"{text} (could not list the held keys: {exc!r})"
    if not others:
        return (
            f"{text}, and no other key is held under prefix {prefix!r}: the "
            "first call's claim is gone (its task ran, was revoked, or its "
            "dedup_ttl ran out), or it was taken in another Redis or under "
            "another dedup_key_prefix"
        )
    shown = "".join(f"\n  {s.key}: {_holders(s)}" for s in others[:10])
    more = f"\n  ... and {len(others) - 10} more" if len(others) > 10 else ""
    return (
        f"{text}. Other keys held under prefix {prefix!r} (a call is dropped "
        f"only if its arguments make the same key; see dedup_key):{shown}{more}"
    )


def _describe_key(result: object, key: str) -> str:
    app = getattr(result, "app", None)
    if app is None:
        return ""
    try:
        state = _inspector(app).key(key)
    except (redis.RedisError, ConfigurationError):
        return ""
    return f" ({_holders(state)})" if state is not None else ""


def _holders(state: KeyState) -> str:
    parts = []
    if state.claim is not None:
        ttl = "no expiry" if state.claim.ttl is None else duration(state.claim.ttl)
        parts.append(f"claim by {state.claim.task_id}, {ttl} left")
    for holder in state.live_leases:
        where = f" on {holder.worker}" if holder.worker else ""
        parts.append(f"lease by {holder.task_id}{where}, {duration(holder.ttl)} left")
    return "; ".join(parts) or "nothing held"
