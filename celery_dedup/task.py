"""``DedupTask``: publish once per dedup key, run under a fenced lease.

A thin adapter: :mod:`celery_dedup.model` decides, :mod:`celery_dedup.store`
talks to Redis, :mod:`celery_dedup.execution` runs the body side.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import celery
import redis
from celery import Task, current_task
from celery.app.task import Context
from celery.canvas import Signature
from celery.result import AsyncResult
from celery.utils import uuid

from . import execution, model, notify
from .config import (
    TASK_OPTIONS,
    TaskOptions,
    get_config,
    resolve,
    validate_task_option,
)
from .connection import display_url, get_backend
from .exceptions import (
    BackendUnavailableError,
    ConfigurationError,
    DuplicateTaskError,
)
from .execution import HEADER, overrides, stamp_of
from .keys import check_key_names, make_key, task_signature
from .store import Claim
from .timing import claim_ttl
from .wiring import connect

if TYPE_CHECKING:
    _TaskBase = Task[Any, Any]
else:
    _TaskBase = Task


class DedupResult(AsyncResult):  # type: ignore[type-arg]
    """An ``AsyncResult`` that says whether the call was deduplicated."""

    #: True when the call published nothing and this is the existing task.
    deduplicated: bool = False
    #: The call's dedup key (None when the call did not deduplicate).
    dedup_key: str | None = None

    def revoke(self, *args: Any, **kwargs: Any) -> None:
        """Revoke the task, and free its key at once if it holds the claim
        (whatever its eta: Celery's workers learn of a revoke, but report it
        only when the task would have run)."""
        key = self.dedup_key
        if key is not None:
            backend = get_backend(self.app)
            try:
                backend.store.release_claim(key, self.id)
            except redis.RedisError:
                notify.logger.warning(
                    "Could not free the claim of revoked %s; workers free it",
                    self.id,
                    exc_info=True,
                    extra=notify.extra(getattr(self, "task_name", None), key, self.id),
                )
        super().revoke(*args, **kwargs)


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

    #: The worker-side request class: frees what a dead child or a revoke held.
    Request = "celery_dedup.request:DedupRequest"

    @classmethod
    def on_bound(cls, app: Any) -> None:
        """Check the task's dedup options, annotations included, once bound;
        connect celery-dedup's worker receivers (once per process)."""
        super().on_bound(app)
        spec = cls.dedup_attributes().get("dedup_key")
        # run as an instance has it: a method has ``self`` bound.
        run: Any = cls.run
        if not isinstance(inspect.getattr_static(cls, "run"), staticmethod):
            run = functools.partial(run, None)
        check_key_names(cls.name, task_signature(run), spec)
        connect()

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

    def dedup_opted_in(self) -> bool:
        """Whether this task deduplicates at all.

        Never with ``dedup_enabled = False``. With ``base=DedupTask`` it does.
        As the app-wide default (``task_cls="celery_dedup:DedupTask"``) only a
        task that opts in does: one with a ``dedup_*`` option (attribute or
        annotation) or a ``dedup_tasks`` entry; the others behave as plain
        Celery tasks.
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

    def dedup_applies(self, request: Any) -> bool:
        """Whether a delivery with this request context runs under dedup: the
        task opted in, or its message was stamped at publish; never when
        ``dedup_enabled`` is False."""
        if not get_config(self.app).enabled:
            return False
        return self.dedup_opted_in() or stamp_of(request) is not None

    def dedup_options(self, call: Mapping[str, Any] | None = None) -> TaskOptions:
        """The options in force for a call with ``call`` (checked
        ``dedup_*`` keywords) over this task's own, its entry and settings."""
        config = get_config(self.app)
        cached = self.__dict__.get("_dedup_defaults")
        if not call and cached is not None and cached[0] is config:
            return cached[1]  # type: ignore[no-any-return]
        attributes = self.__dict__.get("_dedup_attributes")
        if attributes is None:
            attributes = self.__dict__["_dedup_attributes"] = self.dedup_attributes()
        opts = resolve(config, self.name, attributes, call or {})
        if not call:
            self.__dict__["_dedup_defaults"] = (config, opts)
        return opts

    @functools.cached_property
    def dedup_signature(self) -> inspect.Signature | None:
        """The signature calls are bound to (None: keyed by raw arguments)."""
        return task_signature(self.run)

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
        return self._key(self.dedup_options(call), args, kwargs, strict=self.typing)

    def dedup_key_at_execution(
        self, opts: TaskOptions, args: Any, kwargs: Mapping[str, Any] | None
    ) -> str:
        """The key of a delivery whose publisher computed none. Arguments that
        do not fit the signature are keyed raw: the body raises its own
        ``TypeError``, still under the lease."""
        return self._key(opts, args, kwargs, strict=False)

    def _key(self, opts: TaskOptions, args: Any, kwargs: Any, *, strict: bool) -> str:
        return make_key(
            self.name, self.dedup_signature, opts.key, args, kwargs, strict=strict
        )

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
    ) -> DedupResult:
        """Publish unless another task holds this call's dedup key.

        Returns a :class:`DedupResult`: the new task's, or with
        ``dedup_on_conflict="skip"`` the existing task's, with
        ``deduplicated`` set. Raises :class:`DuplicateTaskError` with
        ``dedup_on_conflict="raise"``. A retry, a reschedule and a workflow
        member (chain, group, chord, ``link``) are always published.
        """
        call = _call_options(options, "apply_async")
        headers = dict(options.pop("headers", None) or {})

        def publish(task_id: str | None) -> DedupResult:
            result = super(DedupTask, self).apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow,
                headers=headers, **options,
            )  # fmt: skip
            if not isinstance(result, DedupResult):  # an EagerResult
                vars(result).update(deduplicated=False, dedup_key=None)
            return result  # type: ignore[return-value]

        opted_in = self.dedup_opted_in() or (
            bool(call) and get_config(self.app).enabled
        )
        if self.app.conf.task_always_eager or not opted_in:
            # Eager calls run in this process at once: nothing is queued twice.
            return publish(task_id)

        task_id = task_id or uuid()
        workflow = bool(link or link_error) or model.is_workflow_call(options)
        stamp, opts, republish = self._stamp(headers.get(HEADER), call, task_id)
        had_claim = bool(stamp.get("claim"))
        stamp.update(id=task_id, claim=False)
        stamp["workflow"] = workflow = workflow or bool(stamp.get("workflow"))
        headers[HEADER] = stamp
        if not model.wants_claim(opts.lock):
            return publish(task_id)  # keyed at execution, where it is used

        key = stamp["key"] = stamp.get("key") or self._key(
            opts, args, kwargs, strict=self.typing
        )
        ttl = claim_ttl(opts.ttl, {"expires": self.expires, **options})
        answer = self._claim(key, task_id, ttl)
        decision = model.on_claim(
            answer.status if isinstance(answer, Claim) else None,
            on_conflict=opts.on_conflict,
            on_redis_error=get_config(self.app).on_redis_error,
            republish=republish,
            workflow=workflow,
            had_claim=had_claim,
        )
        if not isinstance(answer, Claim):  # Redis failed
            if not (had_claim or decision.claim):
                self._undo_claim(key, task_id, ttl)
            if decision.raise_unavailable:
                raise BackendUnavailableError(
                    "the enqueue claim", answer, display_url(self.app)
                ) from answer
            # A republish (retry, reschedule) keeps what its stamp holds: the
            # caller logs its own decision, once.
            notify.logger.log(
                logging.DEBUG if republish else logging.WARNING,
                "Redis unavailable: %s[%s] published without its claim (%r)",
                self.name,
                task_id,
                answer,
                extra=notify.extra(self.name, key, task_id),
            )
        elif not decision.publish:
            notify.deduplicated(self.name, key, None, answer.holder, "enqueue")
            if decision.raise_duplicate:
                raise DuplicateTaskError(key, answer.holder, self.name)
            existing = self.AsyncResult(answer.holder)
            existing.deduplicated, existing.dedup_key = True, key
            return existing
        stamp["claim"] = decision.claim
        try:
            result = publish(task_id)
        except BaseException:
            if decision.claim:
                self._release_claim(key, task_id, opts)
            raise
        result.dedup_key = key
        return result

    def _stamp(
        self, stamp: Any, call: Mapping[str, Any], task_id: str
    ) -> tuple[dict[str, Any], TaskOptions, bool]:
        """The stamp a call publishes with, its options, and whether it
        republishes a task id (a retry, a reschedule, Celery republishing a
        task whose worker was lost, ``self.replace()`` by this task)."""
        if isinstance(stamp, Mapping) and (
            stamp.get("id") == task_id or task_id == self.request.id
        ):
            return dict(stamp), self.dedup_options(overrides(stamp)), True
        opts = self.dedup_options(call)
        fresh = {
            "key": None,
            "lock": opts.lock.value,
            "options": {n: v for n, v in call.items() if n != "dedup_key"},
        }
        return fresh, opts, task_id == self.request.id

    def _claim(self, key: str, task_id: str, ttl: float) -> Claim | redis.RedisError:
        try:
            return get_backend(self.app).store.claim(key, task_id, ttl)
        except redis.RedisError as exc:
            return exc

    def delay(self, *args: Any, **kwargs: Any) -> DedupResult:
        """``apply_async(args, kwargs)``, typed: the result says whether the
        call was deduplicated."""
        return self.apply_async(args, kwargs)

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> None:
        """``delay(*args, **kwargs)`` once Django's current transaction commits.

        As Celery's ``DjangoTask.delay_on_commit`` (which a ``DedupTask`` does
        not inherit), on every Celery version: it hands the call to
        ``django.db.transaction.on_commit``, so a rollback publishes nothing
        and takes no claim; outside ``atomic()`` it runs at once. Returns
        None: the result exists only after the commit. Needs Django.
        """
        _on_commit("delay_on_commit", functools.partial(self.delay, *args, **kwargs))

    def apply_async_on_commit(self, *args: Any, **kwargs: Any) -> None:
        """``apply_async(*args, **kwargs)`` once Django's current transaction
        commits: as :meth:`delay_on_commit`, with ``apply_async``'s arguments
        (``dedup_*`` call options included). Needs Django."""
        call = functools.partial(self.apply_async, *args, **kwargs)
        _on_commit("apply_async_on_commit", call)

    def AsyncResult(self, task_id: str, **kwargs: Any) -> DedupResult:
        """Get the :class:`DedupResult` of ``task_id``."""
        return DedupResult(
            task_id, backend=self.backend, task_name=self.name, app=self.app, **kwargs
        )

    def _undo_claim(self, key: str, task_id: str, ttl: float) -> None:
        """Give back, in the background, the claim a failed request may have
        taken all the same: one that timed out (a paused or cut-off Redis)
        runs when Redis answers again, and would hold the key for ``ttl`` for
        a task that was not published, or was published holding no claim.

        See :func:`execution.undo_later`."""
        try:
            backend = get_backend(self.app)
        except redis.RedisError:
            return  # no client could be made: no request was sent
        execution.undo_later(
            backend, lambda: backend.store.release_claim(key, task_id), ttl
        )

    def _release_claim(self, key: str, task_id: str, opts: TaskOptions) -> None:
        """Free the claim of a publish that failed."""
        delivery = execution.Delivery(task_id, key, opts, True, False)
        execution.free(
            get_backend(self.app),
            delivery,
            "",
            model.Release(free_claim=True),
            self.name,
            retry_for=opts.ttl,
        )

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
        if request.id is None or request.is_eager or not self.dedup_applies(request):
            return super().__call__(*args, **kwargs)

        def body() -> Any:
            return super(DedupTask, self).__call__(*args, **kwargs)

        return execution.run(self, request, body)

    if celery.VERSION < (5, 5):

        def push_request(self, *args: Any, **kwargs: Any) -> None:
            """Push a request that keeps the current one's fields, as Celery
            5.5 and later do. Before 5.5, ``Task.__call__`` pushed a bare
            context, so that a body run through ``__call__`` (this class
            defines one) by an embedded worker (``celery.contrib.testing``) or
            by ``apply()`` saw no ``request.id``, no ``dedup_fence`` and no
            retries count, unlike a plain task's body."""
            self.request_stack.push(Context(*args, **{**vars(self.request), **kwargs}))

    def on_replace(self, sig: Any) -> Any:
        """``self.replace(sig)``: if ``sig`` is this task with the same key,
        the claim passes to it (it runs under this task id); else this key is
        freed as for a body that ended."""
        request = self.request
        key = getattr(request, "dedup_key", None)
        if key is not None and isinstance(sig, Signature) and sig.task == self.name:
            try:
                same = self.dedup_key_for(tuple(sig.args), dict(sig.kwargs)) == key
            except Exception:
                same = False
            vars(request)["dedup_handed_over"] = same
        return super().on_replace(sig)


_METHODS: Final = frozenset(
    name for name in vars(DedupTask) if name.startswith("dedup_")
) - set(TASK_OPTIONS)


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
    None outside a leased body, and for a key with ``dedup_max_running`` > 1,
    where tokens do not order writes.
    """
    task = current_task
    if task is None or not isinstance(task, DedupTask):
        return None
    fence = getattr(task.request, "dedup_fence", None)
    key = getattr(task.request, "dedup_key", None)
    if fence is None or key is None:
        return None
    return str(key), int(fence)


def _on_commit(method: str, call: Callable[[], object]) -> None:
    """Hand ``call`` to Django's ``transaction.on_commit``."""
    try:
        from django.db import transaction  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(
            f"DedupTask.{method} needs Django (pip install django)"
        ) from exc
    transaction.on_commit(call)
