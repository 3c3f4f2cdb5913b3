"""``celery -A proj dedup relay`` and ``dedup outbox --json``, run as users run them.

Each command is a ``python -m celery`` process of the scenario app, its outbox
on SQLite (or on a closed port), its broker the rig's Redis (or a closed
port). Every failure must end in one line on stderr with its exit code (69:
something is down, 78: a setting, 2: an option), and with ``--json`` in a
JSON object on stdout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from celery_dedup.outbox import Outbox
from tests.integration import outbox_fixtures
from tests.integration.outbox_fixtures import EventQueue
from tests.rig import ROOT, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.outbox]
broker_url = outbox_fixtures.broker_url
events = outbox_fixtures.events

APP = "tests.apps.scenario_app"
TABLE = "ob_relay_cli"
COUNTS = (
    "claimed",
    "published",
    "failed",
    "parked",
    "reclaimed",
    "lost",
    "deleted",
    "broker_unreachable",
    "broker_error",
)


def command(*args: str) -> list[str]:
    """``celery -A APP dedup *args``, as a user types it."""
    return [sys.executable, "-m", "celery", "-A", APP, "dedup", *args]


def env(broker: str | None, python_path: str = "", **conf: Any) -> dict[str, str]:
    """The scenario app's environment: its Redis (the broker) and settings."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (python_path, str(ROOT)) if p),
        # Nothing listens on a free port: a broker that is down.
        "DEDUP_TEST_REDIS_URL": broker or f"redis://127.0.0.1:{free_port()}/0",
        "DEDUP_TEST_CONF": json.dumps(conf),
    }


def dedup(
    *args: str, broker: str | None = None, python_path: str = "", **conf: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``celery -A APP dedup *args`` to its end."""
    return subprocess.run(
        command(*args),
        cwd=ROOT,
        env=env(broker, python_path, **conf),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def parsed(done: subprocess.CompletedProcess[str]) -> Any:
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON:\n{done.stdout}\n{done.stderr}") from None


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The only line on stderr, an error without a traceback."""
    assert "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("Error: "), line
    return line


@pytest.fixture
def outbox(tmp_path: Path) -> Any:
    """A SQLite outbox with three pending events, and its settings."""
    box = Outbox(f"sqlite:///{tmp_path / 'outbox.db'}", table_name=TABLE)
    box.create_all()
    with box.engine.begin() as conn:
        for n in range(3):
            box.add(conn, "CLOSED", aggregate_id=f"c:{n}", payload={"n": n}, fence=None)
    yield box
    box.close()


def settings(box: Outbox, exchange: str = "events.relay-cli") -> dict[str, str]:
    return {
        "dedup_outbox_url": str(box.engine.url),
        "dedup_outbox_table": TABLE,
        "dedup_outbox_exchange": exchange,
    }


def states(box: Outbox) -> list[tuple[str, int]]:
    c = box.table.c
    with box.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(c.state, c.attempts))]


# -- success ------------------------------------------------------------------


def test_once_publishes_and_prints_its_counts(
    outbox: Outbox, broker_url: str, events: EventQueue
) -> None:
    conf = settings(outbox, events.exchange_name)
    # When one pass runs with --json
    done = dedup("relay", "--once", "--json", broker=broker_url, **conf)
    # Then it printed the counts of the pass, with no error, and exited 0
    assert done.returncode == 0, done.stderr
    report = parsed(done)
    assert list(report) == [*COUNTS, "error"]
    assert (report["claimed"], report["published"], report["failed"]) == (3, 3, 0)
    assert (report["broker_unreachable"], report["error"]) == (False, None)
    assert [m.payload for m in events.drain()] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert states(outbox) == [("published", 0)] * 3
    # And a pass with nothing to do says so in text, quietly
    done = dedup("relay", "--once", broker=broker_url, **conf)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("claimed=0 published=0 failed=0 parked=0")
    assert done.stderr == ""


def test_forever_prints_a_json_line_and_logs_a_line_per_busy_pass(
    outbox: Outbox, broker_url: str, events: EventQueue, tmp_path: Path
) -> None:
    # Given a relay polling every 50 ms, its output in files
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            command("relay", "--json", "--poll-interval", "0.05"),
            cwd=ROOT,
            env=env(broker_url, **settings(outbox, events.exchange_name)),
            stdout=stdout,
            stderr=stderr,
            text=True,
        )
        try:
            # When it has published the three events and polled idle a while
            wait_for(out.read_text, 20, "the first JSON line")
            wait_for(lambda: len(events.drain()) == 3, 5, "the three events")
            time.sleep(0.5)  # some ten idle passes
            process.send_signal(signal.SIGTERM)
            assert process.wait(20) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    # Then stdout has one JSON line, for the busy pass
    [line] = out.read_text().splitlines()
    report = json.loads(line)
    assert (report["claimed"], report["published"], report["error"]) == (3, 3, None)
    # And stderr one INFO line per busy pass, none for the idle ones
    log = err.read_text()
    passes = [entry for entry in log.splitlines() if "Outbox relay pass:" in entry]
    assert len(passes) == 1, log
    assert "INFO" in passes[0] and "claimed=3 published=3" in passes[0]
    assert "relay: stopping after the current pass" in log
    assert "Traceback" not in log


