"""celery-dedup on a master found through Sentinel, across a failover.

Each test starts one master, one replica and one sentinel, takes claims and
leases (through the store, or a prefork worker), fails over to the replica,
and shows them working against the new master: the replicated keys are
there, and new claims and leases are taken.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

from celery_dedup.connection import Backend, get_backend
from celery_dedup.lease import member
from celery_dedup.model import ClaimStatus, LeaseStatus, Renewal
from celery_dedup.store import NotReplicated, Store
from tests.redis_topologies import SentinelSet, client
from tests.rig import Recorder, RedisServer, Worker

pytestmark = pytest.mark.integration


@pytest.fixture
def sentinels() -> Iterator[SentinelSet]:
    started = SentinelSet("m").start()
    yield started
    started.stop()


def backend_of(url: str, **conf: Any) -> Backend:
    app = Celery("sentinel-test", broker="memory://", set_as_current=False)
    app.conf.update(dedup_redis_url=url, **conf)
    return get_backend(app)


@pytest.fixture
def backend(sentinels: SentinelSet) -> Iterator[Backend]:
    backend = backend_of(sentinels.url)
    yield backend
    backend.close()


def test_claims_and_leases_survive_a_failover(
    sentinels: SentinelSet, backend: Backend
) -> None:
    store = backend.store
    old_key, task_id = uuid.uuid4().hex, uuid.uuid4().hex
    held_by = member(task_id, "h", 1, None)
    assert store.claim(old_key, task_id, 60).status is ClaimStatus.NEW
    acquired = store.acquire(
        old_key, held_by, task_id, ttl=30, max_running=1, fence_ttl=90,
        free_claim=False,
    )  # fmt: skip
    assert acquired.status is LeaseStatus.ACQUIRED
    # WAIT: the writes reached the replica, so the failover cannot lose them.
    assert backend.redis.execute_command("WAIT", 1, 5000) == 1
    before = sentinels.master_port()

    after = sentinels.failover()

    assert after != before and after == sentinels.replica
    assert store.claim(old_key, "other", 60).holder == task_id  # replicated
    busy = store.acquire(
        old_key, member("other", "h", 2, None), "other", ttl=30, max_running=1,
        fence_ttl=90, free_claim=False,
    )  # fmt: skip
    assert busy.status is LeaseStatus.BUSY and busy.holder == task_id
    heartbeat = backend.heartbeat_redis
    assert store.renew(old_key, held_by, 30, client=heartbeat) is Renewal.RENEWED
    new_key = uuid.uuid4().hex
    assert store.claim(new_key, task_id, 60).status is ClaimStatus.NEW
    again = store.acquire(
        new_key, member(task_id, "h", 1, None), task_id, ttl=30, max_running=1,
        fence_ttl=90, free_claim=True,
    )  # fmt: skip
    # The fence of a new key on the new master still rises past the old one.
    assert again.status is LeaseStatus.ACQUIRED and again.token > acquired.token
    assert backend.redis.connection_pool.get_master_address()[1] == after


def test_celery_sentinel_url_with_the_master_in_options(
    sentinels: SentinelSet,
) -> None:
    url = f"sentinel://127.0.0.1:{sentinels.sentinel};sentinel://127.0.0.1:1/0"
    backend = backend_of(url, dedup_redis_options={"master_name": "m"})
    try:
        key = uuid.uuid4().hex
        assert backend.store.claim(key, "t", 60).status is ClaimStatus.NEW
        assert backend.store.claim(key, "u", 60).status is ClaimStatus.TAKEN
    finally:
        backend.close()


def test_a_prefork_worker_follows_a_failover(
    scenario_app: Any,
    redis_server: RedisServer,
    sentinels: SentinelSet,
    workers: Callable[..., Worker],
    recorder: Recorder,
    queue: str,
) -> None:
    scenario_app.configure(redis_server.url(), dedup_url=sentinels.url)
    try:
        workers(concurrency=2, env={"DEDUP_TEST_DEDUP_REDIS_URL": sentinels.url})
        task = scenario_app.close_campaign
        options = {"dedup_lock_ttl": 1.5}
        results = [task.apply_async((n, 2.5), queue=queue, **options) for n in (1, 2)]
        again = task.apply_async((1, 2.5), queue=queue, **options)
        assert again.deduplicated and again.id == results[0].id
        assert [r.get(timeout=30) for r in results] == [1, 2]
        # The worker's clients (parent and pool children) follow a failover.
        sentinels.failover()
        after = [task.apply_async((n, 2.5), queue=queue, **options) for n in (3, 4)]
        assert [r.get(timeout=30) for r in after] == [3, 4]
        runs = recorder.runs("close_campaign")
        assert len(runs) == 4
        assert all(r["lease_valid"] and r["fence"] > 0 for r in runs)  # renewed
        with client(sentinels.master_port()) as master:
            assert master.keys("dedup:*:claim") == []  # given back
            assert master.keys("dedup:*:lease") == []
            assert len(master.keys("dedup:*:done:*")) == 4
    finally:
        scenario_app.configure(redis_server.url())


# -- dedup_lease_replicas: lease writes a failover cannot lose -----------------


def test_lease_writes_wait_for_the_replica(sentinels: SentinelSet) -> None:
    backend = backend_of(sentinels.url, dedup_lease_replicas=1)
    try:
        store, key, task_id = backend.store, uuid.uuid4().hex, uuid.uuid4().hex
        held_by = member(task_id, "h", 1, None)
        acquired = store.acquire(
            key, held_by, task_id, ttl=30, max_running=1, fence_ttl=90,
            free_claim=False,
        )  # fmt: skip
        assert acquired.status is LeaseStatus.ACQUIRED
        renewal = store.renew(key, held_by, 30, client=backend.heartbeat_redis)
        assert renewal is Renewal.RENEWED
        # the replica has both writes as soon as they are answered
        with client(sentinels.replica) as replica:
            expiry = replica.zscore(store.names(key).lease, held_by)
        with client(sentinels.master) as master:
            assert expiry == master.zscore(store.names(key).lease, held_by)
    finally:
        backend.close()


def test_a_lease_no_replica_acknowledged_is_given_back(
    redis_server: RedisServer,
) -> None:
    # Given a Redis without replicas, and a setting asking for one
    backend = backend_of(
        redis_server.url(), dedup_lease_replicas=1, dedup_lease_replicas_timeout=0.2
    )
    try:
        store, key, task_id = backend.store, uuid.uuid4().hex, uuid.uuid4().hex
        held_by = member(task_id, "h", 1, None)
        # When a task takes the lease (and the claim with it)
        with pytest.raises(NotReplicated, match="reached 0 of 1 replica"):
            store.acquire(
                key, held_by, task_id, ttl=30, max_running=1, fence_ttl=90,
                free_claim=False, claim_ttl=60,
            )  # fmt: skip
        # Then it holds neither: the lease was given back, the claim freed
        names = store.names(key)
        assert not redis_server.client().exists(names.lease, names.claim)
        # and a renewal no replica has is an error too (the heartbeat retries)
        plain = Store(redis_server.client(), "dedup")
        plain.acquire(
            key, held_by, task_id, ttl=30, max_running=1, fence_ttl=90,
            free_claim=False,
        )  # fmt: skip
        with pytest.raises(NotReplicated, match="renewal"):
            store.renew(key, held_by, 30)
    finally:
        backend.close()
