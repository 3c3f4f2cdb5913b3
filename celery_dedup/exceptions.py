"""The errors celery-dedup raises. Each carries the data it names."""

from __future__ import annotations


class DedupError(Exception):
    """A celery-dedup error."""


class ConfigurationError(DedupError, ValueError):
    """A ``dedup_*`` setting, task option or call option is invalid."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {message}")


class DuplicateTaskError(DedupError):
    """Another task already holds this dedup key."""

    def __init__(self, key: str, existing_task_id: str | None, task_name: str) -> None:
        self.key = key
        self.existing_task_id = existing_task_id
        self.task_name = task_name
        super().__init__(
            f"{task_name}: dedup key {key} is held by task {existing_task_id}"
        )


class LockLostError(DedupError):
    """This execution no longer holds its lease: a newer holder may be running."""

    def __init__(self, key: str, task_id: str | None, reason: str = "") -> None:
        self.key = key
        self.task_id = task_id
        self.reason = reason
        detail = f": {reason}" if reason else ""
        super().__init__(f"task {task_id} lost the lease on dedup key {key}{detail}")


class BackendUnavailableError(DedupError):
    """Redis could not be reached and ``dedup_on_redis_error`` is ``"raise"``."""

    def __init__(self, operation: str, cause: BaseException) -> None:
        self.operation = operation
        super().__init__(
            f"Redis unavailable during {operation} ({cause!r}); set "
            "dedup_on_redis_error='proceed' to run without deduplication instead"
        )


class OutboxError(DedupError):
    """The outbox cannot do what was asked (no engine, no transaction, ...)."""
