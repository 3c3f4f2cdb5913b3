"""celery-dedup on a Redis Cluster of three masters the test starts.

Every script runs on the slot of its dedup key (one hash tag), the status
scan walks every primary, and a script flushed from every node (as after a
restart) is loaded again on the next call.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

from celery_dedup.connection import Backend, get_backend, reset
from celery_dedup.inspection import Inspector
from celery_dedup.lease import member
from celery_dedup.model import ClaimStatus, LeaseStatus, Renewal
from celery_dedup.store import Store
from tests.integration.test_status_cli import dedup, parsed
from tests.redis_topologies import Cluster
from tests.rig import Recorder, RedisServer, Worker

pytestmark = pytest.mark.integration


@pytest.fixture
def backend(cluster: Cluster) -> Iterator[Backend]:
    app = Celery("cluster-test", broker="memory://", set_as_current=False)
    app.conf.dedup_redis_url = cluster.url
    backend = get_backend(app)
    backend.redis.flushall()  # every primary (RedisCluster sends it to all)
    yield backend
    reset(app)


def keys_on_each_master(backend: Backend) -> dict[str, str]:
    """One dedup key per master: node name -> key."""
    found: dict[str, str] = {}
    while len(found) < 3:
        key = uuid.uuid4().hex
        claim = backend.store.names(key).claim
        found.setdefault(backend.redis.get_node_from_key(claim).name, key)
    return found


def lease_cycle(store: Store, key: str) -> None:
    """Claim, acquire, renew and release ``key``, as a task's run does."""
    task_id = uuid.uuid4().hex
    mine, theirs = member(task_id, "h", 1, None), member("other", "h", 2, None)
    assert store.claim(key, task_id, 60).status is ClaimStatus.NEW
    assert store.claim(key, "other", 60).status is ClaimStatus.TAKEN
    acquired = store.acquire(
        key, mine, task_id, ttl=30, max_running=1, fence_ttl=90,
        free_claim=True,
    )  # fmt: skip
    assert acquired.status is LeaseStatus.ACQUIRED and acquired.token > 0
    busy = store.acquire(
        key, theirs, "other", ttl=30, max_running=1, fence_ttl=90,
        free_claim=False,
    )  # fmt: skip
    assert busy.status is LeaseStatus.BUSY and busy.holder == task_id
    assert store.renew(key, mine, 30) is Renewal.RENEWED
    assert store.release(key, mine, task_id, free_claim=True, done_ttl=60)
    assert store.claim(key, task_id, 60).status is ClaimStatus.DONE


def test_every_script_runs_on_the_slot_of_its_key(backend: Backend) -> None:
    keys = keys_on_each_master(backend)
    assert len(keys) == 3
    for key in keys.values():
        lease_cycle(backend.store, key)


def test_the_heartbeat_renews_through_its_own_cluster_client(
    backend: Backend,
) -> None:
    key, held_by = uuid.uuid4().hex, member("t", "h", 1, None)
    backend.store.acquire(
        key, held_by, "t", ttl=30, max_running=1, fence_ttl=90, free_claim=False
    )
    assert backend.heartbeat_redis is not backend.redis
    renewed = backend.store.renew(key, held_by, 30, client=backend.heartbeat_redis)
    assert renewed is Renewal.RENEWED


def test_a_child_forked_while_a_thread_uses_a_node_pool_can_use_the_cluster(
    backend: Backend,
) -> None:
    # Given a client whose node pools have connections (as the worker's main
    # process has), and a thread inside one pool's lock (a deferred release)
    key = next(iter(keys_on_each_master(backend).values()))
    lease_cycle(backend.store, key)
    node = backend.redis.get_node_from_key(backend.store.names(key).claim)
    pool = node.redis_connection.connection_pool
    inside = threading.Event()

    def use_the_pool() -> None:
        with pool._lock:
            inside.set()
            time.sleep(0.5)

    thread = threading.Thread(target=use_the_pool)
    thread.start()
    inside.wait()
    # When the process forks a child (as billiard does) meanwhile
    pid = os.fork()
    if pid == 0:  # the child: the inherited client must work
        try:
            lease_cycle(backend.store, uuid.uuid4().hex)
            lease_cycle(backend.store, key)
        except BaseException:
            os._exit(1)
        os._exit(0)
    thread.join()
    # Then the child used the cluster and exited, rather than waiting forever
    # on a lock its copy of the thread would never release
    deadline = time.monotonic() + 15
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on a lock held at fork()")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_status_scans_every_master(backend: Backend) -> None:
    keys = keys_on_each_master(backend)
    for key in keys.values():
        assert backend.store.claim(key, f"task-{key}", 60).status is ClaimStatus.NEW
    inspector = Inspector(backend.redis, backend.config.key_prefix)
    held = inspector.held()
    assert sorted(s.key for s in held) == sorted(keys.values())
    assert {s.key: s.claim.task_id for s in held if s.claim} == {
        k: f"task-{k}" for k in keys.values()
    }
    some = next(iter(keys.values()))
    state = inspector.key(some)
    assert state is not None and state.claim is not None
    released, _ = inspector.release(state)
    assert released and inspector.key(some) is None
    # inspect reads completion markers in a cluster pipeline (one slot).
    lease_cycle(backend.store, some)
    state = inspector.key(some)
    assert state is not None and len(state.done) == 1 and state.done[0].ttl


