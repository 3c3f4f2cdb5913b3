"""celery-dedup's own signals. Connect receivers as with Celery's signals::

    from celery_dedup import signals

    @signals.lease_lost.connect
    def alert(key, task_id, reason, **kwargs): ...

Receivers run in the process (and, for ``lease_lost``, the heartbeat thread)
where the event happens; an exception in a receiver is logged, not raised.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

#: A call or a delivered message was not run because its key is held.
#: Arguments: ``key``, ``task_id`` (the dropped one, None at enqueue),
#: ``existing_task_id``, ``stage``: "enqueue" (apply_async returned the holder),
#: "publish" (a message published past apply_async was marked a duplicate,
#: see :func:`celery_dedup.install`) or "execution" (a delivery was dropped).
task_deduplicated = Signal(
    name="task_deduplicated",
    providing_args=["key", "task_id", "existing_task_id", "stage"],
)

#: A body took its lease (sender: the task name). Arguments: ``key``,
#: ``task_id``, ``token`` (its fencing token).
lease_acquired = Signal(
    name="lease_acquired", providing_args=["key", "task_id", "token"]
)

#: An execution lost its lease: renewal failed until it expired, or found
#: another owner (sender: the task name). Arguments: ``key``, ``task_id``,
#: ``reason``.
lease_lost = Signal(name="lease_lost", providing_args=["key", "task_id", "reason"])

#: A body gave its lease back (sender: the task name). Arguments: ``key``,
#: ``task_id``, ``held`` (False if the lease had been lost meanwhile),
#: ``outcome`` ("success", "retry" or "failure").
lease_released = Signal(
    name="lease_released", providing_args=["key", "task_id", "held", "outcome"]
)

#: The relay published an outbox event (sender: the outbox table name).
#: Arguments: ``event_id``, ``event_type``, ``aggregate_id``.
outbox_published = Signal(
    name="outbox_published", providing_args=["event_id", "event_type", "aggregate_id"]
)

#: A publish of an outbox event failed; it is retried later, or, with
#: ``parked`` True, parked (sender: the outbox table name). Arguments:
#: ``event_id``, ``event_type``, ``aggregate_id``, ``attempts``, ``parked``,
#: ``error``.
outbox_failed = Signal(
    name="outbox_failed",
    providing_args=[
        "event_id",
        "event_type",
        "aggregate_id",
        "attempts",
        "parked",
        "error",
    ],
)

#: An outbox event was parked after too many failed publishes (sender: the
#: outbox table name). Arguments: ``event_id``, ``event_type``,
#: ``aggregate_id``, ``attempts``, ``error``.
outbox_parked = Signal(
    name="outbox_parked",
    providing_args=["event_id", "event_type", "aggregate_id", "attempts", "error"],
)
