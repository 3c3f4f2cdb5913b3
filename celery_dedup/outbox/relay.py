"""``Relay``: publishes outbox rows through kombu, at least once, in order.

A pass claims a batch (see :mod:`.claims`), publishes it with no database
transaction open, then records the outcome in one short transaction, guarded
by the pass's claim token (a relay whose claim expired and was taken over
marks nothing). A publish that fails backs its row off exponentially and
parks it after ``max_attempts``; while the broker itself is unreachable,
rows are released untouched instead, so an outage parks nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import kombu
from kombu.exceptions import OperationalError as BrokerUnavailable
from sqlalchemy import delete, select, update
from sqlalchemy.engine import Connection, Engine

from .. import signals
from ..config import get_config
from ..exceptions import ConfigurationError
from . import dialects
from .claims import Claimed, claim
from .table import PARKED, PENDING, PUBLISHED, utcnow
from .writer import Outbox

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

#: Headers every message carries besides the event's own.
EVENT_HEADERS: Final = ("event_id", "event_type", "aggregate_id")
_PRUNE_EVERY: Final = 10.0  # seconds between retention sweeps in run_once
_PRUNE_ROUNDS: Final = 10  # transactions of 1,000 deletions per sweep
_MAX_ERROR: Final = 2000  # characters of last_error kept
_RETRY_POLICY: Final = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5}


@dataclasses.dataclass
class RelayCounts:
    """What one :meth:`Relay.run_once` pass did."""

    claimed: int = 0
    published: int = 0
    #: Publishes that failed and were scheduled for another attempt.
    failed: int = 0
    #: Rows parked by this pass (``max_attempts`` reached).
    parked: int = 0
    #: Rows taken over from a relay whose claim had expired.
    reclaimed: int = 0
    #: Published rows whose claim another relay took over before they were
    #: marked: they will be published again.
    lost: int = 0
    #: Published rows deleted by retention.
    deleted: int = 0
    #: The broker could not be reached: the batch was released untouched.
    broker_unreachable: bool = False
    #: Why, then: the error of the publish that found it unreachable.
    broker_error: str | None = None

    @property
    def idle(self) -> bool:
        """Nothing was claimed nor deleted: the pass found nothing to do."""
        return not (self.claimed or self.deleted)

    def __str__(self) -> str:
        """``claimed=2 published=2 ...``: the counts on one line."""
        fields = dataclasses.fields(self)
        return " ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields)


class Relay:
    """Publishes the rows of ``outbox`` to ``exchange`` on ``broker``.

    ``broker`` is a :class:`kombu.Connection` or a URL (then owned and closed
    by :meth:`close`). Arguments, all keyword-only and validated here:

    - ``batch_size``: rows claimed per pass.
    - ``max_attempts``: failed publishes before a row is parked.
    - ``backoff`` / ``max_backoff``: seconds before the first retry, doubled
      per attempt, capped.
    - ``claim_timeout``: seconds after which another relay may take over a
      claimed row (its relay died); must exceed the time a batch takes.
    - ``retention``: seconds a published row is kept, None to keep them all.
    - ``poll_interval``: seconds :meth:`run_forever` sleeps when idle.
    """

    def __init__(
        self,
        outbox: Outbox,
        broker: kombu.Connection | str,
        *,
        exchange: str = "celery_dedup.events",
        batch_size: int = 200,
        max_attempts: int = 10,
        backoff: float = 1.0,
        max_backoff: float = 300.0,
        claim_timeout: float = 60.0,
        retention: float | None = 7 * 86400.0,
        poll_interval: float = 1.0,
    ) -> None:
        if not isinstance(outbox, Outbox):
            raise ConfigurationError("outbox", f"expected an Outbox, got {outbox!r}")
        outbox.engine  # noqa: B018 - raises now if the outbox has no engine
        if not isinstance(exchange, str) or not exchange:
            raise ConfigurationError("exchange", f"expected a name, got {exchange!r}")
        self.outbox = outbox
        self.batch_size = _integer("batch_size", batch_size, 1, 10_000)
        self.max_attempts = _integer("max_attempts", max_attempts, 1, 1_000)
        self.backoff = _seconds("backoff", backoff)
        self.max_backoff = _seconds("max_backoff", max_backoff)
        if self.max_backoff < self.backoff:
            raise ConfigurationError("max_backoff", "must be at least backoff")
        self.claim_timeout = _seconds("claim_timeout", claim_timeout)
        self.retention = None if retention is None else _seconds("retention", retention)
        self.poll_interval = _seconds("poll_interval", poll_interval)
        self._owns_broker = isinstance(broker, str)
        self.connection = _broker_connection(broker)
        self.exchange = kombu.Exchange(exchange, type="topic", durable=True)
        self._producer: kombu.Producer | None = None
        self._next_prune = 0.0

    @classmethod
    def from_app(
        cls, app: Celery, outbox: Outbox | None = None, **options: Any
    ) -> Relay:
        """A relay for the app's outbox, broker and ``dedup_outbox_exchange``."""
        options.setdefault("exchange", get_config(app).outbox_exchange)
        connection = app.connection_for_write()
        if _is_amqp(connection):
            connection.release()
            connection = app.connection_for_write(
                transport_options={"confirm_publish": True}
            )
        relay = cls(outbox or Outbox.from_app(app), connection, **options)
        relay._owns_broker = True
        return relay

    def close(self) -> None:
        """Release the broker connection if this relay opened it."""
        if self._owns_broker:
            self.connection.release()

    # -- one pass ------------------------------------------------------------

    def run_once(self) -> RelayCounts:
        """Claim, publish and mark one batch; prune if a sweep is due."""
        counts = RelayCounts()
        token = str(uuid.uuid4())
        rows, counts.reclaimed = claim(
            self.outbox.engine,
            self.outbox.table,
            token=token,
            now=utcnow(),
            claim_timeout=self.claim_timeout,
            limit=self.batch_size,
        )
        counts.claimed = len(rows)
        if counts.reclaimed:
            logger.warning(
                "Took over %d outbox rows whose relay stopped before marking them",
                counts.reclaimed,
                extra={"outbox_table": self.outbox.table_name},
            )
        if rows:
            self._publish_batch(rows, token, counts)
        if self.retention is not None and time.monotonic() >= self._next_prune:
            counts.deleted = self.prune()
        # One line per pass that did something; an idle relay polling every
        # second stays quiet unless DEBUG is on.
        logger.log(
            logging.DEBUG if counts.idle else logging.INFO,
            "Outbox relay pass: %s",
            counts,
            extra={"outbox_table": self.outbox.table_name},
        )
        return counts

    def run_forever(
        self,
        stop_event: threading.Event,
        on_pass: Callable[[RelayCounts], object] | None = None,
    ) -> None:
        """Run passes until ``stop_event`` is set; errors are logged, not fatal.

        ``on_pass`` is called with the counts of every pass that completed;
        what it raises ends the loop.
        """
        failures = 0
        while not stop_event.is_set():
            try:
                counts = self.run_once()
            except Exception:
                failures += 1
                wait = min(self.poll_interval * 2**failures, 60.0)
                logger.exception(
                    "Outbox relay pass failed; next try in %.1f s",
                    wait,
                    extra={"outbox_table": self.outbox.table_name},
                )
            else:
                if on_pass is not None:
                    on_pass(counts)  # outside the try: its errors are not the pass's
                if counts.broker_unreachable:
                    failures += 1
                    wait = min(self.poll_interval * 2**failures, 60.0)
                else:
                    failures = 0
                    wait = 0.0 if counts.claimed else self.poll_interval
            stop_event.wait(wait)

    def prune(self) -> int:
        """Delete published rows older than the retention; returns how many.

        Deletes at most ``_PRUNE_ROUNDS`` x 1,000 rows, each thousand in its
        own short transaction; the next sweep takes the rest.
        """
        if self.retention is None:
            return 0
        self._next_prune = time.monotonic() + min(self.retention, _PRUNE_EVERY)
        cutoff = utcnow() - datetime.timedelta(seconds=self.retention)
        table = self.outbox.table
        deleted = 0
        for _ in range(_PRUNE_ROUNDS):
            with self.outbox.engine.begin() as conn:
                old = select(table.c.id).where(table.c.published_at < cutoff)
                ids = list(conn.execute(old.limit(1000)).scalars())
                if not ids:
                    break
                result = conn.execute(
                    delete(table).where(table.c.id.in_(ids), table.c.state == PUBLISHED)
                )
                deleted += int(result.rowcount)
        return deleted

    # -- publishing ----------------------------------------------------------

    def _publish_batch(
        self, rows: list[Claimed], token: str, counts: RelayCounts
    ) -> None:
        published: list[int] = []
        failures: list[tuple[Claimed, BaseException]] = []
        released: list[int] = []
        blocked: set[str] = set()  # aggregates with a failed row in this batch
        for index, row in enumerate(rows):
            if row.aggregate_id in blocked:
                released.append(row.id)
                continue
            try:
                self._publish(row)
            except Exception as exc:
                if not self._broker_reachable(exc):
                    logger.warning(
                        "Broker unreachable (%r); released %d outbox rows",
                        exc,
                        len(rows) - index,
                        extra={"outbox_table": self.outbox.table_name},
                    )
                    released.extend(r.id for r in rows[index:])
                    counts.broker_unreachable = True
                    counts.broker_error = str(exc) or repr(exc)
                    break
                failures.append((row, exc))
                blocked.add(row.aggregate_id)
            else:
                published.append(row.id)
                signals.outbox_published.send(
                    sender=self.outbox.table_name,
                    event_id=row.event_id,
                    event_type=row.event_type,
                    aggregate_id=row.aggregate_id,
                )
        self._finish(token, published, failures, released, counts)

    def _publish(self, row: Claimed) -> None:
        if self._producer is None:
            self._producer = kombu.Producer(self.connection)
        headers = dict(row.headers or {})
        headers.update(
            event_id=row.event_id,
            event_type=row.event_type,
            aggregate_id=row.aggregate_id,
        )
        self._producer.publish(
            row.payload,
            exchange=self.exchange,
            routing_key=row.event_type,
            serializer="json",
            message_id=row.event_id,
            headers=headers,
            delivery_mode=2,
            declare=[self.exchange],
            retry=True,
            retry_policy=_RETRY_POLICY,
        )

    def _broker_reachable(self, exc: BaseException) -> bool:
        """After a failed publish: is it the message (True) or the broker?"""
        errors: tuple[type[BaseException], ...] = (
            BrokerUnavailable,
            *self.connection.connection_errors,
        )
        if not isinstance(exc, errors):
            return True
        self._producer = None
        try:
            self.connection.ensure_connection(max_retries=1, timeout=5)
        except Exception:
            return False
        return True

    def _finish(
        self,
        token: str,
        published: list[int],
        failures: list[tuple[Claimed, BaseException]],
        released: list[int],
        counts: RelayCounts,
    ) -> None:
        """Record a batch's outcome, only on rows this pass still holds."""
        table = self.outbox.table
        c = table.c
        now = utcnow()
        mine = c.claim_token == token
        with _short_transaction(self.outbox.engine) as conn:
            if published:
                result = conn.execute(
                    update(table)
                    .where(c.id.in_(published), mine)
                    .values(state=PUBLISHED, published_at=now, claim_token=None)
                )
                counts.published = int(result.rowcount)
                counts.lost = len(published) - counts.published
            for row, exc in failures:
                attempts = row.attempts + 1
                parked = attempts >= self.max_attempts
                delay = min(self.max_backoff, self.backoff * 2 ** (attempts - 1))
                conn.execute(
                    update(table)
                    .where(c.id == row.id, mine)
                    .values(
                        attempts=attempts,
                        state=PARKED if parked else PENDING,
                        next_attempt_at=now + datetime.timedelta(seconds=delay),
                        last_error=repr(exc)[:_MAX_ERROR],
                        claim_token=None,
                    )
                )
                counts.parked += int(parked)
                counts.failed += int(not parked)
                _log_failure(row, attempts, parked, delay, exc)
                _signal_failure(table.name, row, attempts, parked, exc)
            if released:
                conn.execute(
                    update(table)
                    .where(c.id.in_(released), mine)
                    .values(claim_token=None)
                )
        if counts.lost:
            logger.warning(
                "%d published outbox rows were taken over by another relay before "
                "being marked; they will be published again (raise claim_timeout)",
                counts.lost,
                extra={"outbox_table": table.name},
            )


