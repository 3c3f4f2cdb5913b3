"""Settings: every ``dedup_*`` key of ``app.conf``, read once and cached per app.

Precedence for a task option is decided in one place, :func:`resolve`:
call option > task attribute > ``dedup_tasks`` entry > celeryconfig setting >
default.
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from .exceptions import ConfigurationError
from .model import Lock, OnConflict, OnRedisError

if TYPE_CHECKING:
    from celery import Celery

LOCK_MODES: Final = tuple(Lock)
CONFLICT_RULES: Final = tuple(OnConflict)
REDIS_ERROR_RULES: Final = tuple(OnRedisError)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


#: The longest duration a setting may hold (s, about 31,700 years): Redis
#: keeps expiries in ms up to 2**63, and the scripts add Redis time in ms to
#: a lease TTL in Lua doubles, which are exact up to 2**53.
MAX_DURATION: Final = 10**12
#: The shortest (s): Redis expiries are whole milliseconds.
MIN_DURATION: Final = 0.001


def _duration(setting: str, value: Any) -> float:
    """A number of seconds Redis can hold as an expiry."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(
            setting, f"expected a number of seconds, got {value!r}"
        )
    if not MIN_DURATION <= value <= MAX_DURATION:  # NaN fails both
        raise ConfigurationError(
            setting,
            f"expected seconds from {MIN_DURATION:g} to {MAX_DURATION:g} "
            f"(Redis expiries are whole ms), got {value!r}",
        )
    return float(value)


def _choice(setting: str, value: Any, choices: Sequence[Any]) -> Any:
    """The member of ``choices`` (a StrEnum's) that ``value`` spells."""
    for choice in choices:
        if value == choice.value:
            return choice
    raise ConfigurationError(
        setting, f"expected one of {', '.join(choices)}; got {value!r}"
    )


