"""``celery -A proj dedup ...``: the celery-dedup commands of the Celery CLI.

Registered through the ``celery.commands`` entry point; Celery hands each
command its loaded app as ``ctx.obj.app``.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import click
from celery.bin.base import CeleryCommand, CeleryOption, handle_preload_options


@click.group()
@click.pass_context
@handle_preload_options
def dedup(ctx: click.Context, /, **kwargs: Any) -> None:
    """celery-dedup: locks, leases and the outbox."""


@dedup.command(cls=CeleryCommand)
@click.option(
    "--once",
    is_flag=True,
    cls=CeleryOption,
    help_group="Relay Options",
    help="Run one pass, print its counts and exit.",
)
@click.option(
    "--batch-size",
    type=int,
    default=200,
    show_default=True,
    cls=CeleryOption,
    help_group="Relay Options",
    help="Rows claimed per pass.",
)
@click.option(
    "--poll-interval",
    type=float,
    default=1.0,
    show_default=True,
    cls=CeleryOption,
    help_group="Relay Options",
    help="Seconds to sleep when there is nothing to publish.",
)
@click.option(
    "--max-attempts",
    type=int,
    default=10,
    show_default=True,
    cls=CeleryOption,
    help_group="Relay Options",
    help="Failed publishes before a row is parked.",
)
@click.option(
    "--claim-timeout",
    type=float,
    default=60.0,
    show_default=True,
    cls=CeleryOption,
    help_group="Relay Options",
    help="Seconds before another relay may take over a claimed row.",
)
@click.option(
    "--retention",
    type=float,
    default=7 * 86400.0,
    show_default=True,
    cls=CeleryOption,
    help_group="Relay Options",
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
    from .outbox.relay import Relay  # noqa: PLC0415 - the outbox extra

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