@contextlib.contextmanager
def _short_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction at READ COMMITTED where the database has it."""
    with engine.connect() as plain:
        conn = plain.execution_options(**dialects.read_committed(plain.dialect))
        with conn.begin():
            yield conn


def _signal_failure(
    sender: str, row: Claimed, attempts: int, parked: bool, exc: BaseException
) -> None:
    event = {
        "event_id": row.event_id,
        "event_type": row.event_type,
        "aggregate_id": row.aggregate_id,
        "attempts": attempts,
        "error": repr(exc)[:_MAX_ERROR],
    }
    signals.outbox_failed.send(sender=sender, parked=parked, **event)
    if parked:
        signals.outbox_parked.send(sender=sender, **event)


def _log_failure(
    row: Claimed, attempts: int, parked: bool, delay: float, exc: BaseException
) -> None:
    extra = {
        "event_id": row.event_id,
        "event_type": row.event_type,
        "aggregate_id": row.aggregate_id,
        "attempts": attempts,
    }
    if parked:
        logger.error(
            "Parked outbox event %s (%s/%s) after %d failed publishes: %r; later "
            "events of aggregate %s wait until it is requeued",
            row.event_id,
            row.event_type,
            row.aggregate_id,
            attempts,
            exc,
            row.aggregate_id,
            extra=extra,
        )
    else:
        logger.warning(
            "Publishing outbox event %s failed (attempt %d): %r; retry in %.1f s",
            row.event_id,
            attempts,
            exc,
            delay,
            extra=extra,
        )


def _broker_connection(broker: Any) -> kombu.Connection:
    if isinstance(broker, kombu.Connection):
        return broker
    if not isinstance(broker, str) or not broker:
        raise ConfigurationError(
            "broker", f"expected a kombu Connection or a URL, got {broker!r}"
        )
    connection = kombu.Connection(broker)
    if _is_amqp(connection):
        # Publisher confirms: publish() returns once the broker has the message.
        connection.release()
        connection = kombu.Connection(
            broker, transport_options={"confirm_publish": True}
        )
    return connection


def _is_amqp(connection: kombu.Connection) -> bool:
    return getattr(connection.transport, "driver_type", None) == "amqp"


def _integer(argument: str, value: Any, low: int, high: int) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not low <= value <= high
    ):
        raise ConfigurationError(
            argument, f"expected an integer from {low} to {high}, got {value!r}"
        )
    return value


def _seconds(argument: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigurationError(
            argument, f"expected a number of seconds > 0, got {value!r}"
        )
    return float(value)
