"""``Outbox``: the table, and ``add()``, which writes an event in your transaction."""

from __future__ import annotations

import json
import logging
import uuid
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from celery import current_task
from sqlalchemy import MetaData, Table, exc, func, select, update
from sqlalchemy.engine import Connection, Engine

from ..config import DedupConfig, get_config
from ..exceptions import ConfigurationError, LockLostError
from ..task import current_fence
from . import dialects
from .binding import (
    TableOwner,
    check_name,
    check_no_nul,
    check_table_name,
    transaction_connection,
)
from .encoding import encode_json, encoded
from .table import MAX_NAME, PARKED, PENDING, fence_table, outbox_table
from .table import utcnow as _utcnow

if TYPE_CHECKING:
    from celery import Celery

    from .binding import Executor

logger = logging.getLogger(__name__)

#: The namespace of event ids: uuid5 of the (event type, aggregate id) pair.
EVENT_NAMESPACE: Final = uuid.UUID("5f0b8f0e-3c1d-5d8a-9c52-7e1f0f2b6a11")
MAX_TOKEN: Final = 2**63 - 1  # BIGINT

_DEFAULT: Final[Any] = object()  # "the fence of the running DedupTask, if any"
_by_app: weakref.WeakKeyDictionary[Celery, Outbox] = weakref.WeakKeyDictionary()


def event_id(event_type: str, aggregate_id: str) -> str:
    """The id of an event: stable, so a re-added event keeps its message id."""
    return str(uuid.uuid5(EVENT_NAMESPACE, json.dumps([event_type, aggregate_id])))


