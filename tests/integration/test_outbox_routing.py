"""Event types named with dots route by topic pattern (docs/outbox.md,
"Naming event types"), through the relay and a real Redis broker."""

from __future__ import annotations

import uuid
from pathlib import Path

import kombu
import pytest

from celery_dedup.outbox import Outbox, Relay
from tests.integration import outbox_fixtures

pytestmark = [pytest.mark.integration, pytest.mark.outbox]
broker_url = outbox_fixtures.broker_url


def test_dotted_event_types_reach_the_queues_their_patterns_bind(
    tmp_path: Path, broker_url: str
) -> None:
    outbox = Outbox(f"sqlite:///{tmp_path / 'app.db'}")
    outbox.create_all()
    exchange = f"proj.events.{uuid.uuid4().hex[:8]}"
    # The bindings of the docs' example: by entity, and by what happened
    events = kombu.Exchange(exchange, type="topic", durable=True)
    with kombu.Connection(broker_url) as connection:
        channel = connection.default_channel
        campaigns = kombu.Queue("billing.campaigns", events, routing_key="campaign.*")
        closings = kombu.Queue("audit.closings", events, routing_key="*.closed")
        everything = kombu.Queue("archive.all", events, routing_key="#")
        bound = [q(channel) for q in (campaigns, closings, everything)]
        for queue in bound:
            queue.declare()
        with outbox.engine.begin() as conn:
            outbox.add(conn, "campaign.closed", aggregate_id="campaign:75")
            outbox.add(conn, "campaign.opened", aggregate_id="campaign:76")
            outbox.add(conn, "order.closed", aggregate_id="order:9")
        relay = Relay(outbox, broker_url, exchange=exchange)
        try:
            assert relay.run_once().published == 3
        finally:
            relay.close()

        def types(queue: kombu.Queue) -> list[str]:
            found = []
            while (message := queue.get(no_ack=True)) is not None:
                found.append(message.headers["event_type"])
            return sorted(found)

        got = [types(queue) for queue in bound]
    outbox.close()
    # (kombu 5.3's emulation of topic exchanges on Redis lets "*" match several
    # words; AMQP and newer kombu, one: the types here have two words)
    assert got == [
        ["campaign.closed", "campaign.opened"],
        ["campaign.closed", "order.closed"],
        ["campaign.closed", "campaign.opened", "order.closed"],
    ]
