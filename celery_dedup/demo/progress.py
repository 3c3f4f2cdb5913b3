"""Progress while the demo runs: a live line on a terminal, plain lines elsewhere.

On a TTY each scenario variant gets one line, redrawn in place with a spinner,
its elapsed time and what it is doing, then left with its summary. Anywhere
else (a pipe, a log, CI) every step is one line of its own.
"""

from __future__ import annotations

import shutil
import threading
import time
from typing import TextIO


class Progress:
    """Writes progress to ``stream`` (stderr, so stdout stays for results)."""

    SPINNER = "|/-\\"

    def __init__(self, stream: TextIO, *, live: bool | None = None) -> None:
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self._lock = threading.Lock()
        self._label = ""
        self._status = ""
        self._started = 0.0
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    def say(self, message: str) -> None:
        """A line of its own (set-up and clean-up)."""
        with self._lock:
            self._write(message + "\n")

    def start(self, title: str, variant: str, status: str = "starting") -> None:
        """Begin the line of one scenario variant."""
        self.finish_line()
        label = f"{title:<20} {variant:<12}" if self.live else f"{title}, {variant}"
        with self._lock:
            self._label, self._status = label, status
            self._started = time.monotonic()
            if not self.live:
                self._write(f"{label}: {status}\n")
                return
            self._draw()
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def step(self, status: str) -> None:
        """What the current scenario variant does now."""
        with self._lock:
            self._status = status
            if self.live:
                self._draw()
            else:
                self._write(f"{self._label}: {status}\n")

    def done(self, summary: str) -> None:
        """End the current line with its outcome."""
        self._halt()
        with self._lock:
            elapsed = time.monotonic() - self._started
            if self.live:
                self._write(f"\r\x1b[K{self._label}  {elapsed:4.1f}s  {summary}\n")
            else:
                self._write(f"{self._label}: done in {elapsed:.1f}s: {summary}\n")
            self._label = ""

    def finish_line(self) -> None:
        """End a live line left open (after an error or an interrupt)."""
        self._halt()
        with self._lock:
            if self.live and self._label:
                self._write("\n")
            self._label = ""

    def _halt(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(1)
            self._ticker = None

    def _tick(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                if self._label:
                    self._draw()

    def _draw(self) -> None:
        elapsed = time.monotonic() - self._started
        spin = self.SPINNER[int(elapsed * 5) % len(self.SPINNER)]
        line = f"{self._label} {spin} {elapsed:4.1f}s  {self._status}"
        # A line wider than the terminal wraps, and "\r" cannot redraw it.
        width = shutil.get_terminal_size().columns - 1
        self._write(f"\r\x1b[K{line[:width]}")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