# -- outages -----------------------------------------------------------------


def test_once_with_the_broker_down_exits_69_and_parks_nothing(outbox: Outbox) -> None:
    # When one pass runs while nothing listens on the broker's port
    done = dedup("relay", "--once", **settings(outbox))
    # Then it exits 69, saying so in one line after the relay's warning
    assert done.returncode == 69, done.stderr
    assert "Traceback" not in done.stderr
    *warnings, error = done.stderr.splitlines()
    assert error.startswith("Error: Could not reach the broker redis://127.0.0.1:")
    assert "0 of 3 claimed row(s) published" in error
    assert all("WARNING" in line for line in warnings)
    assert "broker_unreachable=True" in done.stdout
    assert states(outbox) == [("pending", 0)] * 3
    # And --json prints the counts with the error
    done = dedup("relay", "--once", "--json", **settings(outbox))
    assert done.returncode == 69, done.stderr
    report = parsed(done)
    assert (report["claimed"], report["published"]) == (3, 0)
    assert report["broker_unreachable"] is True
    assert report["error"].startswith("Could not reach the broker")


DATABASE_DOWN = [
    ("relay", "--once"),
    ("relay",),
    ("outbox",),
]


@pytest.mark.parametrize("args", DATABASE_DOWN, ids=" ".join)
def test_a_database_that_is_down_is_one_line_and_69(args: tuple[str, ...]) -> None:
    url = f"postgresql+psycopg2://app:secret@127.0.0.1:{free_port()}/app"
    conf = {"dedup_outbox_url": url}
    # When the command runs against a database nothing listens for
    done = dedup(*args, **conf)
    # Then it exits 69 with one line naming the database, its password hidden
    assert done.returncode == 69, done.stderr
    line = one_line_error(done)
    assert "Could not read the outbox table celery_dedup_outbox at" in line
    assert "postgresql+psycopg2://app:***@127.0.0.1:" in line
    assert "Connection refused" in line
    assert "secret" not in done.stderr + done.stdout
    assert done.stdout == ""
    # And with --json, a JSON object (one line when the relay runs on) says it
    done = dedup(*args, "--json", **conf)
    assert done.returncode == 69, done.stderr
    report = parsed(done)
    assert report["error"] == line.removeprefix("Error: ")
    if args == ("relay",):
        assert len(done.stdout.splitlines()) == 1
        assert all(report[name] is None for name in COUNTS)
    if args == ("outbox",):
        assert report["table"] == "celery_dedup_outbox"
        assert report["pending"] is None


# -- settings and options -------------------------------------------------------


SETTINGS = [
    ({}, "dedup_outbox_url: set it to the database URL of the outbox"),
    ({"dedup_outbox_url": "not a url"}, "dedup_outbox_url: SQLAlchemy cannot open"),
]


@pytest.mark.parametrize(("conf", "message"), SETTINGS, ids=["unset", "invalid"])
@pytest.mark.parametrize(
    "args", [("relay", "--once"), ("relay",), ("outbox",)], ids=" ".join
)
def test_a_missing_or_invalid_url_exits_78(
    conf: dict[str, str], message: str, args: tuple[str, ...]
) -> None:
    done = dedup(*args, "--json", **conf)
    assert done.returncode == 78, done.stderr
    assert message in one_line_error(done)
    assert parsed(done)["error"].startswith(message)


@pytest.mark.parametrize(
    "option",
    [
        ("--batch-size", "0"),
        ("--poll-interval", "-1"),
        ("--poll-interval", "0"),
        ("--max-attempts", "0"),
        ("--claim-timeout", "0"),
        ("--retention", "-5"),
    ],
    ids=" ".join,
)
def test_a_bad_option_is_a_usage_error(option: tuple[str, str]) -> None:
    done = dedup("relay", "--once", *option, dedup_outbox_url="sqlite://")
    assert done.returncode == 2, done.stderr
    assert f"Invalid value for '{option[0]}'" in done.stderr
    assert "Traceback" not in done.stderr


def test_without_sqlalchemy_both_commands_exit_78(tmp_path: Path) -> None:
    # Given a Python where SQLAlchemy cannot be imported
    hidden = tmp_path / "sqlalchemy"
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    for args in [("relay", "--once"), ("relay",), ("outbox",)]:
        done = dedup(
            *args, "--json", python_path=str(tmp_path), dedup_outbox_url="sqlite://"
        )
        assert done.returncode == 78, done.stderr
        line = one_line_error(done)
        assert "pip install 'celery-dedup[outbox]'" in line
        assert "pip install" in parsed(done)["error"]
