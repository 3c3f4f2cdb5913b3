"""``celery -A proj dedup outbox``: count the outbox rows, requeue parked ones.

SQLAlchemy (the ``outbox`` extra) is imported only when the command runs. The
helpers at the end (the extra missing, the database failing) are shared with
``dedup relay``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click
from celery.bin.base import CeleryCommand
from celery.exceptions import CeleryCommandException
from celery.platforms import EX_UNAVAILABLE

from .. import inspection
from ._common import (
    EX_CONFIG,
    configuration_errors,
    echo_json,
    json_errors,
    json_option,
    option,
)

if TYPE_CHECKING:
    from ..outbox import Outbox

_GROUP = "Outbox Options"
#: The keys of ``outbox --json``, besides ``error``.
_FIELDS = (
    "table",
    "pending",
    "published",
    "parked",
    "oldest_pending_at",
    "oldest_pending_age",
    "requeued",
)


@click.command("outbox", cls=CeleryCommand)
@option(
    "--retry-parked",
    is_flag=True,
    group=_GROUP,
    help="Give every parked row a fresh set of attempts first.",
)
@json_option()
@click.pass_context
def outbox_status(
    ctx: click.Context, /, retry_parked: bool, as_json: bool, **kwargs: Any
) -> None:
    """Count the outbox rows (dedup_outbox_url) by state; requeue parked ones.

    Exits 69 when the database cannot be read, 78 when a setting is missing
    or invalid.
    """
    # On a failure, --json prints what was read so far and null for the rest.
    with json_errors(as_json, dict.fromkeys(_FIELDS)) as document:
        require_sqlalchemy()
        from ..outbox import Outbox  # noqa: PLC0415 - the outbox extra

        with configuration_errors():
            box = Outbox.from_app(ctx.obj.app)
        document["table"] = box.table_name
        try:
            with database_errors(box):
                if retry_parked:
                    with box.engine.begin() as conn:
                        document["requeued"] = box.requeue_parked(conn)
                document.update(_outbox_counts(box))
        finally:
            box.close()
    if as_json:
        echo_json(document)
        return
    if document["requeued"] is not None:
        ctx.obj.echo(f"requeued {document['requeued']} parked row(s)")
    age = document["oldest_pending_age"]
    ctx.obj.echo(
        f"{document['table']}: {document['pending']} pending, "
        f"{document['published']} published, {document['parked']} parked; "
        f"oldest pending: {inspection.duration(age)}"
        + (f" ({document['oldest_pending_at']} UTC)" if age is not None else "")
    )


def _outbox_counts(box: Outbox) -> dict[str, Any]:
    """Rows per state, and the oldest pending row's creation time and age."""
    from sqlalchemy import func, select  # noqa: PLC0415 - the outbox extra

    from ..outbox.table import PARKED, PENDING, PUBLISHED, utcnow  # noqa: PLC0415

    c = box.table.c
    with box.engine.connect() as conn:
        rows = conn.execute(select(c.state, func.count()).group_by(c.state)).all()
        counts: dict[str, int] = dict(rows)
        oldest = conn.execute(
            select(func.min(c.created_at)).where(c.state == PENDING)
        ).scalar()
    return {
        "pending": counts.get(PENDING, 0),
        "published": counts.get(PUBLISHED, 0),
        "parked": counts.get(PARKED, 0),
        "oldest_pending_at": oldest.isoformat() if oldest is not None else None,
        "oldest_pending_age": (
            round((utcnow() - oldest).total_seconds(), 3)
            if oldest is not None
            else None
        ),
    }


def require_sqlalchemy() -> None:
    """Exit with EX_CONFIG, saying what to install, without the outbox extra."""
    try:
        import sqlalchemy  # noqa: F401, PLC0415
    except ImportError as exc:
        raise CeleryCommandException(
            message=f"The outbox needs SQLAlchemy: pip install 'celery-dedup[outbox]' "
            f"({exc})",
            exit_code=EX_CONFIG,
        ) from exc


@contextlib.contextmanager
def database_errors(box: Outbox) -> Iterator[None]:
    """Exit with EX_UNAVAILABLE when the outbox's database fails, in one line
    that names the database (its password hidden)."""
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415 - the outbox extra

    try:
        yield
    except SQLAlchemyError as exc:
        where = box.engine.url.render_as_string(hide_password=True)
        raise CeleryCommandException(
            message=f"Could not read the outbox table {box.table_name} at {where}: "
            f"{_reason(exc)}",
            exit_code=EX_UNAVAILABLE,
        ) from exc


def _reason(exc: Exception) -> str:
    """The driver's message on one line, without SQLAlchemy's link to its docs
    (drivers spread theirs over lines: "... failed: Connection refused\\n\\tIs
    the server running ...")."""
    text = str(getattr(exc, "orig", None) or exc)
    text = re.sub(r"\(Background on this error at: [^)]*\)", "", text)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())
