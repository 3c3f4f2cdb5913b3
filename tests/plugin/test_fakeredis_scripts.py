"""Every Lua script of :class:`celery_dedup.store.Store` answers on fakeredis
(the in-memory mode of ``celery_dedup.testing``) as on a real Redis: the same
assertions run on both. The scripts read ``TIME`` and work on sorted sets
(``ZADD``, ``ZRANGE ... WITHSCORES``, ``ZREMRANGEBYSCORE``, ``ZSCORE``)."""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest
import redis
from celery import Celery

from celery_dedup import DedupTask
from celery_dedup.connection import get_backend, reset, use_client
from celery_dedup.inspection import Inspector
from celery_dedup.lease import member
from celery_dedup.model import ClaimStatus, LeaseStatus, Renewal
from celery_dedup.store import Acquired, Store
from celery_dedup.testing import MEMORY_URL


@pytest.fixture(
    params=["fakeredis", pytest.param("redis", marks=pytest.mark.integration)]
)
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    if request.param == "redis":
        yield request.getfixturevalue("redis_client")
        return
    fake = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield fake
    fake.close()


@pytest.fixture
def store(client: redis.Redis) -> Store:
    return Store(client, "t")


def acquire(
    store: Store, who: str, task_id: str, *, max_running: int = 1, claim_ttl: float = 0
) -> Acquired:
    return store.acquire(
        "k",
        who,
        task_id,
        ttl=10,
        max_running=max_running,
        fence_ttl=60,
        free_claim=False,
        claim_ttl=claim_ttl,
    )


def test_the_claim_scripts(store: Store, client: redis.Redis) -> None:
    assert store.claim("k", "a", 60).status is ClaimStatus.NEW
    assert store.claim("k", "a", 120).status is ClaimStatus.OWN
    assert 60_000 < client.pttl(store.names("k").claim) <= 120_000
    taken = store.claim("k", "b", 60)
    assert (taken.status, taken.holder) == (ClaimStatus.TAKEN, "a")
    assert store.confirm("k", "a", 300)
    assert client.pttl(store.names("k").claim) > 120_000
    assert not store.confirm("k", "b", 300)
    assert not store.release_claim("k", "b")
    assert store.release_claim("k", "a")
    assert store.claim("k", "b", 60).status is ClaimStatus.NEW


def test_the_lease_scripts(store: Store, client: redis.Redis) -> None:
    a1, a2, b = member("a", "h", 1, None), member("a", "h", 2, None), "b-member"
    first = acquire(store, a1, "a")
    assert first.status is LeaseStatus.ACQUIRED
    same = acquire(store, a2, "a")
    assert same.status is LeaseStatus.SAME_TASK
    busy = acquire(store, b, "b")
    assert busy.status is LeaseStatus.BUSY
    assert busy.holder == "a"
    assert 9 < busy.wait <= 10
    second = acquire(store, b, "b", max_running=2)
    assert second.status is LeaseStatus.ACQUIRED
    assert second.token > first.token > 0

    assert store.renew("k", a1, 30) is Renewal.RENEWED
    expiry = client.zscore(store.names("k").lease, a1)
    seconds, micros = client.time()
    assert expiry is not None
    assert 29_000 < expiry - (seconds * 1000 + micros // 1000) <= 30_000
    assert store.release("k", a1, "a", free_claim=True, done_ttl=60)
    assert not store.release("k", a1, "a", free_claim=True, done_ttl=60)
    assert store.renew("k", a1, 30) is Renewal.LOST
    done = acquire(store, a2, "a")
    assert done.status is LeaseStatus.DONE
    assert store.claim("k", "a", 60).status is ClaimStatus.DONE

    # A dead process's leases, given back by its holder prefix.
    assert store.release("k", "b-", "b", free_claim=False, done_ttl=0, by_holder=True)
    client.delete(store.names("k").lease, store.names("k").fence)
    assert store.renew("k", b, 30) is Renewal.VANISHED


def test_a_claim_taken_at_execution(store: Store, client: redis.Redis) -> None:
    client.set(store.names("k").claim, "other")
    claimed = acquire(store, "m", "a", claim_ttl=60)
    assert claimed.status is LeaseStatus.CLAIMED
    client.delete(store.names("k").claim)
    took = acquire(store, "m", "a", claim_ttl=60)
    assert took.took_claim
    assert client.get(store.names("k").claim) == b"a"


def test_the_inspection_scripts(store: Store) -> None:
    store.claim("k1", "a", 60)
    acquire(store, member("b", "host", 7, None), "b")
    inspector = Inspector(store.client, "t")
    held = inspector.held()
    assert [(s.key, s.holds) for s in held] == [("k", "lease"), ("k1", "claim")]
    lease = held[0].leases[0]
    assert (lease.task_id, lease.host, lease.pid, lease.live) == ("b", "host", 7, True)
    assert held[1].claim is not None and held[1].claim.task_id == "a"

    store.release_claim("k1", "a")  # changed since read: the guarded release refuses
    store.claim("k1", "c", 60)
    assert inspector.release(held[1])[0] is False
    assert inspector.release(held[1], force=True)[0] is True
    assert inspector.release(held[0])[0] is True
    assert inspector.held() == []


def test_completion_markers_are_read(store: Store) -> None:
    acquire(store, "m", "a")
    store.release("k", "m", "a", free_claim=False, done_ttl=60)
    state = Inspector(store.client, "t").key("k")
    assert state is not None
    assert [
        (d.task_id, d.ttl is not None and 59 < d.ttl <= 60) for d in state.done
    ] == [("a", True)]


def test_use_client_binds_an_app_to_a_client() -> None:
    fake = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    app = Celery("bound", broker="memory://", set_as_current=False)
    app.conf.update(dedup_redis_url=MEMORY_URL, dedup_key_prefix="bound")

    @app.task(base=DedupTask, shared=False)
    def job(n: int) -> int:
        return n

    use_client(app, fake)
    first = job.delay(1)
    assert job.delay(1).deduplicated
    assert fake.get(f"bound:{{{first.dedup_key}}}:claim") == first.id.encode()
    reset(app)  # settings change: the client stays
    assert get_backend(app).redis is fake
    use_client(app, None)
    backend = get_backend(app)
    assert backend.redis is not fake
    assert backend.redis.connection_pool.connection_kwargs["path"] == MEMORY_URL[7:]
    reset(app)
    fake.close()
