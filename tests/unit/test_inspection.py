"""Reading dedup keys for the operator commands: parsing and describing, no servers."""

from __future__ import annotations

import pytest

from celery_dedup import inspection, lease
from celery_dedup.inspection import Claim, Holder, KeyState, TaskInfo
from celery_dedup.lease import member
from celery_dedup.store import Layout, glob_escape

NOW = 1_700_000_000_000  # ms of Redis time


def holder(task_id: str, expires: int, host: str = "w1@h", pid: int = 7) -> Holder:
    text = lease.holder(task_id, host, pid, None) + "1"  # one delivery of each
    return Holder(
        text, task_id, host, pid, None, expires, str(expires), (expires - NOW) / 1000
    )


def state(*leases: Holder, claim: str | None = None, fence: int = 5) -> KeyState:
    held_by = Claim(claim, 3000.0) if claim else None
    return KeyState("k" * 32, NOW, held_by, leases, fence)


@pytest.mark.parametrize(
    ("task_id", "thread"),
    [("abc", None), ("a|b:c|9", 140), ("", None)],
)
def test_a_lease_member_is_parsed_back(task_id: str, thread: int | None) -> None:
    text = member(task_id, "w1@host", 4321, thread)
    assert inspection.parse_member(text) == (task_id, "w1@host", 4321, thread)


def test_a_member_without_hostname_has_none() -> None:
    assert inspection.parse_member(member("t", None, 12, None)) == ("t", None, 12, None)


@pytest.mark.parametrize("text", ["garbage", "x:abc|h|1"])
def test_a_member_in_another_form_is_all_task_id(text: str) -> None:
    assert inspection.parse_member(text) == (text, None, None, None)


def test_redis_key_names_are_parsed_under_their_prefix_only() -> None:
    assert Layout("dedup").parse(b"dedup:{ab12}:claim") == (
        "ab12",
        "claim",
    )
    assert Layout("dedup").parse("dedup:{ab12}:done:t-1") == (
        "ab12",
        "done:t-1",
    )
    assert Layout("dedup").parse("other:{ab12}:claim") is None
    assert Layout("a.b").parse("axb:{ab12}:claim") is None


def test_glob_characters_are_escaped() -> None:
    assert glob_escape(r"a*b?[c]\d") == r"a\*b\?\[c\]\\d"


def test_only_a_lease_pushed_forward_or_new_counts_as_renewed() -> None:
    before = state(holder("a", NOW + 2000), holder("b", NOW + 2000))
    after = state(
        holder("a", NOW + 3000),  # renewed
        holder("b", NOW + 2000),  # untouched
        holder("c", NOW + 1000),  # acquired meanwhile
        holder("d", NOW - 1),  # new but already expired: not live
    )
    assert [h.task_id for h in inspection.renewed(before, after)] == ["a", "c"]
    assert inspection.renewed(before, before) == []


def test_watch_time_covers_a_third_of_the_longest_live_lease() -> None:
    assert inspection.watch_time(state(holder("a", NOW + 30_000))) == 11.0
    assert inspection.watch_time(state(holder("a", NOW - 5), claim="a")) == 1.0


def test_held_means_a_claim_or_a_live_lease() -> None:
    assert state(claim="a").held
    assert state(holder("a", NOW + 1)).held
    gone = state(holder("a", NOW - 1))
    assert not gone.held
    assert gone.holds == "-"
    assert gone.involves("a")
    assert state(holder("b", NOW + 9), claim="a").task_ids() == ["a", "b"]


def test_workers_replies_name_the_task_and_its_state() -> None:
    reply = {
        "w1@h": {
            "t1": [
                "active",
                {"name": "jobs.close", "worker_pid": 9, "time_start": 5.0},
            ],
            "t2": ["reserved", {"name": "jobs.open", "worker_pid": None}],
        },
        "w2@h": {},
    }
    found = inspection.tasks_from_workers(reply)
    assert found == {
        "t1": TaskInfo("t1", "jobs.close", "active", "w1@h/9", 5.0, "worker"),
        "t2": TaskInfo("t2", "jobs.open", "reserved", "w1@h", None, "worker"),
    }
    assert found["t1"].age(12.5) == 7.5
    assert inspection.tasks_from_workers(None) == {}


def test_a_key_document_keeps_unknowns_unknown() -> None:
    # Given a claim held by a queued task and a lease by another, running one
    key = state(holder("run", NOW + 2500), claim="queued")
    tasks = {"run": TaskInfo("run", "jobs.close", "active", "w1@h/7", 90.0, "worker")}
    document = inspection.key_document(key, tasks, {"jobs.close": "x_mode"}, 100.0)
    assert document["task"] == "jobs.close"
    assert document["mode"] == "x_mode"
    assert document["holds"] == "claim+lease"
    assert document["claim"] == {"task_id": "queued", "ttl": 3000.0}
    assert document["leases"][0]["ttl"] == 2.5
    queued, running = document["holders"]
    assert queued == {
        "task_id": "queued",
        "holds": ["claim"],
        "name": None,
        "state": None,
        "worker": None,
        "age": None,
        "source": None,
    }
    assert (running["holds"], running["worker"], running["age"]) == (
        ["lease"],
        "w1@h/7",
        10.0,
    )
    # And the table prints a dash for what nobody knows
    lines = inspection.status_lines([document])
    assert lines[0] == "jobs.close: 1 key"
    first, second = (line.split() for line in lines[2:])
    assert first == [key.key, "claim", "x_mode", "queued", "-", "-", "-", "50m00s",
                     "-", "5"]  # fmt: skip
    assert second == [key.key, "lease", "x_mode", "run", "active", "w1@h/7", "10.0s",
                      "-", "2.5s", "5"]  # fmt: skip


def test_keys_of_unknown_tasks_are_listed_last() -> None:
    unknown = inspection.key_document(state(claim="a"), {}, {}, 0.0)
    known = inspection.key_document(
        state(claim="b"), {"b": TaskInfo("b", name="zz.job")}, {}, 0.0
    )
    lines = inspection.status_lines([unknown, known])
    assert [line for line in lines if not line.startswith(" ")] == [
        "zz.job: 1 key",
        "unknown task: 1 key",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0.04, "0.0s"),
        (59.94, "59.9s"),
        (60, "1m00s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (90061, "1d01h"),
    ],
)
def test_durations(seconds: float | None, text: str) -> None:
    assert inspection.duration(seconds) == text
