"""``celery -A proj dedup ...``: the celery-dedup commands of the Celery CLI.

Registered through the ``celery.commands`` entry point; Celery hands each
command its loaded app as ``ctx.obj.app``.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

import click
from celery.bin.base import CeleryCommand, CeleryOption, handle_preload_options
from celery.exceptions import CeleryCommandException
from celery.platforms import EX_UNAVAILABLE
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from .exceptions import ConfigurationError
from .ownership import FleetReport, analyse

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

#: ``dedup check`` found a problem (EX_UNAVAILABLE, 69: no worker answered).
EX_PROBLEMS = 1


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


@dedup.command(cls=CeleryCommand)
@click.option(
    "-t",
    "--timeout",
    type=float,
    default=2.0,
    show_default=True,
    cls=CeleryOption,
    help_group="Check Options",
    help="Seconds to wait for the workers' replies (asked twice).",
)
@click.option(
    "-j",
    "--json",
    "as_json",
    is_flag=True,
    cls=CeleryOption,
    help_group="Check Options",
    help="Print one JSON object instead of text.",
)
@click.pass_context
def check(ctx: click.Context, /, timeout: float, as_json: bool, **kwargs: Any) -> None:
    """Find queues whose workers register different tasks, and risky settings.

    Exits 1 when it finds a problem, 69 when no worker answers.
    """
    app = ctx.obj.app
    settings = _settings(app)
    try:
        report = _ask_workers(app, timeout)
    except click.ClickException as exc:
        if as_json:
            click.echo(
                json.dumps(_document(None, settings, exc.format_message()), indent=2)
            )
        raise
    ok = report.ok and not settings
    if as_json:
        click.echo(json.dumps(_document(report, settings), indent=2))
    else:
        for line in report.describe():
            ctx.obj.echo(line)
        ctx.obj.echo("settings:" if settings else "settings: ok")
        for sentence in settings:
            ctx.obj.echo(f"  {sentence}")
        ctx.obj.echo(_summary(report, settings))
    if not ok:
        ctx.exit(EX_PROBLEMS)


def _settings(app: Celery) -> list[str]:
    """The local app's settings that defeat a guarantee, or the bad one."""
    from .checks import problems  # noqa: PLC0415 - connects a worker_init receiver

    try:
        return problems(app)
    except ConfigurationError as exc:
        return [str(exc)]


def _ask_workers(app: Celery, timeout: float) -> FleetReport:
    """Ask every live worker for its registered tasks and its queues."""
    with app.connection() as connection:  # nothing connects yet
        broker = maybe_sanitize_url(connection.as_uri(include_password=True))
    inspect = app.control.inspect(timeout=timeout)
    try:
        registered = inspect.registered()
        queues = inspect.active_queues()
    except OperationalError as exc:
        raise CeleryCommandException(
            message=f"Could not reach the broker {broker}: {exc}",
            exit_code=EX_UNAVAILABLE,
        ) from exc
    logger.debug("registered: %r; active_queues: %r", registered, queues)
    report = analyse(registered, queues)
    if not report.workers:
        raise CeleryCommandException(
            message=f"No worker replied within {timeout:g}s on {broker}",
            exit_code=EX_UNAVAILABLE,
        )
    return report


def _document(
    report: FleetReport | None, settings: list[str], error: str | None = None
) -> dict[str, Any]:
    """The ``--json`` output (its schema is in docs/howto/job-ownership.md)."""
    fleet = report or FleetReport(workers=(), queues=(), unchecked=())
    return {
        **fleet.as_dict(),
        "settings": settings,
        "ok": report is not None and report.ok and not settings,
        "error": error,
    }


def _summary(report: FleetReport, settings: list[str]) -> str:
    conflicts = sum(len(queue.conflicts) for queue in report.queues)
    found = [
        f"{conflicts} task(s) not registered by every worker of their queue"
        if conflicts
        else "",
        f"{len(report.unchecked)} worker(s) not checked" if report.unchecked else "",
        f"{len(settings)} setting problem(s)" if settings else "",
    ]
    if any(found):
        return "problems: " + "; ".join(part for part in found if part)
    return (
        f"ok: {len(report.workers)} worker(s) on {len(report.queues)} queue(s) "
        "register the same tasks per queue"
    )
