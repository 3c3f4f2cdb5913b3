"""S4: a long task redelivered by the broker while it still runs.

The Redis broker hands an unacknowledged message to a worker again once its
visibility timeout (here 3 s) runs out, even though the first delivery is
still in its 8 s body (``task_acks_late``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from kombu.transport import redis as kombu_redis

from tests.rig import Recorder, Worker, max_overlap

pytestmark = pytest.mark.scenario

# kombu 5.7 restores unacked messages as often as it is told; older ones scan
# on about every tenth idle poll, so the body must outlast ~10 s to see it.
FAST_RESTORE = hasattr(kombu_redis.Channel, "unacked_restore_interval")
BODY = 8.0 if FAST_RESTORE else 25.0

REDELIVERING_BROKER = {
    "task_acks_late": True,
    "broker_transport_options": {
        "visibility_timeout": 3,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
}


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
    result = scenario_app.close_campaign.apply_async((4, BODY), queue=queue)
    assert result.get(timeout=90) == 4
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
