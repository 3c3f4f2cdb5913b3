"""Redis topologies the tests start themselves: a Cluster, and a Sentinel
watching a master and its replica.

Each owns its processes and its folder: ``stop()`` ends every process it
started and removes the folder, whatever state they are in.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.rig import free_port, wait_for


class _Processes:
    """redis-server processes started under one temporary folder."""

    def __init__(self, name: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis)")
        self.binary = binary
        self.workdir = Path(tempfile.mkdtemp(prefix=f"dedup-{name}-"))
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def server(self, port: int, *args: str) -> None:
        """Start ``redis-server`` on ``port`` with ``args`` and wait for PING."""
        command = [
            self.binary, *args, "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
            "--logfile", str(self.workdir / f"redis-{port}.log"),
        ]  # fmt: skip
        self.processes[port] = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with client(port) as c:
            wait_for(lambda: _pings(c), 10, f"redis on port {port}")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.processes.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def client(port: int) -> Iterator[redis.Redis]:
    c = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        yield c
    finally:
        c.close()


def _pings(c: redis.Redis) -> bool:
    try:
        return bool(c.ping())
    except redis.ConnectionError:
        return False


def _cluster_port() -> int:
    """A free port P whose cluster bus port, P + 10000, is free too (and
    below 65536: redis-server refuses to start otherwise)."""
    while True:
        port = free_port()
        if port + 10000 < 65536 and _free(port + 10000):
            return port


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Cluster(_Processes):
    """A Redis Cluster of ``masters`` primaries and no replicas on loopback."""

    def __init__(self, masters: int = 3) -> None:
        super().__init__("cluster")
        self.ports = [_cluster_port() for _ in range(masters)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> Cluster:
        try:
            for port in self.ports:
                self.server(
                    port,
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(self.workdir / f"nodes-{port}.conf"),
                )  # fmt: skip
            create = [
                "redis-cli", "--cluster", "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas", "0", "--cluster-yes",
            ]  # fmt: skip
            subprocess.run(
                create,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=30,
            )
            for port in self.ports:
                wait_for(lambda p=port: self._ok(p), 20, f"cluster_state:ok on {port}")
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _ok(port: int) -> bool:
        with client(port) as c:
            return c.cluster("info").get("cluster_state") == "ok"


class SentinelSet(_Processes):
    """One master, one replica of it, and one sentinel monitoring them as
    ``name``, with a failover that takes about a second."""

    def __init__(self, name: str = "m") -> None:
        super().__init__("sentinel")
        self.name = name
        self.master, self.replica, self.sentinel = (free_port() for _ in range(3))

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel}/{self.name}"

    def start(self) -> SentinelSet:
        try:
            self.server(self.master)
            self.server(self.replica, "--replicaof", "127.0.0.1", str(self.master))
            wait_for(self._replicating, 20, "the replica to sync")
            conf = self.workdir / "sentinel.conf"
            conf.write_text(
                f"sentinel monitor {self.name} 127.0.0.1 {self.master} 1\n"
                f"sentinel down-after-milliseconds {self.name} 1000\n"
                f"sentinel failover-timeout {self.name} 5000\n"
            )
            # The sentinel rewrites its config file: it must be writable.
            self.server(self.sentinel, str(conf), "--sentinel")
            wait_for(self._promotable, 20, "the sentinel to vet the replica")
        except BaseException:
            self.stop()
            raise
        return self

    def _replicating(self) -> bool:
        with client(self.replica) as c:
            return c.info("replication").get("master_link_status") == "up"

    def _promotable(self) -> bool:
        """The sentinel has read the replica's INFO (it promotes no replica
        before that: NOGOODSLAVE) and the replica's link is up."""
        with client(self.sentinel) as c:
            return any(
                not r["is_disconnected"] and r["master-link-status"] == "ok"
                for r in c.sentinel_slaves(self.name)
            )

    def master_port(self) -> int:
        """The port of the master as the sentinel's master record has it:
        what clients (redis-py's ``discover_master``) connect to."""
        with client(self.sentinel) as c:
            # Raw: redis-py 6.4's sentinel_master() fails to parse its reply.
            raw = c.execute_command("SENTINEL", "MASTER", self.name)
        if not isinstance(raw, dict):  # a flat list of fields and values
            raw = dict(zip(raw[::2], raw[1::2], strict=True))
        return int(raw.get(b"port", raw.get("port")))

    def failover(self, timeout: float = 30) -> int:
        """``SENTINEL FAILOVER``, then wait until it is over: the sentinel's
        record names the replica (``+switch-master``; during the failover
        ``GET-MASTER-ADDR-BY-NAME`` already names it, while clients are still
        sent to the old master), and the old master has become its replica.
        Returns the new master's port."""
        old = self.master_port()
        with client(self.sentinel) as c:
            c.execute_command("SENTINEL", "FAILOVER", self.name)
        wait_for(lambda: self.master_port() != old, timeout, "+switch-master")
        with client(old) as c:
            wait_for(
                lambda: c.info("replication")["role"] == "slave",
                timeout,
                f"the old master ({old}) to become a replica",
            )
        return self.master_port()
