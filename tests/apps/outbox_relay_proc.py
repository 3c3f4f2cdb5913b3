"""A relay process that publishes one pass and then hangs before marking it,
so a test can kill it (SIGKILL) between the publish and the mark.

Usage: python -m tests.apps.outbox_relay_proc DB_URL TABLE BROKER EXCHANGE MARKER
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from celery_dedup.outbox import Outbox, Relay


class HangingRelay(Relay):
    marker: Path

    def _finish(self, *args: Any) -> None:
        self.marker.write_text("published")
        time.sleep(600)  # killed here


def main(db_url: str, table: str, broker: str, exchange: str, marker: str) -> None:
    relay = HangingRelay(Outbox(db_url, table_name=table), broker, exchange=exchange)
    relay.marker = Path(marker)
    relay.run_once()


if __name__ == "__main__":
    main(*sys.argv[1:])
