"""``celery -A proj dedup release``: free a stuck dedup key, its fence kept.

A lease that is still being renewed belongs to a running body: it is watched
first, and released only with ``--force``.
"""

from __future__ import annotations

from typing import Any, NoReturn

import click
from celery.bin.base import CeleryCommand
from celery.exceptions import CeleryCommandException

from .. import inspection
from ..inspection import Inspector, KeyState
from ._common import EX_REFUSED, echo_json, json_option, option
from .keys import find_keys, get_inspector, redis_errors

_GROUP = "Release Options"

_FREED = "Dedup key {key} was freed meanwhile: nothing left to release"


@click.command(cls=CeleryCommand)
@click.argument("target", metavar="KEY")
@option("-y", "--yes", is_flag=True, group=_GROUP, help="Do not ask for confirmation.")
@option(
    "--force",
    is_flag=True,
    group=_GROUP,
    help="Release even a lease that is being renewed (its body is running).",
)
@option(
    "--watch",
    type=click.FloatRange(min=0),
    default=None,
    group=_GROUP,
    help="Seconds to watch a live lease for renewals "
    "[default: a third of its TTL left, plus 1].",
)
@json_option(_GROUP)
@click.pass_context
def release(
    ctx: click.Context,
    /,
    target: str,
    yes: bool,
    force: bool,
    watch: float | None,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Delete the claim and the lease of a stuck dedup key (KEY or a task id).

    The fencing counter is kept. Exits 1 when it released nothing.
    """
    app = ctx.obj.app
    inspector = get_inspector(app)
    with redis_errors(app):
        state = _releasable(inspector, target)
        if state.live_leases and not force:
            state = _refuse_if_renewed(inspector, state, watch, as_json)
    if not (state.claim or state.leases):
        _release_failed(state, as_json, _FREED.format(key=state.key))
    if not yes and not click.confirm(_question(state), default=False, err=True):
        _release_failed(state, as_json, "Not confirmed: nothing was released")
    with redis_errors(app):
        released, found = inspector.release(state, force=force)
    if released and not (found.claim or found.leases):
        _release_failed(found, as_json, _FREED.format(key=found.key))
    if not released:
        _release_failed(
            found,
            as_json,
            f"Dedup key {state.key} changed since it was read (now: "
            f"{_parts_text(found)}): nothing was released; run the command again",
        )
    if as_json:
        echo_json(_release_document(found, True, force))
    else:
        ctx.obj.echo(
            f"Released dedup key {found.key}: deleted {_parts_text(found)}; "
            f"kept the fence ({found.fence if found.fence is not None else '-'})"
        )


def _releasable(inspector: Inspector, target: str) -> KeyState:
    """The one key ``target`` names that has a claim or a lease to delete."""
    kind, states = find_keys(inspector, target)
    held = [s for s in states if s.claim or s.leases]
    if kind == "task":
        held = [s for s in held if s.involves(target)]
    if not held:
        what = "dedup key" if kind == "key" else "task id"
        raise CeleryCommandException(
            message=f"Nothing to release for {what} {target!r} under prefix "
            f"{inspector.prefix!r}: no claim and no lease",
            exit_code=EX_REFUSED,
        )
    if len(held) > 1:
        keys = ", ".join(s.key for s in held)
        raise CeleryCommandException(
            message=f"Task {target} holds {len(held)} dedup keys ({keys}); "
            "release them one KEY at a time",
            exit_code=EX_REFUSED,
        )
    return held[0]


def _refuse_if_renewed(
    inspector: Inspector, state: KeyState, watch: float | None, as_json: bool
) -> KeyState:
    """Watch the live lease; refuse (exit 1) if a holder renews it."""
    seconds = inspection.watch_time(state) if watch is None else watch
    click.echo(
        f"Watching the lease of {state.key} for up to {seconds:.1f}s for "
        "renewals (--watch to change, --force to skip)...",
        err=True,
    )
    latest, moved = inspector.watch(state, seconds)
    if moved:
        holders = ", ".join(f"task {h.task_id} on {h.worker or '-'}" for h in moved)
        _release_failed(
            latest,
            as_json,
            f"Refusing to release {state.key}: its lease is being renewed by "
            f"{holders}, whose body is running. --force releases it anyway "
            "(the body then loses its lease)",
        )
    return latest


def _release_failed(state: KeyState, as_json: bool, message: str) -> NoReturn:
    if as_json:
        echo_json({**_release_document(state, False, False), "error": message})
    raise CeleryCommandException(message=message, exit_code=EX_REFUSED)


def _release_document(state: KeyState, released: bool, forced: bool) -> dict[str, Any]:
    """The ``release --json`` output: what was (or would have been) deleted."""
    return {
        "key": state.key,
        "released": released,
        "forced": forced,
        "claim": state.claim.task_id if state.claim else None,
        "leases": [h.as_dict() for h in state.leases],
        "fence": state.fence,
        "error": None,
    }


def _question(state: KeyState) -> str:
    return (
        f"Release dedup key {state.key}: delete {_parts_text(state)} "
        f"(the fence is kept)?"
    )


def _parts_text(state: KeyState) -> str:
    """What the claim and lease set of ``state`` hold, in words."""
    parts = []
    if state.claim:
        parts.append(f"the claim of task {state.claim.task_id}")
    if state.leases:
        holders = ", ".join(
            f"task {h.task_id} on {h.worker or '-'}" + ("" if h.live else " (expired)")
            for h in state.leases
        )
        parts.append(f"the lease set ({holders})")
    return " and ".join(parts) or "no claim and no lease"
