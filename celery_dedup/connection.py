"""The Redis client of an app, built once and cached.

redis-py's connection pool notices a fork and opens fresh connections in the
child, so one client serves the prefork parent and its children alike.

``dedup_redis_url`` names one server (``redis://``, ``rediss://``,
``unix://``), a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``:
a ``RedisCluster`` on those startup nodes) or a master found through Sentinel
(``redis+sentinel://``, or Celery's ``sentinel://`` with the master name in
``dedup_redis_options``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import redis
from redis import Redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.sentinel import Sentinel

from .config import DedupConfig, forget, get_config
from .exceptions import ConfigurationError
from .lease import Heartbeat, Lease
from .model import Renewal
from .store import Store

if TYPE_CHECKING:
    from celery import Celery

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
_SENTINEL_SCHEMES = ("redis+sentinel://", "sentinel://")

#: ``host``, ``host:port``, ``[v6 address]`` or ``[v6 address]:port``.
_NODE = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>\d+))?$")

#: Client timeouts (s): commands, and lease renewals, which must fail well
#: inside a lease (a renewal that fails is retried until the lease would end).
_TIMEOUT = 5.0
_HEARTBEAT_TIMEOUT = 1.0

Client = Redis | RedisCluster


@dataclasses.dataclass(frozen=True)
class Target:
    """Where ``dedup_redis_url`` points: one server, a cluster, or a master
    found through Sentinel."""

    kind: str  # "server", "cluster" or "sentinel"
    url: str
    nodes: tuple[tuple[str, int], ...] = ()  # cluster startup nodes, sentinels
    master_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    sentinel_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Backend:
    """What one app needs to talk to Redis: settings, client, scripts, and the
    process's heartbeat."""

    config: DedupConfig
    redis: Client
    store: Store
    heartbeat: Heartbeat
    heartbeat_redis: Client

    def close(self) -> None:
        self.redis.close()
        self.heartbeat_redis.close()


_backends: weakref.WeakKeyDictionary[Celery, Backend] = weakref.WeakKeyDictionary()
#: The clients given by :func:`use_client`: ``(commands, renewals)``.
_given: weakref.WeakKeyDictionary[Celery, tuple[Client, Client]] = (
    weakref.WeakKeyDictionary()
)


def redis_url(app: Celery) -> str:
    """``dedup_redis_url``, else the broker or result backend URL if Redis.

    A configured URL is parsed here, so that a malformed one (or a Sentinel
    URL without a master name) fails the worker's start-up checks."""
    config = get_config(app)
    if config.redis_url:
        parse_url(config.redis_url, config.redis_options)
        return config.redis_url
    for candidate in (app.conf.broker_url, app.conf.result_backend):
        if isinstance(candidate, str) and candidate.startswith(_REDIS_SCHEMES):
            return candidate
    raise ConfigurationError(
        "dedup_redis_url",
        "not set, and neither broker_url nor result_backend is a Redis URL",
    )


def parse_url(url: str, options: Mapping[str, Any] | None = None) -> Target:
    """What ``url`` (and ``dedup_redis_options``) point at; ConfigurationError
    naming the setting if either is malformed."""
    options = options or {}
    if url.startswith(_SENTINEL_SCHEMES):
        return _sentinel_target(url, options)
    if options:
        raise ConfigurationError(
            "dedup_redis_options", "only a Sentinel dedup_redis_url takes options"
        )
    if url.startswith(_REDIS_SCHEMES):
        return Target("server", url)
    if url.startswith(_CLUSTER_SCHEMES):
        return _cluster_target(url)
    raise ConfigurationError(
        "dedup_redis_url",
        "expected a redis://, rediss:// or unix:// URL, or one of a Redis "
        "Cluster (redis+cluster://, rediss+cluster://) or Sentinel "
        f"(redis+sentinel://, sentinel://), got {masked(url)!r}",
    )


def display_url(app: Celery) -> str:
    """:func:`redis_url` with its passwords masked, for messages.

    kombu's ``maybe_sanitize_url`` raises ValueError on a URL listing several
    nodes (``a:1,b:2``, ``sentinel://a;sentinel://b``); this does not."""
    return masked(redis_url(app))


def masked(url: str) -> str:
    """``url`` with the password of each of its parts replaced by ``**``."""
    return re.sub(r"(//[^/@;]*?:)[^/@;]*@", r"\1**@", url)


def _bad(url: str, why: str) -> ConfigurationError:
    return ConfigurationError("dedup_redis_url", f"{why} in {masked(url)!r}")


