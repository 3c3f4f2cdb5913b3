"""A first look at celery-dedup: the same job enqueued five times runs once.

    python3 examples/first_duplicate.py

Needs nothing running: it starts a private redis-server on a free loopback port
and a real `celery worker`, and stops both when it is done.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from celery import Celery

from celery_dedup import DedupTask

REDIS_URL = os.environ.get("FIRST_DUPLICATE_REDIS", "redis://127.0.0.1:6379/0")
app = Celery("first_duplicate", broker=REDIS_URL, backend=REDIS_URL)


@app.task(base=DedupTask, bind=True, dedup_key=("campaign_id",))
def close_campaign(self: DedupTask, campaign_id: int) -> str:
    time.sleep(1)  # the work: find the campaign's winners
    return f"campaign {campaign_id} closed by {self.request.hostname}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed: run scripts/bootstrap first")
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    workdir = tempfile.mkdtemp(prefix="first-duplicate-")
    redis = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    env = {**os.environ, "FIRST_DUPLICATE_REDIS": url}
    worker = None
    try:
        time.sleep(0.3)
        app.conf.update(broker_url=url, result_backend=url)
        print("Five calls for campaign 42, as five containers would make them:")
        results = [close_campaign.delay(42) for _ in range(5)]
        for n, result in enumerate(results, 1):
            verdict = "deduplicated" if result.deduplicated else "published"
            print(f"  call {n}: {verdict:<12} task {result.id}")
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "first_duplicate", "worker",
             "--concurrency", "2", "--loglevel", "WARNING", "--without-mingle",
             "--without-gossip"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        print("A worker with two processes runs the queue...")
        print(f"  {results[0].get(timeout=60)}")
        again = close_campaign.delay(42)
        print(
            "Once it finished, the next call is published again: "
            f"deduplicated={again.deduplicated}"
        )
        again.get(timeout=60)
        print("1 execution for 5 calls, then 1 more after the first finished.")
    finally:
        for process in (worker, redis):
            if process is not None:
                process.terminate()
                process.wait(20)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
