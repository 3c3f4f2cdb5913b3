"""S1 end to end: 30 duplicate enqueues, one event row, one message delivered.

Seed 000's damage was downstream: ``CAMPAIGN_CLOSING_FIND_QUEST_WINNERS`` was
published 30 times. Here the job writes a business row and the event in one
transaction; the relay then publishes the outbox to a consumer queue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from celery_dedup.outbox import Outbox, Relay
from tests.apps.scenario_app import winners_table
from tests.integration import outbox_fixtures
from tests.integration.outbox_fixtures import EventQueue, unique_table
from tests.rig import Recorder, RedisServer, Worker, max_overlap, wait_for
from tests.scenarios.test_s1_duplicate_burst import burst

pytestmark = [pytest.mark.scenario, pytest.mark.outbox]
postgres_url = outbox_fixtures.postgres_url

TASK = "tests.apps.scenario_app.find_winners"


@pytest.fixture
def outbox(
    scenario_app: Any, redis_server: RedisServer, postgres_url: str
) -> Iterator[Outbox]:
    """A fresh outbox on PostgreSQL, through psycopg2, then through psycopg 3."""
    table = unique_table()
    outbox = Outbox(postgres_url, table_name=table)
    winners_table(outbox.metadata, table)
    outbox.metadata.create_all(outbox.engine)
    scenario_app.configure(
        redis_server.url(), dedup_outbox_url=postgres_url, dedup_outbox_table=table
    )
    yield outbox
    outbox.metadata.drop_all(outbox.engine)
    outbox.close()
    scenario_app.configure(redis_server.url())


def test_thirty_enqueues_one_event_one_message(
    scenario_app: Any,
    redis_server: RedisServer,
    outbox: Outbox,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
    postgres_url: str,
) -> None:
    conf = {"dedup_outbox_url": postgres_url, "dedup_outbox_table": outbox.table_name}
    workers(concurrency=3, conf=conf)
    workers(concurrency=3, conf=conf)
    events = EventQueue(redis_server.url(), f"events.{queue}")
    try:
        # When 3 processes enqueue the job 30 times in 3 s
        calls = burst(redis_server, queue, {}, task=TASK, args=[75])
        published = {c["id"] for c in calls if not c["deduplicated"]}
        wait_for(
            lambda: len(recorder.runs("find_winners")) == len(published),
            30,
            "the published runs",
        )
        runs = recorder.runs("find_winners")
        assert max_overlap(runs) == 1
        # Then the outbox holds the event once, whatever ran
        with outbox.engine.connect() as conn:
            rows = conn.execute(sa.select(outbox.table)).all()
        assert len(rows) == 1
        assert sum(r["created"] for r in runs) == 1
        # and the relay delivers it once
        relay = Relay(outbox, redis_server.url(), exchange=events.exchange_name)
        try:
            assert relay.run_once().published == 1
            assert relay.run_once().published == 0
        finally:
            relay.close()
        (message,) = events.drain()
        assert message.properties["message_id"] == rows[0].event_id
        assert (
            message.delivery_info["routing_key"]
            == "CAMPAIGN_CLOSING_FIND_QUEST_WINNERS"
        )
    finally:
        events.close()
