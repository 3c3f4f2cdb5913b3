"""The Redis client of an app, built once and cached.

redis-py's connection pool notices a fork and opens fresh connections in the
child, so one client serves the prefork parent and its children alike.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING

import redis

from .claim import Claims
from .config import DedupConfig, forget, get_config
from .exceptions import ConfigurationError
from .keys import redis_key
from .lease import Leases

if TYPE_CHECKING:
    from celery import Celery

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclasses.dataclass(frozen=True)
class Backend:
    """What one app needs to talk to Redis: settings, client and scripts."""

    config: DedupConfig
    redis: redis.Redis
    claims: Claims
    leases: Leases

    def key(self, key: str, part: str) -> str:
        """The Redis key of ``part`` of dedup key ``key``."""
        return redis_key(self.config.key_prefix, key, part)


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
        backend = Backend(config, client, Claims(client), Leases(client, heartbeat))
        _backends[app] = backend
        return backend


def reset(app: Celery) -> None:
    """Forget the settings and backend of ``app`` (after a settings change)."""
    forget(app)
    backend = _backends.pop(app, None)
    if backend is not None:
        backend.redis.close()
        backend.leases.close()
