"""The chaos soak (``benchmarks/soak.py``), bounded: a few hundred calls
under every fault it injects, checked from its JSON rather than its verdict
alone; and once with a guarantee switched off, to show that its checks fail.

Marked ``soak`` and left out of the default run (it loads the machine with
its own workers for a minute): ``pytest -m soak``, which ``.ci/run`` runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.soak

ROOT = Path(__file__).resolve().parents[2]


def soak(tmp_path: Path, *args: str, sabotage: str = "") -> tuple[int, dict[str, Any]]:
    out = tmp_path / "soak.json"
    env = {**os.environ, "SABOTAGE": sabotage}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--json", str(out), *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return done.returncode, json.loads(out.read_text())


def invariant(result: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = (i for i in result["invariants"] if i["name"].startswith(name))
    return found


def test_a_bounded_soak_keeps_every_guarantee(tmp_path: Path) -> None:
    code, result = soak(
        tmp_path, "--tasks", "600", "--keys", "60", "--workers", "3", "--rate", "40"
    )
    figures, faults = result["figures"], result["faults"]
    failed = [i for i in result["invariants"] if not i["ok"]]
    assert code == 0 and result["passed"], (failed, result["details"])
    # Every fault was injected, and the work was done under them.
    assert faults["SIGKILL (worker child)"] >= 1
    assert faults["SIGSTOP past the lease"] == 1
    assert faults["lock-store Redis restarted"] == 1
    assert faults["broker connections dropped"] == 1
    assert figures["tasks sent"] == 600
    assert figures["collapsed at enqueue (deduplicated)"] > 0
    assert figures["tasks completed (SUCCESS)"] > 0
    # The guarantees, from the figures themselves.
    assert figures["tasks lost"] == 0
    assert figures["max overlapping bodies per key, lease held"] == 1
    assert figures["outbox rows"] == figures["distinct events written"] > 0
    assert figures["ledger rows"] == figures["outbox rows"]
    assert figures["zombie outbox writes rejected by the fence"] == 1
    assert figures["keys held after their TTL"] == 0


def test_the_soak_fails_when_bodies_of_a_key_may_overlap(tmp_path: Path) -> None:
    # Two bodies per key allowed (dedup_max_running=2), a few hot keys.
    code, result = soak(
        tmp_path,
        *("--tasks", "300", "--keys", "5", "--workers", "3", "--rate", "40"),
        sabotage="overlap",
    )
    overlap = invariant(result, "max overlapping bodies per key (lease held)")
    assert code == 1 and not result["passed"]
    assert overlap["value"] == 2 and not overlap["ok"]
