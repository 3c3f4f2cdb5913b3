"""The test rig: a private redis-server and real ``celery worker`` processes.

Both keep their process handles, so a test can stop, kill (SIGKILL), pause
(SIGSTOP) or restart them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    check: Callable[[], object], timeout: float, what: str, every: float = 0.05
) -> object:
    """Poll ``check`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


class RedisServer:
    """A ``redis-server`` on a free loopback port, owned by the tests."""

    def __init__(self, workdir: Path, *, persistent: bool = False) -> None:
        self.persistent = persistent
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db))

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persistent else "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(self.workdir / f"redis-{self.port}.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = self.client()
        wait_for(lambda: _pings(client), 10, f"redis-server on port {self.port}")
        client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


class Worker:
    """One ``celery worker`` process (prefork by default) on a private queue."""

    def __init__(
        self,
        app_module: str,
        queue: str,
        env: dict[str, str],
        logdir: Path,
        *,
        name: str,
        concurrency: int = 3,
        pool: str = "prefork",
        extra: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.hostname = f"{name}@rig"
        self.logfile = logdir / f"{name}.log"
        self.command = [
            sys.executable, "-m", "celery", "-A", app_module, "worker",
            "--pool", pool, "--concurrency", str(concurrency),
            "--queues", queue, "--hostname", self.hostname,
            "--without-mingle", "--without-gossip", "--without-heartbeat",
            "--loglevel", "INFO", "--logfile", str(self.logfile), *extra,
        ]  # fmt: skip
        # TMPDIR: billiard's pymp-* folders of a SIGKILLed pool go with the test's
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(logdir), **env}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 30) -> Worker:
        with open(self.logfile.with_suffix(".stderr"), "wb") as stderr:
            self.process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # its own process group, children included
            )
        wait_for(self._ready, ready_timeout, f"worker {self.hostname} to be ready")
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"worker {self.hostname} exited:\n{self.log()}")
        return self.logfile.exists() and " ready." in self.logfile.read_text()

    def log(self) -> str:
        parts = [
            p.read_text()
            for p in (self.logfile, self.logfile.with_suffix(".stderr"))
            if p.exists()
        ]
        return "\n".join(parts)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown (SIGTERM); the whole process group is killed after it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.process = None


class Recorder:
    """Reads what ``tests.apps.scenario_app`` bodies wrote about their runs."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def _list(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.client.lrange(name, 0, -1)]

    def runs(self, task: str) -> list[dict[str, Any]]:
        """Finished runs of ``task``: task_id, start, end, pid and extras."""
        return self._list(f"runs:{task}")

    def started(self, task: str) -> list[dict[str, Any]]:
        """Bodies of ``task`` that began (task_id, pid), finished or not."""
        return self._list(f"started:{task}")

    def delivered(self, task: str) -> list[str]:
        """Task ids of every delivery of ``task`` that reached a worker process."""
        return [
            item.decode() for item in self.client.lrange(f"delivered:{task}", 0, -1)
        ]

    def leases_lost(self) -> list[dict[str, Any]]:
        return self._list("lease_lost")


def max_overlap(entries: list[dict[str, Any]]) -> int:
    """The most runs that were inside their bodies at the same moment."""
    events = sorted(
        [(e["start"], 1) for e in entries] + [(e["end"], -1) for e in entries]
    )
    running = most = 0
    for _, step in events:  # at equal times an end (-1) sorts before a start
        running += step
        most = max(most, running)
    return most


def queue_length(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a Redis-broker queue (all its priority lists)."""
    names = [queue, *client.scan_iter(match=f"{queue}\x06\x16*")]
    return sum(int(client.llen(name)) for name in names)


class Beat:
    """One ``celery beat`` process with its own schedule file."""

    def __init__(self, app_module: str, env: dict[str, str], logdir: Path, name: str):
        self.logfile = logdir / f"{name}.log"
        self.command = [
            sys.executable, "-m", "celery", "-A", app_module, "beat",
            "--schedule", str(logdir / f"{name}-schedule"), "--max-interval", "1",
            "--loglevel", "INFO", "--logfile", str(self.logfile),
        ]  # fmt: skip
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Beat:
        self.process = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self

    def ticks(self) -> list[float]:
        """When it sent a due task (epoch seconds, from its log)."""
        if not self.logfile.exists():
            return []
        return [
            datetime.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for line in self.logfile.read_text().splitlines()
            if "Sending due task" in line
        ]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(20)
        self.process = None


def dropped_onto(result: Any, timeout: float = 10) -> str | None:
    """The task id a delivery dropped as a duplicate names in its result
    (a FAILURE with DuplicateTaskError); None if it ended otherwise."""
    from celery_dedup import DuplicateTaskError

    wait_for(result.ready, timeout, f"{result.id} to end")
    error = result.result
    if result.state != "FAILURE" or not isinstance(error, DuplicateTaskError):
        return None
    return error.existing_task_id


#: What ``held`` answers for a key nobody holds.
FREE = {"claim": None, "lease": 0}


def held(client: redis.Redis, task: Any, args: tuple[Any, ...]) -> dict[str, object]:
    """The claim holder and the number of lease holders of ``task(*args)``'s
    key, in the Redis of ``client`` (default key prefix)."""
    key = task.dedup_key_for(args)
    return {
        "claim": client.get(f"dedup:{{{key}}}:claim"),
        "lease": client.zcard(f"dedup:{{{key}}}:lease"),
    }