def _bool(setting: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(setting, f"expected True or False, got {value!r}")
    return value


def _optional_str(setting: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(setting, f"expected a string, got {value!r}")
    return value


def _key_prefix(setting: str, value: Any) -> str:
    if not isinstance(value, str) or not value or set("{}") & set(value):
        raise ConfigurationError(
            setting, f"expected a non-empty string without braces, got {value!r}"
        )
    return value


#: The keys ``dedup_redis_options`` takes (as ``broker_transport_options``
#: does for a Sentinel broker), each with the type its value must have.
REDIS_OPTIONS: Final[dict[str, type]] = {"master_name": str, "sentinel_kwargs": Mapping}


def _redis_options(setting: str, value: Any) -> Mapping[str, Any]:
    # Unknown keys are refused rather than passed to the client: a misspelt
    # master_name would otherwise surface as a connection error much later.
    if not isinstance(value, Mapping):
        raise ConfigurationError(setting, f"expected a mapping, got {value!r}")
    unknown = sorted(str(k) for k in value if k not in REDIS_OPTIONS)
    if unknown:
        raise ConfigurationError(
            setting,
            f"unknown option(s) {', '.join(unknown)}; expected "
            + ", ".join(REDIS_OPTIONS),
        )
    for name, kind in REDIS_OPTIONS.items():
        if name in value and not isinstance(value[name], kind):
            raise ConfigurationError(
                f"{setting}[{name!r}]",
                f"expected a {kind.__name__}, got {value[name]!r}",
            )
    return dict(value)


def _exchange(setting: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(
            setting, f"expected a non-empty exchange name, got {value!r}"
        )
    return value


def _identifier(setting: str, value: Any) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise ConfigurationError(
            setting, f"expected an SQL identifier (letters, digits, _), got {value!r}"
        )
    return value


def _dedup_key(setting: str, value: Any) -> Any:
    """``None``, a sequence of argument names, or a callable ``(args, kwargs)``."""
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        raise ConfigurationError(
            setting,
            f"a bare string {value!r} is ambiguous: write ({value!r},) for an "
            "argument name or a callable for a computed key",
        )
    if isinstance(value, Sequence) and all(isinstance(n, str) for n in value):
        if not value:
            raise ConfigurationError(setting, "the list of argument names is empty")
        return tuple(value)
    raise ConfigurationError(
        setting,
        f"expected None, a sequence of argument names or a callable, got {value!r}",
    )


def _byte_count(setting: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            setting, f"expected a number of bytes (an integer >= 1), got {value!r}"
        )
    return value


def _replicas(setting: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(
            setting, f"expected a number of replicas (an integer >= 0), got {value!r}"
        )
    return value


def _max_running(setting: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(setting, f"expected an integer >= 1, got {value!r}")
    return value


# The options a task may set (as an attribute, a ``dedup_tasks`` entry or a call
# keyword), each with its validator.
TASK_OPTIONS: Final[dict[str, Callable[[str, Any], Any]]] = {
    "dedup_key": _dedup_key,
    "dedup_lock": lambda s, v: _choice(s, v, LOCK_MODES),
    "dedup_on_conflict": lambda s, v: _choice(s, v, CONFLICT_RULES),
    "dedup_ttl": _duration,
    "dedup_lock_ttl": _duration,
    "dedup_max_running": _max_running,
}


def validate_task_option(name: str, value: Any, where: str = "") -> Any:
    """Check one task option; ``where`` prefixes the name in the error."""
    label = f"{where}{name}"
    try:
        validator = TASK_OPTIONS[name]
    except KeyError:
        raise ConfigurationError(
            label,
            f"unknown option; expected one of {', '.join(sorted(TASK_OPTIONS))}",
        ) from None
    return validator(label, value)


def _tasks(setting: str, value: Any) -> Mapping[str, Mapping[str, Any]]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            setting, f"expected a mapping of task name to options, got {value!r}"
        )
    checked: dict[str, Mapping[str, Any]] = {}
    for name, options in value.items():
        where = f"{setting}[{name!r}]"
        if not isinstance(options, Mapping):
            raise ConfigurationError(where, f"expected a mapping, got {options!r}")
        checked[name] = {
            opt: validate_task_option(opt, v, f"{where}.") for opt, v in options.items()
        }
    return checked


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    """The ``dedup_*`` settings of one app, validated."""

    enabled: bool = True
    redis_url: str | None = None
    redis_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    key_prefix: str = "dedup"
    lock: Lock = Lock.UNTIL_EXECUTED
    on_conflict: OnConflict = OnConflict.SKIP
    ttl: float = 3600.0
    lock_ttl: float = 60.0
    done_ttl: float = 7200.0
    lease_replicas: int = 0
    lease_replicas_timeout: float = 1.0
    tasks: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    on_redis_error: OnRedisError = OnRedisError.RAISE
    outbox_url: str | None = None
    outbox_table: str = "celery_dedup_outbox"
    outbox_exchange: str = "celery_dedup.events"
    outbox_relay: bool = False
    outbox_max_payload: int = 4 * 1024 * 1024


_SETTINGS: Final[dict[str, Callable[[str, Any], Any]]] = {
    "dedup_enabled": _bool,
    "dedup_redis_url": _optional_str,
    "dedup_redis_options": _redis_options,
    "dedup_key_prefix": _key_prefix,
    "dedup_lock": TASK_OPTIONS["dedup_lock"],
    "dedup_on_conflict": TASK_OPTIONS["dedup_on_conflict"],
    "dedup_ttl": _duration,
    "dedup_lock_ttl": _duration,
    "dedup_done_ttl": _duration,
    "dedup_lease_replicas": _replicas,
    "dedup_lease_replicas_timeout": _duration,
    "dedup_tasks": _tasks,
    "dedup_on_redis_error": lambda s, v: _choice(s, v, REDIS_ERROR_RULES),
    "dedup_outbox_url": _optional_str,
    "dedup_outbox_table": _identifier,
    "dedup_outbox_exchange": _exchange,
    "dedup_outbox_relay": _bool,
    "dedup_outbox_max_payload": _byte_count,
}
SETTINGS: Final = tuple(_SETTINGS)

_cache: weakref.WeakKeyDictionary[Celery, DedupConfig] = weakref.WeakKeyDictionary()


def from_mapping(conf: Mapping[str, Any]) -> DedupConfig:
    """Validate the ``dedup_*`` keys of ``conf`` into a :class:`DedupConfig`."""
    values: dict[str, Any] = {}
    names = list(conf)  # first: Celery loads a lazy config (and its namespace)
    prefix = (getattr(conf, "prefix", None) or "").upper()
    for spelled in names:
        name = str(spelled)
        if prefix and name.upper().startswith(prefix):
            name = name[len(prefix) :]
        if name.isupper():  # DEDUP_TTL, as Django-style settings are spelled
            name = name.lower()
        if not name.lower().startswith("dedup_"):
            continue
        value = conf[spelled]
        if name not in _SETTINGS:
            raise ConfigurationError(
                spelled,
                "unknown celery-dedup setting; expected one of " + ", ".join(SETTINGS),
            )
        if value is None and name not in ("dedup_redis_url", "dedup_outbox_url"):
            continue  # None means "the default", as in Celery's own settings
        values[name.removeprefix("dedup_")] = _SETTINGS[name](name, value)
    return DedupConfig(**values)


def get_config(app: Celery) -> DedupConfig:
    """The app's settings, read from ``app.conf`` on first use and then cached."""
    try:
        return _cache[app]
    except KeyError:
        config = _cache[app] = from_mapping(app.conf)
        return config


def forget(app: Celery) -> None:
    """Forget the cached settings of ``app``, so the next use reads them anew."""
    _cache.pop(app, None)


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """The options in force for one call of one task."""

    key: Any
    lock: Lock
    on_conflict: OnConflict
    ttl: float
    lock_ttl: float
    max_running: int


def resolve(
    config: DedupConfig,
    task_name: str,
    attributes: Mapping[str, Any],
    call: Mapping[str, Any],
) -> TaskOptions:
    """Merge call options, task attributes, ``dedup_tasks`` and settings.

    ``attributes`` holds the task's class attributes that were set (not None);
    ``call`` the ``dedup_*`` keywords given to ``apply_async``, already checked.
    """
    per_task = config.tasks.get(task_name, {})

    def pick(name: str, default: Any) -> Any:
        for source in (call, attributes, per_task):
            if source.get(name) is not None:
                return source[name]
        return default

    return TaskOptions(
        key=pick("dedup_key", None),
        lock=pick("dedup_lock", config.lock),
        on_conflict=pick("dedup_on_conflict", config.on_conflict),
        ttl=pick("dedup_ttl", config.ttl),
        lock_ttl=pick("dedup_lock_ttl", config.lock_ttl),
        max_running=pick("dedup_max_running", 1),
    )


def visibility_timeout(app: Celery) -> float:
    """The broker's redelivery timeout (kombu's defaults: SQS 30 min, else 1 h)."""
    options = app.conf.broker_transport_options or {}
    default = 1800 if str(app.conf.broker_url or "").startswith("sqs") else 3600
    return float(options.get("visibility_timeout", default))
