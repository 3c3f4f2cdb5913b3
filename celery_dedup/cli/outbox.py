"""``celery -A proj dedup outbox``: count the outbox rows, requeue parked ones.

SQLAlchemy (the ``outbox`` extra) is imported only when the command runs.
"""

from __future__ import annotations

from typing import Any

import click
from celery.bin.base import CeleryCommand
from celery.exceptions import CeleryCommandException
from celery.platforms import EX_UNAVAILABLE

from .. import inspection
from ._common import EX_CONFIG, configuration_errors, echo_json, json_option, option

_GROUP = "Outbox Options"


@click.command("outbox", cls=CeleryCommand)
@option(
    "--retry-parked",
    is_flag=True,
    group=_GROUP,
    help="Give every parked row a fresh set of attempts first.",
)
@json_option(_GROUP)
@click.pass_context
def outbox_status(
    ctx: click.Context, /, retry_parked: bool, as_json: bool, **kwargs: Any
) -> None:
    """Count the outbox rows (dedup_outbox_url) by state; requeue parked ones."""
    try:
        from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415 - outbox extra

        from ..outbox import Outbox  # noqa: PLC0415
    except ImportError as exc:
        raise CeleryCommandException(
            message=f"The outbox needs SQLAlchemy: pip install 'celery-dedup[outbox]' "
            f"({exc})",
            exit_code=EX_CONFIG,
        ) from exc
    with configuration_errors():
        box = Outbox.from_app(ctx.obj.app)
    try:
        requeued = None
        if retry_parked:
            with box.engine.begin() as conn:
                requeued = box.requeue_parked(conn)
        document = {**_outbox_counts(box), "requeued": requeued}
    except SQLAlchemyError as exc:
        where = box.engine.url.render_as_string(hide_password=True)
        raise CeleryCommandException(
            message=f"Could not read the outbox table {box.table_name} at {where}: "
            f"{exc}",
            exit_code=EX_UNAVAILABLE,
        ) from exc
    finally:
        box.close()
    if as_json:
        echo_json(document)
        return
    if requeued is not None:
        ctx.obj.echo(f"requeued {requeued} parked row(s)")
    age = document["oldest_pending_age"]
    ctx.obj.echo(
        f"{document['table']}: {document['pending']} pending, "
        f"{document['published']} published, {document['parked']} parked; "
        f"oldest pending: {inspection.duration(age)}"
        + (f" ({document['oldest_pending_at']} UTC)" if age is not None else "")
    )


def _outbox_counts(box: Any) -> dict[str, Any]:
    """Rows per state, and the oldest pending row's creation time and age."""
    from sqlalchemy import func, select  # noqa: PLC0415 - the outbox extra

    from ..outbox.table import PARKED, PENDING, PUBLISHED, utcnow  # noqa: PLC0415

    c = box.table.c
    with box.engine.connect() as conn:
        counts = dict(
            conn.execute(select(c.state, func.count()).group_by(c.state)).all()
        )
        oldest = conn.execute(
            select(func.min(c.created_at)).where(c.state == PENDING)
        ).scalar()
    return {
        "table": box.table_name,
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
