"""The benchmark scripts run, with tiny counts: exit 0 and their tables.

No figure is checked: these are smoke tests, the figures are the scripts'.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.cluster import RedisCluster

from tests.redis_topologies import Cluster
from tests.rig import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster_client(cluster: Cluster) -> Iterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    client.flushall()  # every primary
    yield client
    client.close()


def run(*args: str, env: dict[str, str] | None = None) -> str:
    """Run a benchmark from the project's root; its stdout, once it exited 0."""
    done = subprocess.run(
        [sys.executable, *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_cluster_prints_both_topologies_and_the_ratio(tmp_path: Path) -> None:
    scratch, figures = tmp_path / "tmp", tmp_path / "cluster.json"
    scratch.mkdir()
    out = run(
        "-m", "benchmarks.cluster", "--ops", "20", "--rounds", "2",
        "--json", str(figures),
        env={**os.environ, "TMPDIR": str(scratch)},
    )  # fmt: skip
    assert "claim + acquire + release, 20 keys per round, median of 2 rounds" in out
    for heading in ("Redis", "ops/s", "min", "max", "us/op"):
        assert heading in out
    assert "1 node" in out
    assert "cluster, 3 masters" in out
    assert "ratio cluster/single" in out
    result = json.loads(figures.read_text())
    assert set(result["rounds"]) == {"1 node", "cluster, 3 masters"}
    assert all(len(rounds) == 2 for rounds in result["rounds"].values())
    assert result["ratio_cluster_single"] > 0
    assert list(scratch.iterdir()) == []  # its servers' folders are gone


def test_throughput_takes_a_cluster_lock_store(
    cluster: Cluster, cluster_client: RedisCluster
) -> None:
    out = run(
        "benchmarks/throughput.py", "--tasks", "20", "--runs", "1",
        "--redis-url", cluster.url,
    )  # fmt: skip
    assert f"lock store: {cluster.url}, broker: its own Redis" in out
    assert "plain Task" in out
    assert "ratio" in out.split("DedupTask", 1)[1].splitlines()[0]
    assert "(broker and lock store, median run)" in out
    # the worker took the 20 leases on the cluster: one fencing counter each
    assert len(list(cluster_client.scan_iter(match="*:fence"))) == 20


def test_enqueue_takes_a_cluster_lock_store(cluster: Cluster) -> None:
    out = run(
        "benchmarks/enqueue.py", "--calls", "20", "--rounds", "1",
        "--redis-url", cluster.url,
    )  # fmt: skip
    assert "apply_async, 20 distinct calls, median of 1 rounds" in out
    assert "ratio" in out.split("DedupTask", 1)[1].splitlines()[0]
    assert "identical calls" in out
