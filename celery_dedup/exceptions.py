"""The errors celery-dedup raises. Each carries the data it names."""

from __future__ import annotations


class DedupError(Exception):
    """A celery-dedup error."""


# Each error keeps its constructor arguments as ``args``, so that a result
# backend that stores ``args`` (Celery's JSON serialiser does) rebuilds it.


class ConfigurationError(DedupError, ValueError):
    """A ``dedup_*`` setting, task option or call option is invalid."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(setting, message)
        self.setting = setting
        self.message = message

    def __str__(self) -> str:
        return f"{self.setting}: {self.message}"


class DuplicateTaskError(DedupError):
    """Another task already holds this dedup key."""

    def __init__(self, key: str, existing_task_id: str | None, task_name: str) -> None:
        super().__init__(key, existing_task_id, task_name)
        self.key = key
        self.existing_task_id = existing_task_id
        self.task_name = task_name

    def __str__(self) -> str:
        return (
            f"{self.task_name}: dedup key {self.key} is held by task "
            f"{self.existing_task_id}"
        )


class LockLostError(DedupError):
    """This execution no longer holds its lease: a newer holder may be running."""

    def __init__(self, key: str, task_id: str | None, reason: str = "") -> None:
        super().__init__(key, task_id, reason)
        self.key = key
        self.task_id = task_id
        self.reason = reason

    def __str__(self) -> str:
        detail = f": {self.reason}" if self.reason else ""
        return f"task {self.task_id} lost the lease on dedup key {self.key}{detail}"


class BackendUnavailableError(DedupError):
    """Redis could not be reached and ``dedup_on_redis_error`` is ``"raise"``."""

    def __init__(self, operation: str, cause: object, url: str | None = None) -> None:
        super().__init__(operation, cause, url)
        self.operation = operation
        self.cause = cause
        self.url = url  #: the Redis URL, its password masked

    def __str__(self) -> str:
        at = f" at {self.url}" if self.url else ""
        return (
            f"Redis{at} unavailable during {self.operation} ({self.cause!r}); set "
            "dedup_on_redis_error='proceed' to run without deduplication instead"
        )


class OutboxError(DedupError):
    """The outbox cannot do what was asked (no engine, no transaction, ...)."""
