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
from .outbox import worker as _outbox_worker  # noqa: F401  (the in-worker relay)
from .task import DedupResult, DedupTask

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
]
