"""``celery -A proj dedup release``: free a stuck dedup key, its fence kept.

A lease that is still being renewed belongs to a running body: it is watched
after the confirmation, and released only with ``--force``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import click
from celery.bin.base import CeleryCommand
from celery.exceptions import CeleryCommandException

from .. import inspection
from ..inspection import Holder, Inspector, KeyState
from ._common import (
    EX_REFUSED,
    echo_json,
    json_errors,
    json_option,
    option,
    target_argument,
)
from .keys import dedup_key, find_keys, get_inspector, redis_errors

_GROUP = "Release Options"

_FREED = "Dedup key {key} was freed meanwhile: nothing left to release"


@click.command(cls=CeleryCommand)
@target_argument()
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
    help="Seconds to watch a live lease for renewals, from when it is read "
    "[default: a third of its TTL left, plus 1].",
)
@json_option()
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
    """Delete the claim and the lease of a stuck dedup key; keep its fence.

    KEY_OR_TASK_ID is a dedup key as status shows it (32 hex digits), one of
    its Redis key names (such as dedup:{KEY}:claim), or a task id that holds
    exactly one key.

    A live lease may belong to a running body, which renews it within a third
    of its TTL. Unless --force, the command says how long it will watch the
    lease for a renewal (--watch), asks (unless --yes), then watches: it
    refuses at the first renewal, and releases the key if none comes.

    Exits 1 when it released nothing, 69 when Redis cannot be read, 78 when a
    setting is missing or invalid (with --json, JSON with an "error" then).
    """
    app = ctx.obj.app
    with json_errors(as_json, _release_document(None)) as out:
        inspector = get_inspector(app)
        out["key"] = dedup_key(inspector, target)
        with redis_errors(app):
            state = _releasable(inspector, target)
        out.update(_release_document(state))
        deadline = None
        if state.live_leases and not force:
            deadline = time.monotonic() + _announce_watch(state, watch)
        if not yes:
            _confirm(state)
        with redis_errors(app):
            if deadline is not None:
                _refuse_if_renewed(inspector, state, deadline, out, say=not yes)
            released, found = inspector.release(state, force=force)
        out.update(_release_document(found))
        if not (found.claim or found.leases):
            raise _refusal(_FREED.format(key=found.key))
        if not released:
            raise _refusal(
                f"Dedup key {state.key} changed since it was read (now: "
                f"{_parts_text(found)}): nothing was released; run the command again"
            )
        out.update(released=True, forced=force)
    if as_json:
        echo_json(out)
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
        key = dedup_key(inspector, target)
        what = f"dedup key {key}" if key else f"task id {target}"
        raise _refusal(
            f"Nothing to release for {what} under prefix {inspector.prefix!r}: "
            "no claim and no lease"
        )
    if len(held) > 1:
        keys = ", ".join(s.key for s in held)
        raise _refusal(
            f"Task {target} holds {len(held)} dedup keys ({keys}); "
            "release them one KEY at a time"
        )
    return held[0]


def _announce_watch(state: KeyState, watch: float | None) -> float:
    """Say what the watch of the live lease is for and how long it lasts at
    most; return that time (seconds, counted from the read of ``state``)."""
    renewal = inspection.watch_time(state, margin=0)
    seconds = inspection.watch_time(state) if watch is None else watch
    click.echo(
        f"Dedup key {state.key} has a live lease ({_holders_text(state.live_leases)}):"
        f" a running body renews it within {renewal:.1f}s. Before anything is "
        f"deleted, the lease is watched for up to {seconds:.1f}s from now, and a "
        "renewal refuses the release (--force skips the watch).",
        err=True,
    )
    return seconds


def _refuse_if_renewed(
    inspector: Inspector,
    state: KeyState,
    deadline: float,
    out: dict[str, Any],
    say: bool,
) -> None:
    """Watch the live lease of ``state`` until ``deadline`` (monotonic time);
    refuse (exit 1) at the first renewal. ``out`` gets the latest snapshot."""
    if say:
        left = max(0.0, deadline - time.monotonic())
        click.echo(f"Watching the lease for up to {left:.1f}s...", err=True)
    latest, moved = inspector.watch(state, deadline - time.monotonic())
    out.update(_release_document(latest))
    if moved:
        raise _refusal(
            f"Refusing to release {state.key}: its lease is being renewed by "
            f"{_holders_text(moved)}, whose body is running. --force releases it "
            "anyway (the body then loses its lease)"
        )


def _confirm(state: KeyState) -> None:
    """Ask on stderr; refuse unless the answer is yes."""
    try:
        confirmed = click.confirm(_question(state), default=False, err=True)
    except click.Abort:  # end of input (no terminal) or Ctrl-C
        click.echo(err=True)
        confirmed = False
    if not confirmed:
        raise _refusal("Not confirmed: nothing was released")


def _refusal(message: str) -> CeleryCommandException:
    return CeleryCommandException(message=message, exit_code=EX_REFUSED)


def _release_document(state: KeyState | None) -> dict[str, Any]:
    """The ``release --json`` output: what the key held (what was deleted,
    once ``released``), ``None``/empty before the key is known."""
    return {
        "key": state.key if state else None,
        "released": False,
        "forced": False,
        "claim": state.claim.task_id if state and state.claim else None,
        "leases": [h.as_dict() for h in state.leases] if state else [],
        "fence": state.fence if state else None,
    }


def _question(state: KeyState) -> str:
    return (
        f"Release dedup key {state.key}: delete {_parts_text(state)} "
        f"(the fence is kept)?"
    )


def _holders_text(holders: Sequence[Holder]) -> str:
    return ", ".join(
        f"task {h.task_id} on {h.worker or '-'}" + ("" if h.live else " (expired)")
        for h in holders
    )


def _parts_text(state: KeyState) -> str:
    """What the claim and lease set of ``state`` hold, in words."""
    parts = []
    if state.claim:
        parts.append(f"the claim of task {state.claim.task_id}")
    if state.leases:
        parts.append(f"the lease set ({_holders_text(state.leases)})")
    return " and ".join(parts) or "no claim and no lease"
