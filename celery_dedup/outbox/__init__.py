"""The transactional outbox: events written with your data, published once.

``Outbox`` (the table and ``add()``), ``Relay`` (publishes rows through kombu)
and ``Inbox`` (the consumer's dedup) need SQLAlchemy, the ``outbox`` extra;
they are imported on first use, so the in-worker relay hook in
:mod:`celery_dedup.outbox.worker` can be connected without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .inbox import Inbox
    from .relay import Relay, RelayCounts
    from .writer import Outbox, event_id

__all__ = ["Inbox", "Outbox", "Relay", "RelayCounts", "event_id"]

_HOMES = {
    "Inbox": ".inbox",
    "Outbox": ".writer",
    "Relay": ".relay",
    "RelayCounts": ".relay",
    "event_id": ".writer",
}


def __getattr__(name: str) -> Any:
    try:
        home = _HOMES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
