"""``celery-dedup demo`` end to end: a subprocess, as a newcomer runs it.

The demo starts its own redis-server and workers; these tests check its
figures against DESIGN.md, that it fits its 90 s budget, and that it leaves
no process and no file behind, also when interrupted with Ctrl-C (SIGINT).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.rig import ROOT, RedisServer

pytestmark = pytest.mark.scenario

DEMO = [sys.executable, "-m", "celery_dedup.demo"]


def demo_env(tmp: Path) -> dict[str, str]:
    """The demo's temporary folder goes under ``tmp``, so the test can find it."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}


def survivors(*needles: str) -> list[str]:
    """Processes whose command line or environment mentions a needle."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = b" ".join(
                (entry / part).read_bytes() for part in ("cmdline", "environ")
            ).replace(b"\0", b" ")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if any(needle.encode() in text for needle in needles):
            found.append(f"{entry.name}: {text[:200]!r}")
    return found


def assert_nothing_left(tmp: Path, port: str) -> None:
    deadline = time.monotonic() + 5  # killed groups are reaped by init
    while survivors(str(tmp), f"127.0.0.1:{port}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert survivors(str(tmp), f"127.0.0.1:{port}") == []
    assert list(tmp.iterdir()) == []


def test_the_demo_shows_the_duplicates_and_their_fix(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # When the demo runs every scenario, as the README's first command
    began = time.monotonic()
    done = subprocess.run(
        [*DEMO, "--json"],
        env=demo_env(tmp),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    elapsed = time.monotonic() - began
    print(f"celery-dedup demo --json took {elapsed:.1f}s")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # Then it fits its budget (90 s; slack for a loaded 2-core machine)
    assert elapsed < 120
    assert result["ok"] is True
    got = {s["id"]: s for s in result["scenarios"]}
    assert list(got) == ["s1", "s3", "s4", "s5", "s9"]
    plain = {k: s["plain"] for k, s in got.items()}
    dedup = {k: s["dedup"] for k, s in got.items()}
    # and DedupTask holds DESIGN.md's figures
    assert dedup["s1"]["max_at_once"] == 1
    assert dedup["s1"]["events"] == 1
    assert dedup["s3"]["max_at_once"] == 1
    assert dedup["s3"]["backlog_max"] <= 1
    assert dedup["s4"]["executions"] == 1
    assert dedup["s4"]["deliveries"] >= 2  # it was redelivered, and dropped
    assert dedup["s4"]["events"] == 1
    assert dedup["s5"]["killed"] == 1
    assert dedup["s5"]["completed"] == 1
    assert dedup["s9"]["events"] == 1
    assert dedup["s9"]["business_rows"] == 1
    assert dedup["s9"]["rejected"] == 1
    for figures in dedup.values():
        assert figures["lost"] == 0
        assert figures["keys_held"] == 0
    # while plain Celery shows the duplicates
    assert plain["s1"]["executions"] > 1 or plain["s1"]["max_at_once"] > 1
    assert plain["s1"]["events"] > 1
    assert plain["s3"]["max_at_once"] > 1
    assert plain["s4"]["executions"] == 2
    assert plain["s5"]["killed"] == 1
    assert plain["s9"]["events"] == 2
    assert plain["s9"]["business_rows"] == 2
    # and nothing of the demo is left: no process, no folder
    port = result["redis"]["url"].rsplit(":", 1)[1].split("/")[0]
    assert_nothing_left(tmp, port)


def test_ctrl_c_stops_everything_promptly(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with subprocess.Popen(
        [*DEMO, "--json"],
        env=demo_env(tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as demo:
        assert demo.stderr is not None
        # Given the demo is midway: Redis and workers up, a scenario running
        lines = []
        for line in demo.stderr:
            lines.append(line)
            if "plain Celery" in line:
                break
        port_match = re.search(r"127\.0\.0\.1:(\d+)", "".join(lines))
        assert port_match, lines
        # When it gets Ctrl-C
        demo.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, err = demo.communicate(timeout=30)
        stopped = time.monotonic() - sent
    # Then it exits promptly, saying so, with no result
    assert stopped < 15
    assert demo.returncode == 130, err
    assert "Interrupted" in err
    assert out == ""
    # and leaves no process and no folder behind
    assert_nothing_left(tmp, port_match.group(1))


def test_an_existing_redis_is_left_as_it_was(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # Given a Redis that holds someone else's key
    url = redis_server.url(5)
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.set("theirs", "kept")
    try:
        # When the demo runs one scenario on it
        done = subprocess.run(
            [*DEMO, "--json", "--scenario", "s4", "--redis-url", url],
            env=demo_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        assert [s["id"] for s in result["scenarios"]] == ["s4"]
        assert result["redis"] == {"url": url, "private": False}
        # Then the demo's figures hold there too
        assert result["scenarios"][0]["dedup"]["executions"] == 1
        # and it deleted every key it wrote, and only those
        assert sorted(client.scan_iter()) == [b"theirs"]
    finally:
        client.flushdb()
        client.close()
