"""``python -m celery_dedup.demo [options]``: the demo, as ``celery-dedup demo``."""

from __future__ import annotations

import argparse
import sys

from .cli import add_demo_options, demo


def _main() -> int:
    options = argparse.ArgumentParser(
        prog="python -m celery_dedup.demo", description="celery-dedup's demo."
    )
    add_demo_options(options)
    return demo(options.parse_args())


if __name__ == "__main__":
    sys.exit(_main())
