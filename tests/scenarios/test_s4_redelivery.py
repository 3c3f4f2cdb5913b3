"""S4: a long task redelivered by the broker while it still runs.

The Redis broker hands an unacknowledged message to a worker again once its
visibility timeout (here 3 s) runs out, even though the first delivery is
still in its 8 s body (``task_acks_late``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import kombu
import pytest

from tests.rig import Recorder, Worker, max_overlap, wait_for

pytestmark = pytest.mark.scenario

REDELIVERING_BROKER = {
    "task_acks_late": True,
    "broker_transport_options": {
        "visibility_timeout": 3,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
}


def restore_unacked(url: str) -> None:
    """One pass of the Redis transport's restore of timed-out unacked messages."""
    options = REDELIVERING_BROKER["broker_transport_options"]
    with kombu.Connection(url, transport_options=options) as connection:
        connection.default_channel.qos.restore_visible(num=100, interval=1)


def test_a_redelivered_task_runs_once(
    scenario_app: Any,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    # Given two workers on a broker that redelivers after 3 s
    workers(concurrency=2, conf=REDELIVERING_BROKER)
    workers(concurrency=2, conf=REDELIVERING_BROKER)
    # When an 8 s task is sent once
    result = scenario_app.close_campaign.apply_async((4, 8.0), queue=queue)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the body")
    # (kombu 5.7's workers restore as often as told; older ones scan about every
    # 100 s, so this test also runs a restore pass itself, as any consumer would)
    for _ in range(2):
        time.sleep(3.5)
        restore_unacked(scenario_app.app.conf.broker_url)
    assert result.get(timeout=60) == 4
    time.sleep(3)  # copies still on their way are dropped too
    # Then the broker did deliver it more than once
    deliveries = recorder.delivered("close_campaign")
    assert len(deliveries) >= 2
    assert set(deliveries) == {result.id}
    # and its body ran exactly once
    assert len(recorder.started("close_campaign")) == 1
    runs = recorder.runs("close_campaign")
    assert len(runs) == 1
    assert max_overlap(runs) == 1