def test_status_command_on_a_cluster(
    backend: Backend, cluster: Cluster, redis_server: RedisServer
) -> None:
    keys = keys_on_each_master(backend)
    for key in keys.values():
        backend.store.claim(key, f"task-{key}", 60)
    done = dedup(
        redis_server, "status", "--json", "--no-workers", dedup_url=cluster.url
    )
    assert done.returncode == 0, done.stderr
    assert sorted(k["key"] for k in parsed(done)["keys"]) == sorted(keys.values())


def test_noscript_after_a_flush_on_every_node_is_recovered(backend: Backend) -> None:
    keys = list(keys_on_each_master(backend).values())
    lease_cycle(backend.store, keys[0])
    for node in backend.redis.get_primaries():
        backend.redis.get_redis_connection(node).script_flush()
    for key in keys:  # every script once more, each node without it
        lease_cycle(backend.store, key)
    inspector = Inspector(backend.redis, backend.config.key_prefix)
    for node in backend.redis.get_primaries():
        backend.redis.get_redis_connection(node).script_flush()
    assert [s.key for s in inspector.read(keys)] == keys


@pytest.fixture
def cluster_app(
    scenario_app: Any, redis_server: RedisServer, cluster: Cluster
) -> Iterator[Any]:
    """The scenario app: broker on the rig's Redis, dedup keys on the cluster."""
    scenario_app.configure(redis_server.url(), dedup_url=cluster.url)
    get_backend(scenario_app.app).redis.flushall()
    yield scenario_app
    scenario_app.configure(redis_server.url())


def test_a_dedup_task_enqueues_once(cluster_app: Any, queue: str) -> None:
    task = cluster_app.close_campaign
    results = {n: task.apply_async((n,), queue=queue) for n in range(6)}
    for n, first in results.items():
        again = task.apply_async(kwargs={"campaign_id": n}, queue=queue)
        assert again.deduplicated and again.id == first.id
    backend = get_backend(cluster_app.app)
    nodes = {
        backend.redis.get_node_from_key(
            backend.store.names(task.dedup_key_for((n,))).claim
        ).name
        for n in results
    }
    assert len(nodes) > 1  # the keys really are spread over the masters


def test_a_prefork_worker_runs_leases_on_the_cluster(
    cluster_app: Any,
    cluster: Cluster,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    """Bodies in pool children take, renew (the heartbeat's cluster client)
    and give back leases on keys spread over the masters."""
    workers(concurrency=2, env={"DEDUP_TEST_DEDUP_REDIS_URL": cluster.url})
    task = cluster_app.close_campaign
    options = {"dedup_lock": "until_executed", "dedup_lock_ttl": 1.5}
    results = [task.apply_async((n, 2.5), queue=queue, **options) for n in range(4)]
    assert [r.get(timeout=30) for r in results] == [0, 1, 2, 3]
    runs = recorder.runs("close_campaign")
    assert sorted(r["campaign_id"] for r in runs) == [0, 1, 2, 3]
    assert all(r["lease_valid"] and r["fence"] > 0 for r in runs)  # renewed
    backend = get_backend(cluster_app.app)
    inspector = Inspector(backend.redis, backend.config.key_prefix)
    assert inspector.held() == []  # every claim and lease given back
    again = task.apply_async((0, 2.5), queue=queue, **options)
    assert not again.deduplicated  # the claim is free once the task ran
