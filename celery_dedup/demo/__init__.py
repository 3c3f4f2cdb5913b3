"""``celery-dedup demo``: the incidents replayed with plain Celery and DedupTask.

The demo starts a private ``redis-server``, real ``celery worker`` processes
running :mod:`celery_dedup.demo.app`, and replays S1, S3, S4, S5 and S9 of
DESIGN.md twice: with plain ``celery.Task`` and with
:class:`~celery_dedup.DedupTask`. See ``docs/demo.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The ``celery-dedup`` console script: ``celery-dedup demo [options]``."""
    from .cli import main as cli_main  # noqa: PLC0415  (keeps the import light)

    return cli_main(argv)
