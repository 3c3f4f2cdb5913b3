"""The processes the demo starts: a private redis-server and celery workers.

Each runs in its own session (process group), so that Ctrl-C in the terminal
reaches only the demo, and the demo ends each whole group, pool children
included, in its ``finally``. Nothing is left running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

import redis

import celery_dedup

#: Where ``celery_dedup`` is importable from, for the child processes.
SOURCE_ROOT: Final = str(Path(celery_dedup.__file__).resolve().parent.parent)

INSTALL_HINT: Final = """\
redis-server is not on PATH, and the demo starts a private Redis with it.
Install it:
  Debian/Ubuntu:  sudo apt-get install redis-server
  macOS:          brew install redis
or use a Redis you already run (the demo writes under its own key prefix and
deletes what it wrote):
  celery-dedup demo --redis-url redis://localhost:6379/15"""


#: Pool processes of each worker.
CONCURRENCY: Final = 3


class DemoError(Exception):
    """The demo cannot run here; the message says why and what to do."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``check`` until it returns something truthy; raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def _interrupts_after() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them.

    A Ctrl-C between a child's fork and its registration would leave a
    process that no ``finally`` knows to kill.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, _: object) -> None:
        held.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if held:
            signal.raise_signal(held[0])


class Processes:
    """Every process the demo started, each the leader of its own group."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (SOURCE_ROOT, os.environ.get("PYTHONPATH")) if p
            ),
            # Temporary files of the children (billiard's pymp-* folders) go
            # into the demo's folder, removed with it even after a SIGKILL.
            "TMPDIR": str(workdir),
        }
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        argv: Sequence[str],
        *,
        name: str,
        stdout: int | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the demo folder, in a new session; its stderr goes
        to ``<name>.stderr`` there (see :meth:`stderr`)."""
        with open(self.workdir / f"{name}.stderr", "wb") as stderr, _interrupts_after():
            process = subprocess.Popen(
                list(argv),
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
            self.started.append(process)  # before any Ctrl-C: never untracked
        return process

    def stderr(self, name: str) -> str:
        """What the process started as ``name`` wrote to its stderr."""
        path = self.workdir / f"{name}.stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    def end(self, process: subprocess.Popen[bytes]) -> None:
        """Kill ``process`` and its whole group, and reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        if process in self.started:
            self.started.remove(process)

    def end_all(self) -> None:
        """Kill every group still running (newest first)."""
        for process in reversed(list(self.started)):
            self.end(process)


def start_redis(processes: Processes) -> str:
    """Start a private ``redis-server`` on a free loopback port; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise DemoError(INSTALL_HINT)
    port = free_port()
    processes.spawn(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(processes.workdir),
         "--logfile", str(processes.workdir / "redis.log")],
        name="redis",
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        wait_for(lambda: _pings(client), 10, f"redis-server on port {port}")
    finally:
        client.close()
    return url


def check_redis(url: str) -> None:
    """Fail clearly, at once, if the Redis at ``url`` does not answer."""
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise DemoError(f"cannot reach the Redis at {url}: {exc}") from exc
    finally:
        client.close()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


class Worker:
    """One ``celery -A celery_dedup.demo.app worker`` (prefork) process."""

    def __init__(self, processes: Processes, name: str, queue: str) -> None:
        self.processes = processes
        self.name = name
        self.logfile = processes.workdir / f"{name}.log"
        self.process = processes.spawn(
            [sys.executable, "-m", "celery", "-A", "celery_dedup.demo.app",
             "worker", "--pool", "prefork", "--concurrency", str(CONCURRENCY),
             "--queues", queue, "--hostname", f"{name}@demo",
             "--without-mingle", "--without-gossip", "--without-heartbeat",
             "--loglevel", "INFO", "--logfile", str(self.logfile)],
            name=name,
        )  # fmt: skip

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise DemoError(
                f"worker {self.name} exited at start-up; its log:\n{self.log()}"
            )
        return " ready." in self.log()

    def log(self) -> str:
        log = self.logfile.read_text() if self.logfile.exists() else ""
        return log + self.processes.stderr(self.name)
