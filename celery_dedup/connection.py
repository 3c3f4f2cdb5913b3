"""The Redis client of an app, built once and cached.

redis-py's connection pool notices a fork and opens fresh connections in the
child, so one client serves the prefork parent and its children alike.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from typing import TYPE_CHECKING

import redis
from redis import Redis

from .config import DedupConfig, forget, get_config
from .exceptions import ConfigurationError
from .lease import Heartbeat, Lease
from .model import Renewal
from .store import Store

if TYPE_CHECKING:
    from celery import Celery

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclasses.dataclass(frozen=True)
class Backend:
    """What one app needs to talk to Redis: settings, client, scripts, and the
    process's heartbeat."""

    config: DedupConfig
    redis: redis.Redis
    store: Store
    heartbeat: Heartbeat
    heartbeat_redis: Redis

    def close(self) -> None:
        self.redis.close()
        self.heartbeat_redis.close()


_backends: weakref.WeakKeyDictionary[Celery, Backend] = weakref.WeakKeyDictionary()


def redis_url(app: Celery) -> str:
    """``dedup_redis_url``, else the broker or result backend URL if Redis."""
    configured = get_config(app).redis_url
    if configured:
        if not configured.startswith(_REDIS_SCHEMES):
            raise ConfigurationError(
                "dedup_redis_url",
                f"expected a redis://, rediss:// or unix:// URL, got {configured!r}",
            )
        return configured
    for candidate in (app.conf.broker_url, app.conf.result_backend):
        if isinstance(candidate, str) and candidate.startswith(_REDIS_SCHEMES):
            return candidate
    raise ConfigurationError(
        "dedup_redis_url",
        "not set, and neither broker_url nor result_backend is a Redis URL",
    )


def get_backend(app: Celery) -> Backend:
    """The app's backend, created on first use."""
    try:
        return _backends[app]
    except KeyError:
        config = get_config(app)
        url = redis_url(app)
        client = redis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
        )
        # Renewals get their own connections, with timeouts well inside a lease
        # (a renewal that fails is retried until the lease would expire).
        heartbeat = redis.Redis.from_url(
            url, socket_timeout=1, socket_connect_timeout=1
        )
        for pool in (client.connection_pool, heartbeat.connection_pool):
            _hold_across_fork(pool)
        store = Store(client, config.key_prefix)

        def renew(lease: Lease) -> Renewal:
            return store.renew(lease.key, lease.member, lease.ttl, client=heartbeat)

        backend = Backend(config, client, store, Heartbeat(renew), heartbeat)
        _backends[app] = backend
        return backend


def _hold_across_fork(pool: object) -> None:
    """Hold a connection pool's lock across ``fork()``.

    The worker's main process uses its pools from the background thread
    (deferred releases) while billiard forks new children. A child forked
    while that thread held the pool's lock inherits it locked, and redis-py's
    reset of the pool in the child (``_checkpid``) then waits on it forever.
    """
    lock = getattr(pool, "_lock", None)
    if lock is not None and hasattr(lock, "acquire"):
        os.register_at_fork(
            before=lock.acquire,
            after_in_parent=lock.release,
            after_in_child=lock.release,
        )


def live_backends() -> list[Backend]:
    """The backends this process has built (to flush their work at exit)."""
    return list(_backends.values())


def reset(app: Celery) -> None:
    """Forget the settings and backend of ``app`` (after a settings change)."""
    forget(app)
    backend = _backends.pop(app, None)
    if backend is not None:
        backend.close()
