"""Run each Celery job once: enqueue dedup, fenced execution leases, an outbox."""

from __future__ import annotations

from .exceptions import (
    BackendUnavailableError,
    ConfigurationError,
    DedupError,
    DuplicateTaskError,
    LockLostError,
)
from .hooks import install, uninstall
from .periodic import once_per_period, per_period
from .task import DedupResult, DedupTask, current_fence
from .wiring import connect

__version__ = "0.1.0.dev0"

__all__ = [
    "BackendUnavailableError",
    "ConfigurationError",
    "DedupError",
    "DedupResult",
    "DedupTask",
    "DuplicateTaskError",
    "LockLostError",
    "__version__",
    "connect",
    "current_fence",
    "install",
    "once_per_period",
    "per_period",
    "uninstall",
]
