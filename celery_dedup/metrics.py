"""Prometheus metrics, from celery-dedup's signals (the ``prometheus`` extra).

Nothing imports this module but you: ``import celery_dedup`` never imports
``prometheus_client``. In each process whose metrics you export (workers,
the relay, publishers)::

    from celery_dedup import metrics
    metrics.register()                      # the default registry
    metrics.register(outbox=Outbox.from_app(app))  # and the outbox gauges

Counters: ``celery_dedup_deduplicated_total{task,stage}``,
``celery_dedup_leases_lost_total{task}``, ``celery_dedup_relay_published_total``,
``celery_dedup_relay_failed_total{parked}``. Gauges, read from the outbox
table when scraped: ``celery_dedup_outbox_pending``, ``celery_dedup_outbox_parked``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from . import signals

if TYPE_CHECKING:
    from .outbox import Outbox


@dataclasses.dataclass(frozen=True)
class Metrics:
    """The metrics of one registry, and the receivers that move them."""

    deduplicated: Counter
    leases_lost: Counter
    relay_published: Counter
    relay_failed: Counter
    outbox_pending: Gauge | None
    outbox_parked: Gauge | None

    def on_deduplicated(self, sender: Any = None, stage: str = "", **_: Any) -> None:
        self.deduplicated.labels(task=str(sender), stage=stage).inc()

    def on_lease_lost(self, sender: Any = None, **_: Any) -> None:
        self.leases_lost.labels(task=str(sender)).inc()

    def on_published(self, **_: Any) -> None:
        self.relay_published.inc()

    def on_failed(self, parked: bool = False, **_: Any) -> None:
        self.relay_failed.labels(parked=str(bool(parked)).lower()).inc()

    def disconnect(self) -> None:
        """Stop moving these metrics (they stay registered)."""
        signals.task_deduplicated.disconnect(self.on_deduplicated)
        signals.lease_lost.disconnect(self.on_lease_lost)
        signals.outbox_published.disconnect(self.on_published)
        signals.outbox_failed.disconnect(self.on_failed)


def register(
    registry: CollectorRegistry = REGISTRY, *, outbox: Outbox | None = None
) -> Metrics:
    """Create celery-dedup's metrics in ``registry`` and connect them.

    ``outbox`` adds the pending and parked gauges, counted in its table at
    each scrape (one small query each).
    """
    pending = parked = None
    if outbox is not None:
        pending = Gauge(
            "celery_dedup_outbox_pending",
            "Outbox events not yet published.",
            registry=registry,
        )
        pending.set_function(lambda: outbox.count_state("pending"))
        parked = Gauge(
            "celery_dedup_outbox_parked",
            "Outbox events parked after too many failed publishes.",
            registry=registry,
        )
        parked.set_function(lambda: outbox.count_state("parked"))
    found = Metrics(
        deduplicated=Counter(
            "celery_dedup_deduplicated",
            "Calls or deliveries not run because their key was held.",
            ["task", "stage"],
            registry=registry,
        ),
        leases_lost=Counter(
            "celery_dedup_leases_lost",
            "Executions that lost their lease.",
            ["task"],
            registry=registry,
        ),
        relay_published=Counter(
            "celery_dedup_relay_published",
            "Outbox events the relay published.",
            registry=registry,
        ),
        relay_failed=Counter(
            "celery_dedup_relay_failed",
            "Failed publishes of outbox events (parked: the last one).",
            ["parked"],
            registry=registry,
        ),
        outbox_pending=pending,
        outbox_parked=parked,
    )
    signals.task_deduplicated.connect(found.on_deduplicated, weak=False)
    signals.lease_lost.connect(found.on_lease_lost, weak=False)
    signals.outbox_published.connect(found.on_published, weak=False)
    signals.outbox_failed.connect(found.on_failed, weak=False)
    return found
