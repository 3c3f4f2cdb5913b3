"""``DedupTask``: publish once per dedup key, run under a fenced lease."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import redis
from celery import Task, current_task
from celery.exceptions import Ignore, Reject, Retry
from celery.result import AsyncResult
from celery.utils import uuid

from . import claim as claims
from . import lease as leases
from . import signals
from .config import (
    TASK_OPTIONS,
    TaskOptions,
    get_config,
    resolve,
    validate_task_option,
    visibility_timeout,
)
from .connection import Backend, get_backend
from .exceptions import (
    BackendUnavailableError,
    ConfigurationError,
    DuplicateTaskError,
    LockLostError,
)
from .keys import make_key, task_signature

if TYPE_CHECKING:
    _TaskBase = Task[Any, Any]
else:
    _TaskBase = Task

logger = logging.getLogger(__name__)

#: The message header that carries a call's dedup decision to the worker:
#: ``{"key": str, "claim": bool, "lock": mode, "options": {call overrides}}``.
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

    #: The worker-side request class: frees a lease whose process died.
    Request = "celery_dedup.request:DedupRequest"

    @classmethod
    def on_bound(cls, app: Any) -> None:
        """Check the task's dedup options, annotations included, once bound."""
        super().on_bound(app)
        cls.dedup_attributes()

    @classmethod
    def dedup_attributes(cls) -> dict[str, Any]:
        """The task's own ``dedup_*`` options (attributes and annotations),
        checked: an unknown or ill-typed one raises, named with the task."""
        where = f"{cls.name or cls.__qualname__}."
        names = {n for n in vars(cls) if n.startswith("dedup_")} - _METHODS
        found = {}
        for name in sorted(names | set(TASK_OPTIONS)):
            value = getattr(cls, name)
            if value is not None:  # an unknown name fails here, named
                found[name] = validate_task_option(name, value, where)
        if inspect.isfunction(cls.dedup_key):
            # A plain function stored on a class would bind as a method.
            cls.dedup_key = staticmethod(cls.dedup_key)
        return found

    def _dedup_on(self) -> bool:
        """Whether this task deduplicates at all.

        With ``base=DedupTask`` it does. As the app-wide default
        (``task_cls="celery_dedup:DedupTask"``) only a task that opts in does:
        one with a ``dedup_*`` option (attribute or annotation) or a
        ``dedup_tasks`` entry; the others behave as plain Celery tasks.
        """
        config = get_config(self.app)
        cached = self.__dict__.get("_dedup_on_cache")
        if cached is not None and cached[0] is config:
            return bool(cached[1])
        default = self.app.Task
        app_wide = isinstance(self, default) and issubclass(default, DedupTask)
        on = config.enabled and (
            not app_wide
            or self.name in config.tasks
            or any(getattr(type(self), n) is not None for n in TASK_OPTIONS)
        )
        self.__dict__["_dedup_on_cache"] = (config, on)
        return on

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
        call = _call_options(options, "apply_async")
        app = self.app
        headers = dict(options.pop("headers", None) or {})
        stamp = headers.get(HEADER)
        if app.conf.task_always_eager or not (call or self._dedup_on()):
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
            opts = self._dedup_options(_overrides(stamp))
        else:
            opts = self._dedup_options(call)
            stamp = {
                "key": self._dedup_key(opts, args, kwargs),
                "lock": opts.lock,
                "options": {n: v for n, v in call.items() if n != "dedup_key"},
            }

        had_claim = bool(stamp.get("claim"))
        stamp["claim"] = False
        if opts.lock != "while_executing":
            held = self._claim(backend, stamp["key"], opts, task_id, options, retrying)
            if held is not None and not retrying and held.status != claims.NEW:
                # Taken by another task, or this very task id is already pending
                # (a caller that sends deterministic task ids twice).
                return self._deduplicated(stamp["key"], opts, held.holder)
            # A retry that could not reach Redis still owns the claim it had.
            stamp["claim"] = held.acquired if held is not None else had_claim
        headers[HEADER] = stamp
        try:
            result = super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow,
                headers=headers, **options,
            )  # fmt: skip
        except BaseException:
            if stamp["claim"]:
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
        call = _call_options(dict(options), "dedup_key_for")
        if options.keys() - call.keys():
            unknown = sorted(options.keys() - call.keys())
            raise ConfigurationError(
                f"dedup_key_for: {unknown[0]}", "takes only dedup_* options"
            )
        return self._dedup_key(self._dedup_options(call), args, kwargs)

    def AsyncResult(self, task_id: str, **kwargs: Any) -> DedupResult:
        """Get the :class:`DedupResult` of ``task_id``."""
        return DedupResult(
            task_id, backend=self.backend, task_name=self.name, app=self.app, **kwargs
        )

    def _dedup_options(self, call: Mapping[str, Any]) -> TaskOptions:
        config = get_config(self.app)
        cached = self.__dict__.get("_dedup_defaults")
        if not call and cached is not None and cached[0] is config:
            return cached[1]  # type: ignore[no-any-return]
        attributes = self.__dict__.get("_dedup_attributes")
        if attributes is None:
            attributes = self.__dict__["_dedup_attributes"] = self.dedup_attributes()
        opts = resolve(config, self.name, attributes, call)
        if not call:
            self.__dict__["_dedup_defaults"] = (config, opts)
        return opts

    def _dedup_key(
        self, opts: TaskOptions, args: Any, kwargs: Mapping[str, Any] | None
    ) -> str:
        return make_key(self.name, self._dedup_signature, opts.key, args, kwargs)

    @functools.cached_property
    def _dedup_signature(self) -> inspect.Signature | None:
        return task_signature(self.run)

    def _claim(
        self,
        backend: Backend,
        key: str,
        opts: TaskOptions,
        task_id: str,
        options: Mapping[str, Any],
        retrying: bool,
    ) -> claims.ClaimResult | None:
        """Take the enqueue claim; None when Redis is down and we may proceed.

        A retry always proceeds: failing it would lose the task.
        """
        try:
            return backend.claims.claim(
                backend.key(key, "claim"),
                backend.key(key, f"done:{task_id}"),
                task_id,
                claims.ttl_for(opts.ttl, {"expires": self.expires, **options}),
            )
        except redis.RedisError as exc:
            if retrying:
                logger.warning(
                    "Redis unavailable: retry of %s[%s] published without a claim",
                    self.name,
                    task_id,
                    extra=_extra(self.name, key, task_id),
                )
            else:
                self._redis_down(backend, "the enqueue claim", exc, key, task_id)
            return None

    def _redis_down(
        self, backend: Backend, operation: str, exc: Exception, key: str, task_id: str
    ) -> None:
        """Raise, or log and carry on, as ``dedup_on_redis_error`` says."""
        if backend.config.on_redis_error == "raise":
            raise BackendUnavailableError(operation, exc) from exc
        logger.warning(
            "Redis unavailable: %s[%s] goes on without %s",
            self.name,
            task_id,
            operation,
            extra=_extra(self.name, key, task_id),
        )

    def _deduplicated(self, key: str, opts: TaskOptions, holder: str) -> DedupResult:
        _log_duplicate(self.name, key, None, holder, "enqueue")
        if opts.on_conflict == "raise":
            raise DuplicateTaskError(key, holder, self.name)
        result = self.AsyncResult(holder)
        result.deduplicated = True
        return result

    def _release_claim(self, backend: Backend, key: str, task_id: str) -> None:
        def release() -> object:
            return backend.claims.release(backend.key(key, "claim"), task_id)

        try:
            release()
        except redis.RedisError:
            logger.warning(
                "Could not release the claim of %s[%s]; retrying in the background",
                self.name,
                task_id,
                exc_info=True,
                extra=_extra(self.name, key, task_id),
            )
            ttl = self._dedup_options({}).ttl
            backend.leases.later(release, time.monotonic() + ttl)

    # -- execution ---------------------------------------------------------

    def dedup_lease_valid(self) -> bool:
        """True while this body still holds its lease (False once it is lost).

        Outside a leased body (eager, dedup disabled, Redis down with
        ``dedup_on_redis_error="proceed"``) there is no lease and this is True.
        """
        lease = getattr(self.request, "dedup_lease", None)
        return lease is None or bool(lease.valid)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        task_id = request.id
        if task_id is None or request.is_eager:
            return super().__call__(*args, **kwargs)
        if not self._dedup_on() and stamp_of(request) is None:
            return super().__call__(*args, **kwargs)  # a call that did not opt in
        plan = self._execution_plan(request, args, kwargs)
        backend = get_backend(self.app)
        lease = self._acquire(backend, plan, task_id)
        if lease is None:  # Redis down and dedup_on_redis_error="proceed"
            return super().__call__(*args, **kwargs)
        vars(request).update(
            dedup_lease=lease, dedup_fence=lease.token, dedup_key=plan.key
        )
        backend.leases.watch(lease)
        ended = "failure"
        try:
            result = super().__call__(*args, **kwargs)
            if not lease.valid:
                reason = lease.lost_reason or "lost"
                lease.lose(reason)  # logs and signals, unless the heartbeat did
                raise LockLostError(plan.key, task_id, reason)
            ended = "success"
            return result
        except Retry:
            ended = "retry"  # the retry's message keeps the claim
            raise
        except Reject as exc:
            ended = "retry" if getattr(exc, "requeue", False) else "failure"
            raise
        finally:
            backend.leases.unwatch(lease)
            self._release(backend, plan, lease, task_id, ended)

    def _execution_plan(
        self, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> _Plan:
        stamp = stamp_of(request)
        if stamp is not None:
            opts = self._dedup_options(_overrides(stamp))
            plan = _Plan(stamp["key"], bool(stamp.get("claim")), opts)
            plan.duplicate_of = stamp.get("duplicate_of")
            return plan
        # Published by code without celery-dedup: no claim was taken. An
        # idempotency key (until_expired) is then claimed here, at execution.
        opts = self._dedup_options({})
        plan = _Plan(self._dedup_key(opts, args, kwargs), False, opts)
        plan.claim_here = opts.lock == "until_expired"
        return plan

    def _acquire(
        self, backend: Backend, plan: _Plan, task_id: str
    ) -> leases.Lease | None:
        """Take the lease, or end this delivery as the conflict rule says."""
        names = (
            backend.key(plan.key, "lease"),
            backend.key(plan.key, "fence"),
            backend.key(plan.key, f"done:{task_id}"),
            backend.key(plan.key, "claim"),
        )
        thread = None
        if threading.current_thread() is not threading.main_thread():
            thread = threading.get_ident()
        member = leases.member(task_id, self.request.hostname, os.getpid(), thread)
        if plan.duplicate_of is not None:
            # Its publisher found the key claimed but could not stop the
            # publish (a signal receiver cannot): it ends here, unrun. The
            # publisher already logged and signalled it.
            logger.debug(
                "Dropped %s[%s], published as a duplicate of %s",
                self.name,
                task_id,
                plan.duplicate_of,
                extra=_extra(self.name, plan.key, task_id),
            )
            raise Ignore()
        asked_at = time.monotonic()
        try:
            outcome = backend.leases.acquire(
                names,
                member,
                plan.lock_ttl,
                plan.max_running,
                # Tokens start from Redis time in us, so the counter needs to
                # outlive a lease only to order acquisitions within one us.
                max(backend.config.done_ttl, 3 * plan.lock_ttl),
                release_claim=plan.lock in _RELEASE_AT_START,
                claim_ttl=plan.ttl if plan.claim_here else 0,
            )
        except redis.RedisError as exc:
            if backend.config.on_redis_error == "raise":
                # Not lost and not run unguarded: again later, when Redis is back.
                self._reschedule(
                    plan.key, min(plan.lock_ttl, 5.0), f"Redis unavailable: {exc!r}"
                )
            self._redis_down(backend, "the execution lease", exc, plan.key, task_id)
            return None
        if outcome.status == leases.ACQUIRED:
            plan.has_claim = plan.has_claim or outcome.took_claim
            lease = leases.Lease(
                plan.key,
                names[0],
                member,
                outcome.token,
                plan.lock_ttl,
                asked_at,
                self.name,
            )
            logger.debug(
                "Lease on %s taken by %s[%s], fence %s",
                plan.key,
                self.name,
                task_id,
                outcome.token,
                extra=_extra(self.name, plan.key, task_id),
            )
            signals.lease_acquired.send(
                sender=self.name, key=plan.key, task_id=task_id, token=outcome.token
            )
            return lease
        if outcome.status == leases.DONE:
            # A copy of a task that already succeeded: ack it, run nothing.
            _log_duplicate(self.name, plan.key, task_id, task_id, "execution")
            if plan.has_claim:
                self._release_claim(backend, plan.key, task_id)
            raise Ignore()
        if outcome.status == leases.SAME_TASK:
            # Another delivery of this very task runs: it may die, and then this
            # copy is the only one left. Never drop it.
            self._reschedule(
                plan.key, _poll(plan, outcome), "another delivery of it runs"
            )
        return self._conflict(backend, plan, task_id, outcome)

    def _conflict(
        self, backend: Backend, plan: _Plan, task_id: str, outcome: leases.Outcome
    ) -> leases.Lease:
        """Another task id holds the key at execution: drop, raise or reschedule."""
        rule = plan.on_conflict
        if plan.lock == "until_and_while_executing" and rule == "skip":
            rule = "reschedule"  # the one queued behind the running one must run
        if outcome.status == leases.CLAIMED and rule == "reschedule":
            rule = "skip"  # the idempotency key holds for its whole window
        if rule == "reschedule":
            self._reschedule(
                plan.key, _poll(plan, outcome), f"task {outcome.holder} holds the key"
            )
        _log_duplicate(self.name, plan.key, task_id, outcome.holder, "execution")
        if plan.has_claim:
            self._release_claim(backend, plan.key, task_id)
        if rule == "raise":
            raise DuplicateTaskError(plan.key, outcome.holder, self.name)
        raise Ignore()

    def _reschedule(self, key: str, countdown: float, why: str) -> None:
        """Publish this message again after ``countdown`` s; end this delivery.

        Not a retry: it does not count against ``max_retries``. The countdown
        stays under the broker's visibility timeout, so that the waiting copy
        is not itself redelivered.
        """
        request = self.request
        countdown = min(max(countdown, 0.1), visibility_timeout(self.app) / 2)
        logger.info(
            "Rescheduled %s[%s] in %.1fs: %s",
            self.name,
            request.id,
            countdown,
            why,
            extra=_extra(self.name, key, request.id),
        )
        try:
            self.signature_from_request(
                request, countdown=countdown, retries=request.retries
            ).apply_async()
        except Exception as exc:
            # The broker is unreachable too: hand the message back unacked if
            # it still can be (acks_late), else fail loudly. Never drop it.
            if self.acks_late:
                raise Reject(exc, requeue=True) from exc
            raise
        raise Ignore()

    def _release(
        self,
        backend: Backend,
        plan: _Plan,
        lease: leases.Lease,
        task_id: str,
        ended: str,
    ) -> None:
        """Give the lease back; free the claim and remember success as ``ended``
        ("success", "retry" or "failure") and the lock mode say."""
        free_claim = plan.has_claim and (
            plan.lock in _RELEASE_AT_END
            or (plan.lock == "until_expired" and ended == "failure")
        )
        if ended == "retry":
            free_claim = False
        names = (
            lease.redis_key,
            backend.key(plan.key, "claim"),
            backend.key(plan.key, f"done:{task_id}"),
        )
        done_ttl = backend.config.done_ttl if ended == "success" else 0

        def release() -> object:
            return backend.leases.release(
                names, lease.member, task_id, free_claim, done_ttl
            )

        try:
            held = bool(release())
        except redis.RedisError:
            logger.warning(
                "Could not release the lease of %s[%s]; retrying in the background",
                self.name,
                task_id,
                exc_info=True,
                extra=_extra(self.name, plan.key, task_id),
            )
            # Until the claim would expire: nothing stays held once Redis is back.
            ttl = max(plan.lock_ttl, plan.ttl if free_claim else 0)
            backend.leases.later(release, time.monotonic() + ttl)
            return
        logger.debug(
            "Lease on %s released by %s[%s] (%s)",
            plan.key,
            self.name,
            task_id,
            ended,
            extra=_extra(self.name, plan.key, task_id),
        )
        signals.lease_released.send(
            sender=self.name, key=plan.key, task_id=task_id, held=held, outcome=ended
        )


class _Plan:
    """How one delivery runs: its key, whether it holds a claim, its options."""

    __slots__ = (
        "claim_here",
        "duplicate_of",
        "has_claim",
        "key",
        "lock",
        "lock_ttl",
        "max_running",
        "on_conflict",
        "ttl",
    )

    def __init__(self, key: str, has_claim: bool, opts: TaskOptions) -> None:
        self.key = key
        self.has_claim = has_claim
        self.claim_here = False
        self.duplicate_of: str | None = None
        self.lock = opts.lock
        self.on_conflict = opts.on_conflict
        self.lock_ttl = opts.lock_ttl
        self.max_running = opts.max_running
        self.ttl = opts.ttl


_METHODS: Final = frozenset(
    name for name in vars(DedupTask) if name.startswith("dedup_")
) - set(TASK_OPTIONS)


def stamp_of(request: Any) -> Mapping[str, Any] | None:
    """The dedup header of a task's request context, if it carries one."""
    stamp = getattr(request, HEADER, None)  # headers are attributes too
    if stamp is None:
        stamp = (getattr(request, "headers", None) or {}).get(HEADER)
    return stamp if isinstance(stamp, Mapping) else None


def _overrides(stamp: Mapping[str, Any]) -> dict[str, Any]:
    call = dict(stamp.get("options") or {})
    call["dedup_lock"] = stamp.get("lock")
    return call


def _extra(task_name: str, key: str | None, task_id: str | None) -> dict[str, Any]:
    """The ``extra`` fields of every log line about a decision."""
    return {"task_name": task_name, "dedup_key": key, "task_id": task_id}


def _log_duplicate(
    name: str, key: str, task_id: str | None, holder: str | None, stage: str
) -> None:
    logger.info(
        "Deduplicated %s at %s: key %s is held by task %s",
        name,
        stage,
        key,
        holder,
        extra={**_extra(name, key, task_id), "stage": stage},
    )
    signals.task_deduplicated.send(
        sender=name, key=key, task_id=task_id, existing_task_id=holder, stage=stage
    )


def _poll(plan: _Plan, outcome: leases.Outcome) -> float:
    """When to look again: when the holder's lease ends (it may have crashed),
    or sooner, every tenth of the lease TTL, as a live holder may end early."""
    return min(outcome.wait, max(0.5, plan.lock_ttl / 10))


def _call_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """Pop and check the ``dedup_*`` keywords of a call (a typo is an error)."""
    call = {}
    for name in [n for n in options if n.startswith("dedup_")]:
        value = options.pop(name)
        if name == "dedup_key" and isinstance(value, str):
            call[name] = value  # per call, a string is the key itself
        elif value is not None:
            call[name] = validate_task_option(name, value, f"{where}: ")
    return call


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
