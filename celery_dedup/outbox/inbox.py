"""``Inbox``: the consumer's half of exactly-once, an event id processed once.

The relay publishes at least once, so a consumer may receive an event twice
(a relay died between publishing and marking, a broker redelivered). The
consumer records each event id in its own database, in the same transaction
as the work the event causes; a second delivery finds the id and skips::

    with Session(engine) as session, session.begin():
        if inbox.first_time(session, message.properties["message_id"]):
            apply(session, body)
    message.ack()
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import MetaData, Table, delete
from sqlalchemy.engine import Engine

from ..exceptions import ConfigurationError
from . import dialects
from .binding import TableOwner, check_name, check_table_name, transaction_connection
from .table import inbox_table, utcnow

if TYPE_CHECKING:
    from .binding import Executor


class Inbox(TableOwner):
    """Event ids a consumer has processed, in the consumer's own database.

    ``consumer`` names the consumer, so several can share one table and each
    process every event once. ``engine_or_url`` is only needed for
    :meth:`create_all`.
    """

    def __init__(
        self,
        engine_or_url: Engine | str | None = None,
        *,
        table_name: str = "celery_dedup_inbox",
        consumer: str = "default",
        metadata: MetaData | None = None,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        check_table_name(table_name)
        self.consumer = check_name("consumer", consumer)
        super().__init__(engine_or_url, metadata, engine_options)
        self.table: Table = inbox_table(self.metadata, table_name)
        self.tables = (self.table,)

    def first_time(self, session_or_connection: Executor, event_id: str) -> bool:
        """Record ``event_id``; True the first time, False if already recorded.

        Runs in the caller's transaction and never commits: if the caller's
        work rolls back, so does the record, and the event is processed again
        on its next delivery. A concurrent delivery of the same id waits for
        the first transaction and then gets False.
        """
        check_name("event_id", event_id)
        conn = transaction_connection(session_or_connection, self.table)
        values = {
            "consumer": self.consumer,
            "event_id": event_id,
            "processed_at": utcnow(),
        }
        return dialects.insert_if_absent(
            conn, self.table, values, ["consumer", "event_id"]
        )

    def prune(self, session_or_connection: Executor, older_than: float) -> int:
        """Forget ids processed more than ``older_than`` seconds ago.

        Only safe past the longest time a duplicate can still arrive (the
        outbox relay's claim timeout plus its retries, broker redeliveries).
        """
        if isinstance(older_than, bool) or not isinstance(older_than, int | float):
            raise ConfigurationError(
                "older_than", f"expected seconds, got {older_than!r}"
            )
        cutoff = utcnow() - datetime.timedelta(seconds=older_than)
        conn = transaction_connection(session_or_connection, self.table)
        c = self.table.c
        stmt = delete(self.table).where(
            c.consumer == self.consumer, c.processed_at < cutoff
        )
        return int(conn.execute(stmt).rowcount)
