"""Run each Celery job once: enqueue dedup, fenced execution leases, an outbox."""

from __future__ import annotations

from . import checks as _checks  # noqa: F401  (connects the start-up checks)
from .exceptions import (
    BackendUnavailableError,
    ConfigurationError,
    DedupError,
    DuplicateTaskError,
    LockLostError,
)
from .hooks import install
from .outbox import worker as _outbox_worker  # noqa: F401  (the in-worker relay)
from .periodic import once_per_period, per_period
from .task import DedupResult, DedupTask, current_fence

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
    "current_fence",
    "install",
    "once_per_period",
    "per_period",
]