def _split(url: str, part: str) -> tuple[str, str, str]:
    """``(scheme, netloc, path)`` of ``part``, one URL of ``url``. Split by
    hand: urllib refuses a netloc listing several nodes."""
    if "?" in part or "#" in part:
        raise _bad(url, "query options are not supported")
    scheme, _, rest = part.partition("://")
    netloc, slash, path = rest.partition("/")
    return scheme, netloc, slash + path


def _credentials(netloc: str) -> tuple[str | None, str | None, str]:
    """``(username, password, nodes)`` of a netloc."""
    userinfo, at, nodes = netloc.rpartition("@")
    if not at:
        return None, None, nodes
    user, colon, password = userinfo.partition(":")
    unquote = urllib.parse.unquote
    return unquote(user) or None, unquote(password) if colon else None, nodes


def _nodes(url: str, text: str, default_port: int) -> list[tuple[str, int]]:
    nodes = []
    for node in text.split(","):
        found = _NODE.match(node.strip())
        if not found:
            raise _bad(url, f"expected host:port, got {node!r}")
        port = int(found["port"] or default_port)
        if not 0 < port < 65536:
            raise _bad(url, f"port {port} is out of range")
        nodes.append((found["v6"] or found["host"], port))
    return nodes


def _cluster_target(url: str) -> Target:
    scheme, netloc, path = _split(url, url)
    username, password, nodes = _credentials(netloc)
    if path not in ("", "/"):
        raise _bad(url, "a cluster URL takes no path (a cluster has db 0 only)")
    return Target(
        "cluster",
        url,
        tuple(_nodes(url, nodes, 6379)),
        username=username,
        password=password,
        ssl=scheme == "rediss+cluster",
    )


def _sentinel_target(url: str, options: Mapping[str, Any]) -> Target:
    """``redis+sentinel://[user:password@]h:p[,h:p...]/<master>[/<db>]``, or
    Celery's ``sentinel://[:password@]h:p[;sentinel://h:p...][/<db>]`` with
    the master name in ``dedup_redis_options``."""
    nodes: list[tuple[str, int]] = []
    users: list[str | None] = []
    passwords: list[str | None] = []
    paths: list[str] = []
    # Celery's form joins one URL per sentinel with ';' (the db usually on
    # the last); ours lists the sentinels in one netloc.
    celery_form = url.startswith("sentinel://")
    parts = url.split(";") if celery_form else [url]
    if not all(p.startswith("sentinel://") for p in parts[1:]):
        raise _bad(url, "expected sentinel:// URLs joined by ';'")
    for part in parts:
        _, netloc, path = _split(url, part)
        username, password, text = _credentials(netloc)
        nodes += _nodes(url, text, 26379)
        users.append(username)
        passwords.append(password)
        paths.append(path.strip("/"))
    if celery_form:
        # Any of the URLs may carry the credentials and the db, as in kombu.
        dbs = {p for p in paths if p}
        if len(dbs) > 1:
            raise _bad(url, f"several databases ({', '.join(sorted(dbs))})")
        master, db = "", next(iter(dbs), "0")
    else:
        master, _, db = paths[0].partition("/")
        db = db or "0"
    if not db.isdigit():
        raise _bad(url, f"expected a database number, got {db!r}")
    named = options.get("master_name")
    if master and named and master != named:
        raise ConfigurationError(
            "dedup_redis_options",
            f"master_name {named!r} differs from the master {master!r} of "
            "dedup_redis_url",
        )
    if not (master or named):
        raise ConfigurationError(
            "dedup_redis_options" if celery_form else "dedup_redis_url",
            "a Sentinel URL needs a master name: redis+sentinel://host:port/<master>, "
            "or dedup_redis_options = {'master_name': ...} for sentinel:// URLs",
        )
    return Target(
        "sentinel",
        url,
        tuple(nodes),
        master_name=str(master or named),
        db=int(db),
        username=next((u for u in users if u), None),
        password=next((p for p in passwords if p), None),
        sentinel_kwargs=options.get("sentinel_kwargs", {}),
    )


