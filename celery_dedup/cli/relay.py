"""``celery -A proj dedup relay``: publish the outbox from its own process.

It ends like the other ``dedup`` commands: 78 for a missing or invalid
setting (or no SQLAlchemy), 69 when the database cannot be reached at start
(and, with ``--once``, when the broker could not be), in one line on stderr
and, with ``--json``, in the ``error`` of a JSON object on stdout. Once it
runs, a pass that fails is logged and retried, as in the worker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
from celery.bin.base import LOG_LEVEL, CeleryCommand
from celery.exceptions import CeleryCommandException
from celery.platforms import EX_UNAVAILABLE
from kombu.utils.url import maybe_sanitize_url

from ._common import OUTPUT_GROUP, configuration_errors, echo_json, option
from .outbox import database_errors, require_sqlalchemy

if TYPE_CHECKING:
    from ..outbox import Outbox
    from ..outbox.relay import Relay, RelayCounts

_GROUP = "Relay Options"


@click.command(cls=CeleryCommand)
@option(
    "--once",
    is_flag=True,
    group=_GROUP,
    help="Run one pass, print its counts and exit (69 if the broker is down).",
)
@option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=200,
    show_default=True,
    group=_GROUP,
    help="Rows claimed per pass.",
)
@option(
    "--poll-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    group=_GROUP,
    help="Seconds to sleep when there is nothing to publish.",
)
@option(
    "--max-attempts",
    type=click.IntRange(1, 1_000),
    default=10,
    show_default=True,
    group=_GROUP,
    help="Failed publishes before a row is parked.",
)
@option(
    "--claim-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    group=_GROUP,
    help="Seconds before another relay may take over a claimed row.",
)
@option(
    "--retention",
    type=click.FloatRange(min=0),
    default=7 * 86400.0,
    show_default=True,
    group=_GROUP,
    help="Seconds published rows are kept (0 keeps them forever).",
)
@option(
    "-l",
    "--loglevel",
    type=LOG_LEVEL,
    default=None,
    group=_GROUP,
    help="Logging level (stderr) [default: INFO; WARNING with --once].",
)
@option(
    "-j",
    "--json",
    "as_json",
    is_flag=True,
    group=OUTPUT_GROUP,
    help="Print JSON: one object with --once, else one line per busy pass.",
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
    loglevel: int | None,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Publish the outbox (dedup_outbox_url) to dedup_outbox_exchange.

    Exits 69 when the database cannot be reached (with --once, the broker
    too), 78 when a setting is missing or invalid.
    """
    app = ctx.obj.app
    app.log.setup(loglevel=loglevel or (logging.WARNING if once else logging.INFO))
    # Forever, --json prints JSON lines, an error's object too; hence this
    # command's own except clause below rather than _common.json_errors.
    emit: Callable[[Any], None] = echo_json if once else _echo_line
    document: dict[str, Any] = {}  # an error's object: what is known so far
    try:
        require_sqlalchemy()
        from ..outbox.relay import Relay, RelayCounts  # noqa: PLC0415 - outbox extra

        document = dict.fromkeys(f.name for f in dataclasses.fields(RelayCounts))
        with configuration_errors():
            worker = Relay.from_app(
                app,
                batch_size=batch_size,
                poll_interval=poll_interval,
                max_attempts=max_attempts,
                claim_timeout=claim_timeout,
                retention=retention or None,
            )
        try:
            if not once:
                _run_forever(worker, emit if as_json else None)
                return
            with database_errors(worker.outbox):
                counts = worker.run_once()
            document = dataclasses.asdict(counts)
            if not as_json:
                ctx.obj.echo(str(counts))
            if counts.broker_unreachable:
                raise CeleryCommandException(
                    message=_broker_down(worker, counts), exit_code=EX_UNAVAILABLE
                )
            if as_json:
                emit({**document, "error": None})
        finally:
            worker.close()
            worker.outbox.close()
    except click.ClickException as exc:
        if as_json:
            emit({**document, "error": exc.format_message()})
        raise


def _run_forever(worker: Relay, emit: Callable[[Any], None] | None) -> None:
    # A wrong URL or a missing table ends the command now, not in a loop of
    # logged retries; an outage after this point is retried.
    with database_errors(worker.outbox):
        _probe(worker.outbox)
    stop = threading.Event()

    def say(message: str) -> None:
        click.echo(f"relay: {message}", err=emit is not None)  # stdout is JSON's

    def request_stop(signum: int, frame: Any) -> None:
        say("stopping after the current pass")
        stop.set()

    def report(counts: RelayCounts) -> None:
        if emit is not None and not counts.idle:
            error = _broker_down(worker, counts) if counts.broker_unreachable else None
            emit({**dataclasses.asdict(counts), "error": error})

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    say(
        f"publishing {worker.outbox.table_name} to {worker.exchange.name} on "
        f"{_broker_url(worker)} (Ctrl-C to stop)"
    )
    worker.run_forever(stop, report)


def _broker_down(worker: Relay, counts: RelayCounts) -> str:
    return (
        f"Could not reach the broker {_broker_url(worker)} "
        f"({counts.broker_error}): {counts.published} of {counts.claimed} claimed "
        "row(s) published, the rest stay pending"
    )


def _broker_url(worker: Relay) -> str:
    """The broker's URL, its password (if any) masked."""
    return str(maybe_sanitize_url(worker.connection.as_uri(include_password=True)))


def _probe(box: Outbox) -> None:
    """Read one row id: the database answers and the table is there."""
    from sqlalchemy import select  # noqa: PLC0415 - the outbox extra

    with box.engine.connect() as conn:
        conn.execute(select(box.table.c.id).limit(1)).all()


def _echo_line(document: Any) -> None:
    """One JSON object per line (JSON lines), flushed at once."""
    click.echo(json.dumps(document))
