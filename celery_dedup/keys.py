"""Dedup keys: what makes two calls "the same job".

A key is a digest of the task name and the call's arguments, bound to the
task's signature with defaults applied, so ``f(1)`` and ``f(x=1)`` agree. The
arguments are serialised canonically (sorted JSON, a fixed set of extra types)
and hashed with BLAKE2b, never ``hash()``: the same call gives the same key in
every process, host and Python version.

A value of another type (an exception or an object, as a task with the
pickle serializer may take) is keyed by a digest of its pickle: equal pickles
are the same job. Where a pickle is not deterministic (an object holding a
set of strings, whose order changes with the hash seed) two equal calls may
get two keys and both run; two different calls never share one.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import inspect
import json
import pickle
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .exceptions import ConfigurationError

KeySpec = None | Sequence[str] | Callable[[tuple[Any, ...], dict[str, Any]], str] | str


def _canonical(value: Any) -> Any:
    """JSON stand-ins for the types Celery users pass that JSON lacks."""
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return {"$dt": value.isoformat()}
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return {"$" + type(value).__name__: str(value)}
    if isinstance(value, bytes | bytearray):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, set | frozenset):
        return {"$set": sorted(_dumps(v) for v in value)}
    try:
        pickled = pickle.dumps(value, protocol=4)
    except Exception as exc:
        raise TypeError(
            f"cannot serialise {type(value).__qualname__} for a dedup key, "
            f"nor pickle it ({exc})"
        ) from exc
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    return {"$pickle": [kind, hashlib.blake2b(pickled, digest_size=16).hexdigest()]}


def _dumps(value: Any) -> str:
    return json.dumps(
        value,
        default=_canonical,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def canonical(args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """Positional and keyword arguments as canonical text (see the module)."""
    return _serialise({"args": list(args), "kwargs": dict(kwargs)})


def digest(task_name: str, material: str) -> str:
    """The key for ``material`` (canonical text) of ``task_name``: 32 hex digits."""
    data = f"{task_name}\x00{material}".encode()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def bind_arguments(
    signature: inspect.Signature | None,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """Name every argument of a call, defaults applied.

    Without a usable signature (a task whose ``run`` takes ``*args, **kwargs``
    only, say) positional arguments are named by their index.
    """
    if signature is None:
        named = {f"${i}": v for i, v in enumerate(args)}
        named.update(kwargs)
        return named
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    named = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update({f"**{k}": v for k, v in value.items()})
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            named[f"*{name}"] = list(value)
        else:
            named[name] = value
    return named


def _serialise(arguments: Mapping[str, Any]) -> str:
    try:
        return _dumps(arguments)
    except (TypeError, ValueError):
        for name, value in arguments.items():
            try:
                _dumps(value)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(
                    f"argument {name.lstrip('*$')!r}",
                    f"{exc}; give the task a dedup_key (argument names or a "
                    "callable) that leaves it out",
                ) from exc
        raise  # pragma: no cover - every argument alone serialises


def make_key(
    task_name: str,
    signature: inspect.Signature | None,
    spec: KeySpec,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    *,
    strict: bool = True,
) -> str:
    """The dedup key of one call of ``task_name``, as ``spec`` defines it.

    Arguments that do not fit ``signature`` raise ``TypeError`` if ``strict``
    (as Celery checks a call), else they are keyed as given, positional ones
    by their index (a task with ``typing=False``; a delivery, whose body will
    raise the ``TypeError`` itself).
    """
    args = tuple(args or ())
    kwargs = dict(kwargs or {})
    if isinstance(spec, str):
        return digest(task_name, "=" + spec)
    if callable(spec):
        value = spec(args, kwargs)
        if not isinstance(value, str):
            raise ConfigurationError(
                "dedup_key", f"the callable returned {value!r}, expected a str"
            )
        return digest(task_name, "=" + value)
    try:
        named = bind_arguments(signature, args, kwargs)
    except TypeError as exc:
        if strict:
            raise TypeError(f"{task_name}: {exc}") from exc
        named = bind_arguments(None, args, kwargs)
    if spec is not None:
        try:
            named = {name: named[name] for name in spec}
        except KeyError as exc:
            raise ConfigurationError(
                "dedup_key",
                f"{task_name} has no argument {exc.args[0]!r}; "
                f"its arguments are {', '.join(named) or '(none)'}",
            ) from None
    return digest(task_name, _serialise(named))


def check_key_names(
    task_name: str, signature: inspect.Signature | None, spec: KeySpec
) -> None:
    """Raise ``ConfigurationError`` if ``spec`` (a sequence of argument
    names) names an argument ``signature`` cannot have, as make_key names
    them: a parameter, ``*args`` by its name, ``**name`` for a keyword that
    ``**kwargs`` takes. Without a signature every name may be given."""
    if signature is None or spec is None or isinstance(spec, str) or callable(spec):
        return
    params = signature.parameters.values()
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    names |= {f"*{p.name}" for p in params if p.kind is p.VAR_POSITIONAL}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    for name in spec:
        if name not in names and not (takes_any and name.startswith("**")):
            raise ConfigurationError(
                "dedup_key",
                f"{task_name} has no argument {name!r}; its arguments are "
                f"{', '.join(sorted(names)) or '(none)'}",
            )


def task_signature(run: Callable[..., Any]) -> inspect.Signature | None:
    """The signature calls are bound to, or None when it names nothing."""
    try:
        signature = inspect.signature(run)
    except (TypeError, ValueError):
        return None
    kinds = {p.kind for p in signature.parameters.values()}
    if kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
        return None
    return signature