class Outbox(TableOwner):
    """Events written in the caller's transaction, published later by a relay.

    ``engine_or_url`` is the database the relay and :meth:`create_all` use
    (an :class:`~sqlalchemy.engine.Engine`, a URL, or None when this process
    only calls :meth:`add`). The tables go into ``metadata`` (a new
    :class:`~sqlalchemy.MetaData` by default), so they can join your Alembic
    ``target_metadata``. ``max_payload`` is the largest payload :meth:`add`
    accepts, in bytes of JSON (:meth:`from_app` takes
    ``dedup_outbox_max_payload``).
    """

    def __init__(
        self,
        engine_or_url: Engine | str | None = None,
        *,
        table_name: str = "celery_dedup_outbox",
        metadata: MetaData | None = None,
        engine_options: Mapping[str, Any] | None = None,
        max_payload: int = DedupConfig.outbox_max_payload,
    ) -> None:
        check_table_name(table_name)
        if (
            isinstance(max_payload, bool)
            or not isinstance(max_payload, int)
            or max_payload < 1
        ):
            raise ConfigurationError(
                "max_payload", f"expected a number of bytes >= 1, got {max_payload!r}"
            )
        self.max_payload = max_payload
        self._max_payload_name = "max_payload"  # what add() calls the limit
        super().__init__(engine_or_url, metadata, engine_options)
        self.table: Table = outbox_table(self.metadata, table_name)
        self.fence_table: Table = fence_table(self.metadata, f"{table_name}_fence")
        self.tables = (self.table, self.fence_table)

    @classmethod
    def from_app(cls, app: Celery) -> Outbox:
        """The app's outbox, from ``dedup_outbox_url`` and ``dedup_outbox_table``.

        Built once per app; later calls return the same instance.
        """
        try:
            return _by_app[app]
        except KeyError:
            pass
        config = get_config(app)
        if not config.outbox_url:
            raise ConfigurationError(
                "dedup_outbox_url", "set it to the database URL of the outbox"
            )
        check_table_name(config.outbox_table, "dedup_outbox_table")
        try:
            outbox = cls(
                config.outbox_url,
                table_name=config.outbox_table,
                max_payload=config.outbox_max_payload,
            )
        except (exc.ArgumentError, ImportError) as error:
            # Not a URL, an unknown dialect, or its driver is not installed.
            # An old SQLAlchemy quotes the whole URL, password included.
            reason = str(error).replace(config.outbox_url, "<the URL>")
            raise ConfigurationError(
                "dedup_outbox_url", f"SQLAlchemy cannot open it: {reason}"
            ) from error
        outbox._max_payload_name = "dedup_outbox_max_payload"
        _by_app[app] = outbox
        return outbox

    @property
    def table_name(self) -> str:
        return self.table.name

    def event_id(self, event_type: str, aggregate_id: str) -> str:
        """The event id (and message id) of ``(event_type, aggregate_id)``."""
        return event_id(event_type, aggregate_id)

    def add(
        self,
        session_or_connection: Executor,
        event_type: str,
        *,
        aggregate_id: str,
        payload: Any = None,
        headers: Mapping[str, Any] | None = None,
        fence: Any = _DEFAULT,
    ) -> bool:
        """Write one event in the caller's transaction; never commits.

        Returns True if the row is new, False if ``(event_type, aggregate_id)``
        is already in the outbox (also when another transaction added it
        concurrently: no ``IntegrityError`` reaches you).

        ``fence`` is ``(dedup_key, token)``; by default the running DedupTask's
        fencing token, and None disables fencing. If a newer token of that key
        has already written, the caller's transaction is rolled back and
        :class:`~celery_dedup.LockLostError` raised.

        Every argument is checked before the database sees anything: a bad
        one raises :class:`~celery_dedup.ConfigurationError` naming it (and,
        in the payload, where the value JSON cannot hold is).
        """
        check_name("event_type", event_type)
        check_name("aggregate_id", aggregate_id)
        if headers is not None and not isinstance(headers, Mapping):
            raise ConfigurationError("headers", f"expected a mapping, got {headers!r}")
        # Encoded once: the text checked here is the text stored.
        body = encode_json("payload", payload)
        if len(body) > self.max_payload:  # ASCII: json.dumps escapes the rest
            raise ConfigurationError(
                "payload",
                f"{len(body)} bytes of JSON, more than {self._max_payload_name} "
                f"({self.max_payload} bytes); store the data elsewhere and put a "
                "reference to it in the event",
            )
        extra = encode_json("headers", None if headers is None else dict(headers))
        fence = current_fence() if fence is _DEFAULT else _check_fence(fence)
        conn = transaction_connection(session_or_connection, self.table)
        task_id = _current_task_id()
        if fence is not None:
            self._advance_fence(session_or_connection, conn, fence, task_id)
        now = _utcnow()
        values = {
            "event_id": event_id(event_type, aggregate_id),
            "event_type": event_type,
            "aggregate_id": aggregate_id,
            "payload": encoded(body),
            "headers": encoded(extra),
            "fence_key": fence[0] if fence else None,
            "fence_token": fence[1] if fence else None,
            "task_id": task_id,
            "created_at": now,
            "state": PENDING,
            "attempts": 0,
            "next_attempt_at": now,
        }
        created = dialects.insert_if_absent(
            conn, self.table, values, ["event_type", "aggregate_id"]
        )
        if not created:
            logger.debug(
                "Outbox event %s/%s already exists",
                event_type,
                aggregate_id,
                extra={"event_type": event_type, "aggregate_id": aggregate_id},
            )
        return created

    def count_state(self, state: str) -> int:
        """How many events are in ``state`` (pending, published or parked)."""
        c = self.table.c
        stmt = select(func.count()).select_from(self.table).where(c.state == state)
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def requeue_parked(
        self, session_or_connection: Executor, event_ids: list[str] | None = None
    ) -> int:
        """Give parked rows (all, or those of ``event_ids``) a fresh set of attempts.

        Runs in the caller's transaction; returns how many rows it requeued.
        """
        c = self.table.c
        stmt = update(self.table).where(c.state == PARKED)
        if event_ids is not None:
            stmt = stmt.where(c.event_id.in_(event_ids))
        stmt = stmt.values(
            state=PENDING, attempts=0, next_attempt_at=_utcnow(), claim_token=None
        )
        conn = transaction_connection(session_or_connection, self.table)
        return int(conn.execute(stmt).rowcount)

    def _advance_fence(
        self,
        executor: Executor,
        conn: Connection,
        fence: tuple[str, int],
        task_id: str | None,
    ) -> None:
        key, token = fence
        if dialects.advance_fence(conn, self.fence_table, key, token):
            return
        c = self.fence_table.c
        newer = conn.execute(select(c.token).where(c.dedup_key == key)).scalar()
        reason = f"fencing token {token} is older than {newer}, which already wrote"
        logger.warning(
            "Outbox write rejected: %s (task %s, key %s); rolling back",
            reason,
            task_id,
            key,
            extra={"dedup_key": key, "task_id": task_id, "fence_token": token},
        )
        # The zombie's transaction must not commit, even if it catches this.
        if isinstance(executor, Connection):
            transaction = executor.get_transaction()
            if transaction is not None:
                transaction.rollback()
        else:
            executor.rollback()
        raise LockLostError(key, task_id, reason)


def _check_fence(fence: Any) -> tuple[str, int] | None:
    if fence is None:
        return None
    if (
        not isinstance(fence, tuple)
        or len(fence) != 2
        or not isinstance(fence[0], str)
        or not fence[0]
        or len(fence[0]) > MAX_NAME
        or isinstance(fence[1], bool)
        or not isinstance(fence[1], int)
        or not 0 <= fence[1] <= MAX_TOKEN
    ):
        raise ConfigurationError(
            "fence",
            "expected None or (dedup_key, token) with 0 <= token < 2**63, "
            f"got {fence!r}",
        )
    check_no_nul("fence", fence[0])
    return fence[0], fence[1]


def _current_task_id() -> str | None:
    # current_task is a proxy: getattr falls back when no task is running.
    task_id = getattr(getattr(current_task, "request", None), "id", None)
    return str(task_id) if task_id is not None else None
