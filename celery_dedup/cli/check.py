"""``celery -A proj dedup check``: job ownership (S11) and risky settings."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import click
from celery.bin.base import CeleryCommand
from celery.exceptions import CeleryCommandException
from celery.platforms import EX_UNAVAILABLE
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from ..exceptions import ConfigurationError
from ..ownership import FleetReport, analyse
from ._common import EX_PROBLEMS, echo_json, json_option, option

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

_GROUP = "Check Options"


@click.command(cls=CeleryCommand)
@option(
    "-t",
    "--timeout",
    type=float,
    default=2.0,
    show_default=True,
    group=_GROUP,
    help="Seconds to wait for the workers' replies (asked twice).",
)
@json_option()
@click.pass_context
def check(ctx: click.Context, /, timeout: float, as_json: bool, **kwargs: Any) -> None:
    """Find queues whose workers register different tasks, and bad or risky
    settings.

    Exits 1 when it finds a problem (a setting problem even when no worker
    answers), 69 when no worker answers and the settings are sound.
    """
    app = ctx.obj.app
    settings = _settings(app)
    try:
        report: FleetReport | None = _ask_workers(app, timeout)
        error = None
    except click.ClickException as exc:
        if not settings:
            if as_json:
                echo_json(_document(None, settings, exc.format_message()))
            raise
        report, error = None, exc.format_message()
    if as_json:
        echo_json(_document(report, settings, error))
    else:
        for line in report.describe() if report else [f"workers: {error}"]:
            ctx.obj.echo(line)
        ctx.obj.echo("settings:" if settings else "settings: ok")
        for sentence in settings:
            ctx.obj.echo(f"  {sentence}")
        if report is not None:
            ctx.obj.echo(_summary(report, settings))
        else:
            ctx.obj.echo(f"problems: {len(settings)} setting problem(s)")
    if report is None or not report.ok or settings:
        ctx.exit(EX_PROBLEMS)


def _settings(app: Celery) -> list[str]:
    """The local app's settings that defeat a guarantee, or the bad one."""
    from ..checks import problems  # noqa: PLC0415 - connects a worker_init receiver

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