def _client(target: Target, timeout: float, **extra: Any) -> Client:
    """A client of ``target`` whose connects and commands time out after
    ``timeout`` s."""
    timeouts: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
    }
    if target.kind == "server":
        return Redis.from_url(target.url, **timeouts, **extra)
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind == "cluster":
        nodes = [
            ClusterNode(host, port)  # type: ignore[no-untyped-call]
            for host, port in target.nodes
        ]
        try:
            return RedisCluster(
                startup_nodes=nodes, ssl=target.ssl, **auth, **timeouts, **extra
            )
        except RedisClusterException as exc:
            # RedisCluster asks for the slots map at once; an unreachable
            # cluster must be the RedisError every caller handles
            # (dedup_on_redis_error), and the next use tries again.
            raise redis.ConnectionError(f"Redis Cluster unreachable: {exc}") from exc
    # The sentinels are asked with the same timeouts; a master_for client
    # asks them again for the master after a failover drops its connections.
    sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
        list(target.nodes), sentinel_kwargs={**timeouts, **target.sentinel_kwargs}
    )
    client: Redis = sentinel.master_for(  # type: ignore[no-untyped-call,unused-ignore]
        target.master_name, db=target.db, **auth, **timeouts, **extra
    )
    return client


def get_backend(app: Celery) -> Backend:
    """The app's backend, created on first use."""
    try:
        return _backends[app]
    except KeyError:
        config = get_config(app)
        given = _given.get(app)
        if given is not None:  # use_client()
            client, heartbeat = given
        else:
            target = parse_url(redis_url(app), config.redis_options)
            client = _client(target, _TIMEOUT, health_check_interval=30)
            # Renewals get their own connections, with short timeouts.
            heartbeat = _client(target, _HEARTBEAT_TIMEOUT)
            for each in (client, heartbeat):
                _hold_across_fork(each)
        # Store only registers scripts and runs them: RedisCluster has both,
        # with each script routed to the slot of its keys (one hash tag).
        store = Store(
            client,
            config.key_prefix,
            replicas=config.lease_replicas,
            replica_timeout=config.lease_replicas_timeout,
        )

        def renew(lease: Lease) -> Renewal:
            return store.renew(lease.key, lease.member, lease.ttl, client=heartbeat)

        backend = Backend(config, client, store, Heartbeat(renew), heartbeat)
        _backends[app] = backend
        return backend


def _hold_across_fork(client: Client) -> None:
    """Hold a client's locks across ``fork()``.

    The worker's main process uses its clients from the background thread
    (deferred releases) while billiard forks new children. A child forked
    while that thread held a connection pool's lock inherits it locked, and
    redis-py's reset of the pool in the child (``_checkpid``) then waits on it
    forever. A cluster client has a pool per node, created as nodes appear,
    and the locks of its nodes map: those are taken first, in redis-py's own
    order (initialisation, then the map), then every pool's.
    """
    held: list[Any] = []

    def locks() -> list[Any]:
        if isinstance(client, RedisCluster):
            manager = client.nodes_manager
            found = [
                getattr(manager, "_initialization_lock", None),
                getattr(manager, "_lock", None),
            ]
            pools = [
                node.redis_connection.connection_pool
                for node in list(manager.nodes_cache.values())
                if node.redis_connection is not None
            ]
        else:
            found, pools = [], [client.connection_pool]
        found += [getattr(pool, "_lock", None) for pool in pools]
        return [lock for lock in found if hasattr(lock, "acquire")]

    def before() -> None:
        for lock in locks():
            lock.acquire()
            held.append(lock)

    def after() -> None:
        while held:
            held.pop().release()

    os.register_at_fork(before=before, after_in_parent=after, after_in_child=after)


def live_backends() -> list[Backend]:
    """The backends this process has built (to flush their work at exit)."""
    return list(_backends.values())


def use_client(
    app: Celery, client: Client | None, heartbeat: Client | None = None
) -> None:
    """Make ``app`` talk to Redis through ``client`` instead of connecting to
    ``dedup_redis_url``; ``None`` undoes it. For tests: the pytest plugin
    :mod:`celery_dedup.testing` passes a ``fakeredis.FakeRedis`` client.

    ``heartbeat`` runs the lease renewals (default: ``client``). The other
    settings are still read from ``app.conf``. The app's backend is
    :func:`reset`, so its next use is built on the new client; a later
    :func:`reset` keeps the client given here (and closes its connections,
    which redis-py opens again when next used).
    """
    reset(app)
    if client is None:
        _given.pop(app, None)
    else:
        _given[app] = (client, client if heartbeat is None else heartbeat)


def reset(app: Celery) -> None:
    """Forget the settings and backend of ``app`` (after a settings change)."""
    forget(app)
    backend = _backends.pop(app, None)
    if backend is not None:
        backend.close()
