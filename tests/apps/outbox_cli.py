"""The ``celery`` command with the ``dedup`` group added, as the
``celery.commands`` entry point adds it once the package is installed."""

from __future__ import annotations

import sys

from celery.bin.celery import celery, main

from celery_dedup.cli import dedup

if __name__ == "__main__":
    celery.add_command(dedup)
    sys.exit(main())
