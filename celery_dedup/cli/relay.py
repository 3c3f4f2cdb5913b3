"""``celery -A proj dedup relay``: publish the outbox from its own process."""

from __future__ import annotations

import signal
import threading
from typing import Any

import click
from celery.bin.base import CeleryCommand

from ._common import option

_GROUP = "Relay Options"


@click.command(cls=CeleryCommand)
@option(
    "--once",
    is_flag=True,
    group=_GROUP,
    help="Run one pass, print its counts and exit.",
)
@option(
    "--batch-size",
    type=int,
    default=200,
    show_default=True,
    group=_GROUP,
    help="Rows claimed per pass.",
)
@option(
    "--poll-interval",
    type=float,
    default=1.0,
    show_default=True,
    group=_GROUP,
    help="Seconds to sleep when there is nothing to publish.",
)
@option(
    "--max-attempts",
    type=int,
    default=10,
    show_default=True,
    group=_GROUP,
    help="Failed publishes before a row is parked.",
)
@option(
    "--claim-timeout",
    type=float,
    default=60.0,
    show_default=True,
    group=_GROUP,
    help="Seconds before another relay may take over a claimed row.",
)
@option(
    "--retention",
    type=float,
    default=7 * 86400.0,
    show_default=True,
    group=_GROUP,
    help="Seconds published rows are kept (0 keeps them forever).",
)
@click.pass_context
def relay(
    ctx: click.Context,
    /,
    once: bool,
    batch_size: int,
    poll_interval: float,
    max_attempts: int,
    claim_timeout: float,
    retention: float,
    **kwargs: Any,
) -> None:
    """Publish the outbox (dedup_outbox_url) to dedup_outbox_exchange."""
    from ..outbox.relay import Relay  # noqa: PLC0415 - the outbox extra

    app = ctx.obj.app
    worker = Relay.from_app(
        app,
        batch_size=batch_size,
        poll_interval=poll_interval,
        max_attempts=max_attempts,
        claim_timeout=claim_timeout,
        retention=retention or None,
    )
    try:
        if once:
            counts = worker.run_once()
            ctx.obj.echo(" ".join(f"{k}={v}" for k, v in vars(counts).items()))
            return
        stop = threading.Event()

        def request_stop(signum: int, frame: Any) -> None:
            ctx.obj.echo("relay: stopping after the current pass")
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        ctx.obj.echo(
            f"relay: publishing {worker.outbox.table_name} to "
            f"{worker.exchange.name} (Ctrl-C to stop)"
        )
        worker.run_forever(stop)
    finally:
        worker.close()
        worker.outbox.close()
