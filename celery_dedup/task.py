"""``DedupTask``: a Celery task base class that publishes once per dedup key."""

from __future__ import annotations

import datetime
import functools
import inspect
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import redis
from celery import Task, current_task
from celery.exceptions import Reject, Retry
from celery.result import AsyncResult
from celery.utils import uuid

from . import claim as claims
from .config import TASK_OPTIONS, TaskOptions, get_config, resolve, validate_task_option
from .connection import Backend, get_backend
from .exceptions import BackendUnavailableError, DuplicateTaskError
from .keys import make_key, task_signature

if TYPE_CHECKING:
    _TaskBase = Task[Any, Any]
else:
    _TaskBase = Task

logger = logging.getLogger(__name__)

#: The message header that carries a call's dedup decision to the worker.
HEADER: Final = "celery_dedup"

_RELEASE_AT_START: Final = frozenset({"until_executing", "until_and_while_executing"})
_RELEASE_AT_END: Final = frozenset({"until_executed"})


class DedupResult(AsyncResult):  # type: ignore[type-arg]
    """An ``AsyncResult`` that says whether the call was deduplicated."""

    #: True when the call published nothing and this is the existing task.
    deduplicated: bool = False


class DedupTask(_TaskBase):
    """A task that runs once per dedup key. See the configuration reference.

    Every option may be set as a class attribute (``@app.task(dedup_ttl=60)``)
    or per call (``task.apply_async(args, dedup_ttl=60)``); None means "take
    it from the ``dedup_tasks`` entry or the ``dedup_*`` setting".
    """

    dedup_key: Any = None
    dedup_lock: str | None = None
    dedup_on_conflict: str | None = None
    dedup_ttl: float | None = None
    dedup_lock_ttl: float | None = None
    dedup_max_running: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        where = f"{vars(cls).get('name') or cls.__qualname__}."
        for name, value in list(vars(cls).items()):
            if not name.startswith("dedup_") or name in _METHODS or value is None:
                continue
            validate_task_option(name, value, where)
            if name == "dedup_key" and inspect.isfunction(value):
                # A plain function stored on a class would bind as a method.
                cls.dedup_key = staticmethod(value)

    # -- enqueue -----------------------------------------------------------

    def apply_async(
        self,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> AsyncResult:  # type: ignore[type-arg]
        """Publish unless another task holds this call's dedup key.

        Returns a :class:`DedupResult`: the new task's, or with
        ``dedup_on_conflict="skip"`` the existing task's, with
        ``deduplicated`` set. Raises :class:`DuplicateTaskError` with
        ``dedup_on_conflict="raise"``.
        """
        call = {
            name: _check_call_option(name, options.pop(name))
            for name in TASK_OPTIONS
            if name in options
        }
        app = self.app
        headers = dict(options.pop("headers", None) or {})
        stamp = headers.get(HEADER)
        if not get_config(app).enabled or app.conf.task_always_eager:
            # Eager calls run in this process at once: nothing is queued twice.
            result = super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow,
                headers=headers, **options,
            )  # fmt: skip
            result.deduplicated = False  # type: ignore[attr-defined]
            return result

        backend = get_backend(app)
        task_id = task_id or uuid()
        # A retry republishes the running message under its own id: never
        # deduplicate it, not even against a claim another task took meanwhile.
        retrying = task_id == self.request.id
        if isinstance(stamp, Mapping) and retrying:
            stamp = dict(stamp)
        else:
            opts = self._dedup_options(call)
            stamp = _stamp(self._dedup_key(opts, args, kwargs), opts)

        if stamp["lock"] != "while_executing":
            held = self._claim(backend, stamp, task_id, options)
            if held is not None and not held.acquired and not retrying:
                return self._deduplicated(stamp, held.holder)
            stamp["claim"] = held is not None and held.acquired
        headers[HEADER] = stamp
        try:
            result = super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow,
                headers=headers, **options,
            )  # fmt: skip
        except BaseException:
            if stamp.get("claim"):
                self._release_claim(backend, stamp["key"], task_id)
            raise
        return result

    def dedup_key_for(
        self,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> str:
        """The dedup key that ``apply_async(args, kwargs, **options)`` would use."""
        call = {n: _check_call_option(n, options[n]) for n in options}
        return self._dedup_key(self._dedup_options(call), args, kwargs)

    def _dedup_key(
        self, opts: TaskOptions, args: Any, kwargs: Mapping[str, Any] | None
    ) -> str:
        return make_key(self.name, self._dedup_signature, opts.key, args, kwargs)

    def AsyncResult(self, task_id: str, **kwargs: Any) -> DedupResult:
        """Get the :class:`DedupResult` of ``task_id``."""
        return DedupResult(
            task_id,
            backend=self.backend,
            task_name=self.name,
            app=self.app,
            **kwargs,
        )

    def _dedup_options(self, call: Mapping[str, Any]) -> TaskOptions:
        attributes = {name: getattr(type(self), name) for name in TASK_OPTIONS}
        return resolve(get_backend(self.app).config, self.name, attributes, call)

    @functools.cached_property
    def _dedup_signature(self) -> inspect.Signature | None:
        return task_signature(self.run)

    def _claim(
        self,
        backend: Backend,
        stamp: dict[str, Any],
        task_id: str,
        options: Mapping[str, Any],
    ) -> claims.ClaimResult | None:
        """Take the enqueue claim; None when Redis is down and we may proceed."""
        ttl = _claim_ttl(stamp["ttl"], options)
        try:
            return backend.claims.claim(
                backend.key(stamp["key"], "claim"), task_id, ttl
            )
        except redis.RedisError as exc:
            if backend.config.on_redis_error == "raise":
                raise BackendUnavailableError("the enqueue claim", exc) from exc
            logger.warning(
                "Redis unavailable: %s[%s] published without an enqueue claim",
                self.name,
                task_id,
                extra={"dedup_key": stamp["key"], "task_id": task_id},
            )
            return None

    def _deduplicated(self, stamp: Mapping[str, Any], holder: str) -> DedupResult:
        logger.info(
            "Deduplicated %s: key %s is held by task %s",
            self.name,
            stamp["key"],
            holder,
            extra={"dedup_key": stamp["key"], "task_id": holder, "stage": "enqueue"},
        )
        if stamp["on_conflict"] == "raise":
            raise DuplicateTaskError(stamp["key"], holder, self.name)
        result = self.AsyncResult(holder)
        result.deduplicated = True
        return result

    def _release_claim(self, backend: Backend, key: str, task_id: str) -> None:
        try:
            backend.claims.release(backend.key(key, "claim"), task_id)
        except redis.RedisError:
            logger.warning(
                "Could not release the claim of %s[%s]; it expires by its TTL",
                self.name,
                task_id,
                exc_info=True,
                extra={"dedup_key": key, "task_id": task_id},
            )

    # -- execution ---------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        task_id = request.id
        stamp = (request.headers or {}).get(HEADER)
        if (
            task_id is None
            or request.is_eager
            or not isinstance(stamp, Mapping)
            or not stamp.get("claim")
        ):
            return super().__call__(*args, **kwargs)
        backend = get_backend(self.app)
        mode, key = stamp["lock"], stamp["key"]
        if mode in _RELEASE_AT_START:
            self._release_claim(backend, key, task_id)
        try:
            result = super().__call__(*args, **kwargs)
        except Retry:
            raise  # the retry message owns the claim now
        except Reject as exc:
            if not getattr(exc, "requeue", False) and mode not in _RELEASE_AT_START:
                self._release_claim(backend, key, task_id)
            raise
        except BaseException:
            # A final failure frees the key, so the work can be submitted again.
            if mode not in _RELEASE_AT_START:
                self._release_claim(backend, key, task_id)
            raise
        if mode in _RELEASE_AT_END:
            self._release_claim(backend, key, task_id)
        return result


_METHODS: Final = frozenset(
    name for name in vars(DedupTask) if name.startswith("dedup_")
) - set(TASK_OPTIONS)


def _check_call_option(name: str, value: Any) -> Any:
    if name == "dedup_key" and isinstance(value, str):
        return value  # per call, a string is the key itself
    if value is None:
        return None
    return validate_task_option(name, value, "apply_async: ")


def _stamp(key: str, opts: TaskOptions) -> dict[str, Any]:
    return {
        "key": key,
        "lock": opts.lock,
        "on_conflict": opts.on_conflict,
        "ttl": opts.ttl,
        "lock_ttl": opts.lock_ttl,
        "max_running": opts.max_running,
    }


def _claim_ttl(ttl: float, options: Mapping[str, Any]) -> float:
    """The claim outlives the wait for an ``eta``/``countdown``, not ``expires``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    delay = _seconds_until(options.get("eta"), now) or float(
        options.get("countdown") or 0
    )
    total = ttl + max(0.0, delay)
    expires = options.get("expires")
    if expires is not None:
        left = (
            _seconds_until(expires, now)
            if isinstance(expires, datetime.datetime)
            else float(expires)
        )
        total = min(total, max(left, 0.001))
    return float(total)


def _seconds_until(moment: object, now: datetime.datetime) -> float:
    if not isinstance(moment, datetime.datetime):
        return 0.0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return (moment - now).total_seconds()


def current_fence() -> tuple[str, int] | None:
    """The (dedup key, fencing token) of the DedupTask body running here, if any.

    Tokens are integers (up to 2**53), strictly increasing per key; the outbox
    uses them to reject a write from an execution that a newer one replaced.
    """
    task = current_task
    if task is None or not isinstance(task, DedupTask):
        return None
    fence = getattr(task.request, "dedup_fence", None)
    key = getattr(task.request, "dedup_key", None)
    if fence is None or key is None:
        return None
    return str(key), int(fence)
