"""``celery-dedup demo``: the command line.

    celery-dedup demo [--scenario s1,s3,...] [--json] [--redis-url URL]

Progress goes to stderr; the table (or, with ``--json``, the JSON result) to
stdout. Exit status: 0 when every DedupTask figure met DESIGN.md, 1 when one
did not, 2 when the demo could not run, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from .processes import DemoError
from .progress import Progress
from .settings import SCENARIO_IDS

EXIT_MISSED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _scenario_list(values: Sequence[str] | None) -> list[str]:
    if not values:
        return list(SCENARIO_IDS)
    names = (v.strip().lower() for value in values for v in value.split(","))
    asked = {name for name in names if name}
    unknown = sorted(asked - set(SCENARIO_IDS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {', '.join(unknown)}; "
            f"choose from {', '.join(SCENARIO_IDS)}"
        )
    return [s for s in SCENARIO_IDS if s in asked]  # in the order of DESIGN.md


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="celery-dedup",
        description="celery-dedup: run each Celery job once.",
    )
    commands = top.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="replay the incidents with plain Celery and with DedupTask",
        description=(
            "Replay incidents S1, S3, S4, S5 and S9 of celery-dedup's design with "
            "real worker processes, once with plain Celery tasks and once with "
            "DedupTask, and print the figures side by side. Needs nothing "
            "running: it starts a private redis-server and keeps the outbox in "
            "SQLite, in a temporary folder that it removes."
        ),
    )
    add_demo_options(demo)
    return top


def add_demo_options(demo: argparse.ArgumentParser) -> None:
    demo.add_argument(
        "--scenario",
        action="append",
        metavar="ID",
        help=f"only these ({', '.join(SCENARIO_IDS)}); repeat or use commas",
    )
    demo.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON on stdout (progress stays on stderr)",
    )
    demo.add_argument(
        "--redis-url",
        metavar="URL",
        help=(
            "use this Redis instead of starting one; the demo writes only keys "
            "under its own prefix and deletes them at the end"
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The ``celery-dedup`` console script."""
    args = parser().parse_args(argv)
    return demo(args)


def demo(args: argparse.Namespace) -> int:
    """Run the demo as ``args`` say; the exit status."""
    try:
        scenarios = _scenario_list(args.scenario)
    except argparse.ArgumentTypeError as exc:
        print(f"celery-dedup demo: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        from . import report  # noqa: PLC0415  (imports Celery: only when it runs)
        from .runner import run_demo  # noqa: PLC0415
    except ImportError as exc:  # SQLAlchemy is the "outbox" extra
        print(
            f"celery-dedup demo: {exc}; the demo's outbox needs SQLAlchemy: "
            "pip install 'celery-dedup[outbox]'",
            file=sys.stderr,
        )
        return EXIT_ERROR

    progress = Progress(sys.stderr)
    # Ctrl-C and SIGTERM end the demo through its clean-up, even where the
    # shell started it with SIGINT ignored (a background job).
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate),
    }
    try:
        result = run_demo(scenarios, progress, args.redis_url)
    except KeyboardInterrupt:
        progress.say("Interrupted: stopped what the demo started, removed its files.")
        return EXIT_INTERRUPTED
    except (DemoError, TimeoutError) as exc:
        progress.say(f"celery-dedup demo: {exc}")
        return EXIT_ERROR
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(report.dumps(result) if args.json else report.table(result), flush=True)
    return 0 if result.ok else EXIT_MISSED


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends the demo as Ctrl-C does: through its clean-up."""
    raise KeyboardInterrupt
