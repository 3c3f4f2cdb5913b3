"""Job ownership (S11): every worker consuming a queue registers the same tasks.

When two services consume one queue, each message goes to whichever worker
takes it first. A task only one service registers is then dropped as
"unregistered" whenever the other service receives it, and a name both
register runs whichever implementation happens to win: seed 001's stub
swallowed the real parser's jobs.

:func:`analyse` turns the replies of ``app.control.inspect().registered()``
and ``.active_queues()`` into a :class:`FleetReport`. It does no I/O, so the
rule can be tested without a broker.

The rule, per queue: the workers consuming it (as ``active_queues`` reports,
whatever ``-Q`` or ``task_queues`` said) must register the same set of task
names, Celery's own ``celery.*`` tasks left out. Which tasks are routed to a
queue is known only to the producers, so a worker that registers a task it
never receives still counts; and names are compared, not code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

BUILTIN_PREFIX = "celery."


@dataclasses.dataclass(frozen=True)
class Conflict:
    """A task some workers of a queue register and others do not."""

    task: str
    served_by: tuple[str, ...]
    missing_from: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "served_by": list(self.served_by),
            "missing_from": list(self.missing_from),
        }


@dataclasses.dataclass(frozen=True)
class QueueReport:
    """The workers of one queue and the tasks on which they disagree.

    ``shared`` names the tasks every worker registers although their task
    sets differ: two services each claim them, and if their implementations
    differ one service swallows the other's jobs (seed 001). It is set only
    when there are conflicts, so it never fails a check on its own.
    """

    name: str
    workers: tuple[str, ...]
    conflicts: tuple[Conflict, ...]
    shared: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.conflicts

    def as_dict(self) -> dict[str, Any]:
        return {
            "workers": list(self.workers),
            "conflicts": [conflict.as_dict() for conflict in self.conflicts],
            "shared": list(self.shared),
        }


@dataclasses.dataclass(frozen=True)
class FleetReport:
    """Every queue the answering workers consume, sorted by name.

    ``unchecked`` lists workers that answered one inspection but not the
    other (too slow for the timeout, or started in between): their tasks or
    queues are unknown, so the fleet is not reported clean.
    """

    workers: tuple[str, ...]
    queues: tuple[QueueReport, ...]
    unchecked: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Workers answered, none was left unchecked and no queue conflicts."""
        return (
            bool(self.workers)
            and not self.unchecked
            and all(queue.ok for queue in self.queues)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "workers": list(self.workers),
            "queues": {queue.name: queue.as_dict() for queue in self.queues},
            "unchecked": list(self.unchecked),
        }

    def describe(self) -> list[str]:
        """The report as lines of text for a person."""
        lines = []
        for queue in self.queues:
            count = len(queue.workers)
            lines.append(
                f"queue {queue.name}: {count} worker{'' if count == 1 else 's'} "
                f"({', '.join(queue.workers)}): "
                + ("ok" if queue.ok else "their registered tasks differ")
            )
            lines.extend(
                f"  {c.task}: registered by {', '.join(c.served_by)}; "
                f"not by {', '.join(c.missing_from)}, which drop it as unregistered"
                for c in queue.conflicts
            )
            if queue.shared:
                lines.append(
                    "  registered by every worker, so whichever takes a message "
                    f"runs its own code: {', '.join(queue.shared)}"
                )
        lines.extend(
            f"worker {name}: answered only one inspection, not checked "
            "(raise --timeout?)"
            for name in self.unchecked
        )
        return lines


def task_names(reply: Iterable[str]) -> frozenset[str]:
    """The task names of one worker's ``registered()`` reply, builtins left out.

    Celery appends task details to a name (``"proj.add [rate_limit=10/m]"``);
    only the name is kept.
    """
    names = (entry.split(" [", 1)[0] for entry in reply)
    return frozenset(name for name in names if not name.startswith(BUILTIN_PREFIX))


def analyse(
    registered: Mapping[str, Sequence[str]] | None,
    active_queues: Mapping[str, Sequence[Mapping[str, Any]]] | None,
) -> FleetReport:
    """Check the ownership rule against the workers' inspect replies.

    ``registered`` maps a worker to its task names, ``active_queues`` maps a
    worker to the queues it consumes (dicts with a ``"name"``); ``None``, as
    ``inspect()`` returns when no worker replies, counts as no workers.
    """
    registered = registered or {}
    active_queues = active_queues or {}
    answered = set(registered) | set(active_queues)
    complete = set(registered) & set(active_queues)
    tasks = {worker: task_names(registered[worker]) for worker in complete}
    consumers: dict[str, list[str]] = {}
    for worker in sorted(complete):
        for queue in {str(q["name"]) for q in active_queues[worker]}:
            consumers.setdefault(queue, []).append(worker)
    return FleetReport(
        workers=tuple(sorted(answered)),
        queues=tuple(
            _queue_report(name, {w: tasks[w] for w in consumers[name]})
            for name in sorted(consumers)
        ),
        unchecked=tuple(sorted(answered - complete)),
    )


def _queue_report(name: str, tasks: Mapping[str, frozenset[str]]) -> QueueReport:
    workers = tuple(tasks)  # already sorted
    every = frozenset.intersection(*tasks.values())
    conflicts = tuple(
        Conflict(
            task=task,
            served_by=tuple(w for w in workers if task in tasks[w]),
            missing_from=tuple(w for w in workers if task not in tasks[w]),
        )
        for task in sorted(frozenset.union(*tasks.values()) - every)
    )
    shared = tuple(sorted(every)) if conflicts else ()
    return QueueReport(name, workers, conflicts, shared)
