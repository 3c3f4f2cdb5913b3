"""The demo's result: a side-by-side table for people, JSON for programs."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from . import app
from .lab import Figures
from .processes import CONCURRENCY
from .runner import LABELS, WORKERS, DemoResult

SCHEMA = 1
COLUMNS = (
    ("executions", "executions"),
    ("max_at_once", "most at once"),
    ("events", "outbox events"),
    ("lost", "tasks lost"),
    ("keys_held", "keys held"),
)


def as_json(result: DemoResult) -> dict[str, Any]:
    """The result as a JSON-ready dict (schema in docs/demo.md)."""
    return {
        "schema": SCHEMA,
        "ok": result.ok,
        "seconds": round(result.seconds, 1),
        "redis": {"url": result.redis_url, "private": result.private_redis},
        "workers": {"count": WORKERS, "concurrency": CONCURRENCY},
        "scenarios": [
            {
                "id": o.scenario.id,
                "title": o.scenario.title,
                "setup": o.scenario.setup,
                "design": o.scenario.design,
                "meets_design": o.meets_design,
                "problem": o.scenario.problem,
                "shows_problem": o.shows_problem,
                **{v: dataclasses.asdict(f) for v, f in o.variants.items()},
            }
            for o in result.outcomes
        ],
    }


def dumps(result: DemoResult) -> str:
    return json.dumps(as_json(result), indent=2)


def _cell(figures: Figures, field: str) -> str:
    value = getattr(figures, field)
    return "-" if value is None else str(value)


def table(result: DemoResult) -> str:
    """The side-by-side table, then what happened in each run."""
    head = f"{'':<20} {'':<12}" + "".join(f"  {t:>{len(t)}}" for _, t in COLUMNS)
    lines = [head + "  DESIGN.md", "-" * (len(head) + 11)]
    for outcome in result.outcomes:
        for n, (variant, figures) in enumerate(outcome.variants.items()):
            title = outcome.scenario.title if n == 0 else ""
            cells = "".join(
                f"  {_cell(figures, field):>{len(t)}}" for field, t in COLUMNS
            )
            verdict = ""
            if variant == app.DEDUP:
                verdict = "met" if outcome.meets_design else "MISSED"
            row = f"{title:<20} {LABELS[variant]:<12}{cells}  {verdict}"
            lines.append(row.rstrip())
    lines.append("")
    for outcome in result.outcomes:
        scenario = outcome.scenario
        lines.append(f"{scenario.title}: {scenario.setup}")
        for variant, figures in outcome.variants.items():
            lines.append(f"  {LABELS[variant]:<12}  {figures.note}")
        lines.append(f"  {'DESIGN.md':<12}  DedupTask: {scenario.design}")
    lines.append("")
    where = "a private redis-server" if result.private_redis else result.redis_url
    lines.append(
        f"{len(result.outcomes)} scenarios in {result.seconds:.0f}s, "
        f"{WORKERS} workers x {CONCURRENCY} processes, {where}, SQLite outbox. "
        "What the columns mean: docs/demo.md."
    )
    return "\n".join(lines)
