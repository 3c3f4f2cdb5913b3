"""How the lease module tells real threads from green ones (gevent, eventlet).

The worker-level behaviour (renewals while a greenlet yields, a lease lost
while it computes, the warning in a gevent worker's log) is in
``tests/scenarios/test_pools.py``; here only the detection and the warning.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types

import pytest

from celery_dedup import lease


def fake_module(name: str, answer: bool, function: str) -> types.ModuleType:
    module = types.ModuleType(name)
    setattr(module, function, lambda _name: answer)
    return module


@pytest.fixture
def no_green(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "gevent.monkey", raising=False)
    monkeypatch.delitem(sys.modules, "eventlet.patcher", raising=False)
    monkeypatch.setattr(lease, "_warned_green", False)


@pytest.mark.usefixtures("no_green")
def test_real_threads_are_not_green() -> None:
    assert lease.green_threads() is None


@pytest.mark.skipif(
    importlib.util.find_spec("gevent") is None, reason="gevent is not installed"
)
def test_gevent_imported_but_not_patching_is_not_green(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gevent.monkey

    monkeypatch.setitem(sys.modules, "gevent.monkey", gevent.monkey)
    assert not gevent.monkey.is_module_patched("threading")
    assert lease.green_threads() is None


@pytest.mark.usefixtures("no_green")
@pytest.mark.parametrize(
    ("module", "function", "library"),
    [
        ("gevent.monkey", "is_module_patched", "gevent"),
        ("eventlet.patcher", "is_monkey_patched", "eventlet"),
    ],
)
def test_patched_threading_is_green_and_warned_of_once(
    module: str,
    function: str,
    library: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setitem(sys.modules, module, fake_module(module, True, function))
    assert lease.green_threads() == library
    with caplog.at_level(logging.WARNING, logger=lease.__name__):
        lease.warn_if_green()
        lease.warn_if_green()
    [warning] = caplog.records
    message = warning.getMessage()
    assert f"threads are {library} greenlets" in message
    assert "LockLostError" in message
    assert "dedup_lock_ttl" in message


@pytest.mark.usefixtures("no_green")
def test_no_warning_for_real_threads(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=lease.__name__):
        lease.warn_if_green()
    assert caplog.records == []
