"""The incidents of DESIGN.md that the demo replays: S1, S3, S4, S5 and S9.

Each ``play`` function runs one variant (plain Celery or DedupTask: the same
body, see :mod:`.app`) on the demo's workers and returns its figures. They are
shortened versions of ``tests/scenarios/``: the same steps, fewer seconds.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable

from . import record
from .app import PLAIN, task_name
from .lab import Figures, Run
from .settings import SCENARIO_IDS


def duplicate_burst(run: Run) -> Figures:
    """S1: 30 identical calls from 3 processes in 3 s; the body takes 0.5 s."""
    run.lab.progress.step("3 processes publish the same call 30 times in 3 s")
    kwargs = {"run": run.name, "job": "campaign:75", "pause": 0.5}
    calls = run.lab.publish_burst(
        task_name(run.variant, "close_campaign"), kwargs, each=10, span=3.0
    )
    figures = run.figures
    figures.calls = len(calls)
    figures.published = len({c["id"] for c in calls if not c["deduplicated"]})
    figures.deduplicated = sum(c["deduplicated"] for c in calls)
    run.lab.progress.step(f"{figures.published} published; waiting for their runs")
    run.wait(lambda: run.settled(figures.published), 30)
    figures = run.measure("campaign:75")
    figures.note = (
        f"{figures.published} of {figures.calls} calls published; "
        f"{figures.executions} runs, up to {figures.max_at_once} at once"
    )
    return figures


def monitor_stacking(run: Run) -> Figures:
    """S3: a 1.5 s monitor enqueued every 0.5 s for 6 s."""
    backlog = []
    start = time.monotonic()
    for tick in range(12):
        run.call("monitor", "monitor", pause=1.5, write=False)
        time.sleep(max(0.0, start + 0.5 * (tick + 1) - time.monotonic()))
        backlog.append(run.lab.queue_length())
        running = len(run.started()) - len(run.finished())
        run.lab.progress.step(
            f"enqueued {tick + 1}/12; {running} running, {backlog[-1]} waiting"
        )
    run.wait(lambda: run.settled(run.figures.published), 20)
    figures = run.measure(None)
    figures.backlog_max = max(backlog)
    figures.note = (
        f"{figures.executions} runs for 12 ticks, up to {figures.max_at_once} "
        f"at once; at most {figures.backlog_max} waiting"
    )
    return figures


def redelivery(run: Run) -> Figures:
    """S4: a 4 s task (acks_late) that the broker redelivers while it runs."""
    run.call("long_report", "report:4", pause=4.0)
    first = run.first_body()
    run.lab.progress.step("running; the broker redelivers it after 1 s")
    run.sleep_until(first["start"] + 1.2)
    for _ in range(3):  # again only if a worker's restore pass held the mutex
        run.lab.redeliver()
        if run.wait(lambda: len(run.entries(record.DELIVERED)) >= 2, 3.0):
            break
    run.lab.progress.step("redelivered; waiting for the original to finish")
    if run.variant == PLAIN:
        run.wait(lambda: len(run.finished()) >= 2, 20)
    else:  # the copy waits for the original, then is dropped
        run.wait(lambda: run.finished() and run.entries(record.DROPPED), 20)
    figures = run.measure("report:4")
    if figures.executions > 1:
        figures.note = "redelivered while it ran: the copy ran a second time"
    else:
        figures.note = (
            "redelivered while it ran: the copy waited for the original and "
            f"was dropped ({figures.deliveries} deliveries, 1 run)"
        )
    return figures


def worker_killed(run: Run) -> Figures:
    """S5: the process running a 3 s task (acks_late, reject_on_worker_lost)
    is killed 1 s into the body."""
    run.call("fragile_export", "export:5", pause=3.0)
    first = run.first_body()
    run.sleep_until(first["start"] + 1.0)
    run.kill(int(first["pid"]))
    run.lab.progress.step(f"killed pid {first['pid']} mid-body; waiting for a rerun")
    run.wait(lambda: any(f["outcome"] == "done" for f in run.finished()), 20)
    figures = run.measure("export:5")
    if figures.lost:
        figures.note = "killed mid-body: the task was lost"
    else:
        figures.note = (
            "killed mid-body: requeued (acks_late, reject_on_worker_lost) "
            f"and completed {figures.completed}x"
        )
    return figures


def zombie(run: Run) -> Figures:
    """S9: a body paused past its 1.5 s lease while a second one runs."""
    run.call("find_winners", "campaign:9", pause=2.0)
    pid = int(run.first_body()["pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        run.lab.progress.step(f"paused pid {pid} before its write, for 2.5 s")
        time.sleep(2.5)
        run.call("find_winners", "campaign:9", pause=0.1)
        run.lab.progress.step("a second run of the job writes meanwhile")
        run.wait(run.finished, 15)
    finally:
        os.kill(pid, signal.SIGCONT)
    run.lab.progress.step("the paused one wakes up and writes")
    run.wait(lambda: len(run.finished()) >= 2, 15)
    figures = run.measure("campaign:9")
    verdict = "was rejected (LockLostError)" if figures.rejected else "committed"
    figures.note = (
        f"the zombie woke up and its write {verdict}: {figures.events} "
        f"event(s), {figures.business_rows} business row(s)"
    )
    return figures


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One incident: how to play it and what each variant should show."""

    id: str
    title: str
    setup: str
    play: Callable[[Run], Figures]
    #: DESIGN.md's promise for DedupTask, and its check.
    design: str
    meets_design: Callable[[Figures], bool]
    #: What goes wrong with plain Celery, and its check (None: nothing shown).
    problem: str
    shows_problem: Callable[[Figures], bool] | None


