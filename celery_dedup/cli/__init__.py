"""``celery -A proj dedup ...``: the celery-dedup commands of the Celery CLI.

Registered through the ``celery.commands`` entry point
(``celery_dedup.cli:dedup``); Celery hands each command its loaded app as
``ctx.obj.app``. Celery imports this package for every ``celery`` command, so
what a single command needs (the start-up checks, SQLAlchemy for the outbox)
is imported only when that command runs.

A module a concern: :mod:`.relay` publishes the outbox, :mod:`.check` checks
job ownership and settings, :mod:`.keys` shows the dedup keys (``status``,
``inspect``), :mod:`.release` frees a stuck one, :mod:`.outbox` counts the
outbox rows; :mod:`._common` holds the exit codes, options and output they
share, and the order of the option groups in ``--help``.
"""

from __future__ import annotations

from typing import Any

import click
from celery.bin.base import handle_preload_options

from . import check, keys, outbox, relay, release
from ._common import EX_CONFIG, EX_PROBLEMS, EX_REFUSED

__all__ = ["EX_CONFIG", "EX_PROBLEMS", "EX_REFUSED", "dedup"]


@click.group()
@click.pass_context
@handle_preload_options
def dedup(ctx: click.Context, /, **kwargs: Any) -> None:
    """celery-dedup: locks, leases and the outbox."""


dedup.add_command(relay.relay)
dedup.add_command(check.check)
dedup.add_command(keys.status)
dedup.add_command(keys.inspect_key)
dedup.add_command(release.release)
dedup.add_command(outbox.outbox_status)
