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

#: An execution lost its lease: renewal failed until it expired, or found
#: another owner. Arguments: ``key``, ``task_id``, ``reason``.
lease_lost = Signal(name="lease_lost", providing_args=["key", "task_id", "reason"])
