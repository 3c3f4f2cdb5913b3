"""S9: a paused worker outlives its lease while another runs the same key.

A process stopped (GC pause, swap, SIGSTOP) past its lease wakes up believing
it still holds the key. Its outbox write must be rejected, with its business
write, so that the event exists exactly once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from celery_dedup import LockLostError
from celery_dedup.outbox import Outbox
from tests.apps.scenario_app import winners_table
from tests.integration import outbox_fixtures
from tests.integration.outbox_fixtures import unique_table
from tests.rig import Recorder, RedisServer, Worker, wait_for

pytestmark = [pytest.mark.scenario, pytest.mark.outbox]
postgres_url = outbox_fixtures.postgres_url


@pytest.fixture
def outbox_conf(
    scenario_app: Any, redis_server: RedisServer, postgres_url: str
) -> Iterator[dict[str, str]]:
    """A fresh outbox (and winners table) on PostgreSQL for the app and workers,
    through psycopg2, then through psycopg 3."""
    table = unique_table()
    outbox = Outbox(postgres_url, table_name=table)
    winners_table(outbox.metadata, table)
    outbox.metadata.create_all(outbox.engine)
    conf = {"dedup_outbox_url": postgres_url, "dedup_outbox_table": table}
    scenario_app.configure(redis_server.url(), **conf)
    yield conf
    outbox.metadata.drop_all(outbox.engine)
    outbox.close()
    scenario_app.configure(redis_server.url())


def counts(conf: dict[str, str]) -> tuple[int, int]:
    """(outbox rows, winners rows) in the test's tables."""
    engine = sa.create_engine(conf["dedup_outbox_url"])
    table = conf["dedup_outbox_table"]
    with engine.connect() as conn:
        events = conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
        rows = conn.execute(
            sa.text(f"SELECT count(*) FROM {table}_winners")
        ).scalar_one()
    engine.dispose()
    return int(events), int(rows)


def test_the_zombie_cannot_commit(
    scenario_app: Any,
    outbox_conf: dict[str, str],
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
    tmp_path: Path,
) -> None:
    # One worker for the zombie, and one on a queue of its own for the second
    # execution, which must not wait behind the stopped process.
    other_queue = f"{queue}-second"
    workers(concurrency=1, conf=outbox_conf)
    workers(concurrency=1, conf=outbox_conf, queue_name=other_queue)
    task = scenario_app.find_winners
    options = {"dedup_lock": "while_executing", "dedup_lock_ttl": 2}
    # Given a body that is paused before it writes, past its 2 s lease
    zombie = task.apply_async((9, 1.0), queue=queue, **options)
    first = wait_for(lambda: recorder.started("find_winners"), 20, "the first body")
    pid = first[0]["pid"]  # type: ignore[index]
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(3)
        # When another execution of the key runs and commits meanwhile
        second = task.apply_async((9, 0.1), queue=other_queue, **options)
        assert second.get(timeout=30) is True
        assert counts(outbox_conf) == (1, 1)
    finally:
        # and then the paused one wakes up and writes
        os.kill(pid, signal.SIGCONT)
    # Then its write is rejected: LockLostError, and its transaction rolled back
    with pytest.raises(LockLostError) as caught:
        zombie.get(timeout=30)
    assert caught.value.task_id == zombie.id
    assert counts(outbox_conf) == (1, 1)
    assert [r["task_id"] for r in recorder.runs("find_winners")] == [second.id]