SCENARIOS: dict[str, Scenario] = {
    s.id: s
    for s in (
        Scenario(
            "s1",
            "S1 duplicate burst",
            "30 identical calls from 3 processes in 3 s; the body takes 0.5 s",
            duplicate_burst,
            "never two at once, 1 outbox event",
            lambda f: f.max_at_once == 1 and f.events == 1 and f.keys_held == 0,
            "the job runs many times, in parallel, one event per run",
            lambda f: f.executions > 1 or f.max_at_once > 1,
        ),
        Scenario(
            "s3",
            "S3 monitor stacking",
            "a 1.5 s monitor enqueued every 0.5 s for 6 s",
            monitor_stacking,
            "never two at once, no backlog growth",
            lambda f: f.max_at_once == 1 and (f.backlog_max or 0) <= 1,
            "runs stack up",
            lambda f: f.max_at_once > 1,
        ),
        Scenario(
            "s4",
            "S4 redelivered task",
            "a 4 s task (acks_late) redelivered by the broker while it runs",
            redelivery,
            "1 execution; the redelivered copy is dropped",
            lambda f: f.executions == 1 and f.events == 1 and f.keys_held == 0,
            "the redelivered copy runs again, beside the original",
            lambda f: f.executions >= 2,
        ),
        Scenario(
            "s5",
            "S5 worker killed",
            "the process running a 3 s task is SIGKILLed 1 s in "
            "(acks_late, reject_on_worker_lost)",
            worker_killed,
            "not lost: completes once, no key left held",
            lambda f: f.completed == 1 and f.lost == 0 and f.keys_held == 0,
            "acks_late + reject_on_worker_lost requeue it (early acks lose it)",
            None,
        ),
        Scenario(
            "s9",
            "S9 zombie worker",
            "a body paused (SIGSTOP) past its 1.5 s lease while a second one "
            "runs: two bodies at once in both variants",
            zombie,
            "the zombie's write is rejected: exactly 1 event",
            lambda f: f.events == 1 and f.business_rows == 1 and f.rejected == 1,
            "the zombie commits too: 2 events, 2 business rows",
            lambda f: (f.events or 0) >= 2,
        ),
    )
}
if tuple(SCENARIOS) != SCENARIO_IDS:  # the command line offers SCENARIO_IDS
    raise RuntimeError(f"SCENARIO_IDS should be {tuple(SCENARIOS)}")
