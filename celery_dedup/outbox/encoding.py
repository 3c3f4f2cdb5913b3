"""Strict JSON for ``add()``: a payload is checked, encoded once, stored as is.

Consumers in any language decode the rows and messages, so ``add()`` never
picks a representation for a value JSON does not have (a datetime, a
Decimal, a set, bytes, NaN) and never lets ``json`` turn a non-string dict key
into a string: it refuses them, naming where they are. Dedup keys are another
matter (see :mod:`celery_dedup.keys`): they are only hashed, never decoded.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import uuid
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import JSON, type_coerce
from sqlalchemy.types import TypeDecorator

from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.sql.elements import ColumnElement

    _JSONDecorator = TypeDecorator[Any]
else:  # SQLAlchemy 1.4's types are not generic at runtime
    _JSONDecorator = TypeDecorator

# How to turn a value of a type JSON does not have into one it has.
_HINTS: Final = (
    ((datetime.datetime, datetime.date, datetime.time), ".isoformat()"),
    (datetime.timedelta, ".total_seconds()"),
    (decimal.Decimal, "str()"),
    ((set, frozenset), "sorted() or list()"),
    ((bytes, bytearray), ".decode() or base64"),
    (uuid.UUID, "str()"),
)


def encode_json(argument: str, value: Any) -> str:
    """``value`` as strict JSON text, or ConfigurationError naming the bad part.

    The text is what ``json.dumps`` always produced for these columns (so rows
    read the same before and after), with NaN and Infinity refused.
    """
    try:
        _check(value, [])
        return json.dumps(value, allow_nan=False)
    except _NotJSON as bad:
        where = argument + "".join(reversed(bad.path))
        raise ConfigurationError(where, bad.message) from None
    except RecursionError:
        raise ConfigurationError(argument, "nested too deeply for JSON") from None


def encoded(text: str) -> ColumnElement[Any]:
    """A bound value for a JSON column that ``text`` already encodes."""
    return type_coerce(text, _EncodedJSON())


class _NotJSON(Exception):
    """A value JSON cannot hold; ``path`` gathers where, innermost first."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []


def _check(value: Any, above: list[int]) -> None:
    """Walk ``value``; ``above`` holds the ids of the containers above it.

    The path of a bad value is built only once one is found, on the way out.
    """
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _NotJSON(f"{value!r} is not JSON; use None or a string instead")
        return
    if isinstance(value, dict | list | tuple):
        if id(value) in above:
            raise _NotJSON("contains itself (a circular reference)")
        above.append(id(value))
        if isinstance(value, dict):
            bad_keys = [key for key in value if not isinstance(key, str)]
            if bad_keys:
                raise _NotJSON(_bad_key(bad_keys[0]))
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            try:
                _check(item, above)
            except _NotJSON as bad:
                bad.path.append(f"[{key!r}]")
                raise
        above.pop()
        return
    hint = next((h for types, h in _HINTS if isinstance(value, types)), None)
    convert = f"convert it (e.g. {hint})" if hint else "convert it"
    raise _NotJSON(f"{type(value).__name__} is not JSON; {convert} before add()")


def _bad_key(key: Any) -> str:
    try:  # json spells 1 as "1", True as "true", None as "null"
        spelled = json.dumps(next(iter(json.loads(json.dumps({key: 0})))))
    except TypeError:
        return f"key {key!r} is not a string; make it one before add()"
    return (
        f"key {key!r} is not a string, and JSON would silently turn it into "
        f"{spelled}; make it a string before add()"
    )


class _EncodedJSON(_JSONDecorator):
    """A JSON column's type for a value that is already JSON text.

    It skips the column type's own encoding (``bind_processor`` returns None,
    which a TypeDecorator normally must not do) but keeps the rest of its
    dialect behaviour, such as the ``::JSON`` cast that lets PostgreSQL take
    the text as JSON.
    """

    impl = JSON
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> None:
        return None
