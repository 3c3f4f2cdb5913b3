"""The enqueue claim against a real Redis server and real workers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Celery
from kombu.exceptions import OperationalError

from celery_dedup import BackendUnavailableError, DedupTask, DuplicateTaskError
from celery_dedup.connection import get_backend, reset
from tests.rig import Recorder, Worker, free_port, max_overlap, queue_length, wait_for

pytestmark = pytest.mark.integration


def claim_holder(app: Celery, key: str) -> str | None:
    backend = get_backend(app)
    value = backend.redis.get(backend.store.names(key).claim)
    return value.decode() if value else None


def test_distinct_arguments_are_never_deduplicated(
    scenario_app: Any, redis_client: redis.Redis, queue: str
) -> None:
    task = scenario_app.close_campaign
    results = [task.apply_async((n,), queue=queue) for n in range(5)]
    assert [r.deduplicated for r in results] == [False] * 5
    assert len({r.id for r in results}) == 5
    assert queue_length(redis_client, queue) == 5


def test_positional_and_keyword_calls_are_one_job(
    scenario_app: Any, redis_client: redis.Redis, queue: str
) -> None:
    task = scenario_app.close_campaign
    first = task.apply_async((1,), queue=queue)
    again = task.apply_async(kwargs={"campaign_id": 1}, queue=queue)
    default_applied = task.apply_async((1, 0.5), queue=queue)
    assert not first.deduplicated
    assert again.deduplicated and again.id == first.id
    assert default_applied.deduplicated and default_applied.id == first.id
    assert queue_length(redis_client, queue) == 1


def test_argument_names_and_per_call_key(scenario_app: Any, queue: str) -> None:
    add = scenario_app.add
    first = add.apply_async((1, 2), queue=queue)
    assert add.apply_async((1, 3), queue=queue).id == first.id  # keyed on x only
    assert not add.apply_async((2, 2), queue=queue).deduplicated
    # a per-call key overrides the task's
    mine = add.apply_async((1, 2), queue=queue, dedup_key="batch-7")
    assert not mine.deduplicated
    assert add.apply_async((9, 9), queue=queue, dedup_key="batch-7").id == mine.id


def test_raise_mode_carries_the_key_and_the_existing_id(
    scenario_app: Any, queue: str
) -> None:
    task = scenario_app.close_campaign
    first = task.apply_async((4,), queue=queue, dedup_on_conflict="raise")
    with pytest.raises(DuplicateTaskError) as caught:
        task.apply_async((4,), queue=queue, dedup_on_conflict="raise")
    error = caught.value
    assert error.existing_task_id == first.id
    assert claim_holder(scenario_app.app, error.key) == first.id
    assert error.task_name == task.name


def test_the_claim_names_its_holder(scenario_app: Any, queue: str) -> None:
    task = scenario_app.close_campaign
    result = task.apply_async((5,), queue=queue)
    assert claim_holder(scenario_app.app, task.dedup_key_for((5,))) == result.id
    assert claim_holder(scenario_app.app, task.dedup_key_for((6,))) is None


def test_eta_and_countdown_extend_the_claim_and_expires_caps_it(
    scenario_app: Any, redis_client: redis.Redis, queue: str
) -> None:
    task = scenario_app.close_campaign
    backend = get_backend(scenario_app.app)

    def ttl_of(n: int, **options: Any) -> float:
        task.apply_async((n,), queue=queue, dedup_ttl=10, **options)
        (name,) = [
            k
            for k in backend.redis.scan_iter("dedup:*:claim")
            if backend.redis.get(k) and k not in seen
        ]
        seen.add(name)
        return int(backend.redis.pttl(name)) / 1000

    seen: set[bytes] = set()
    assert 9 < ttl_of(1) <= 10
    assert 109 < ttl_of(2, countdown=100) <= 110
    assert ttl_of(3, expires=3) <= 3


def test_while_executing_takes_no_enqueue_claim(
    scenario_app: Any, redis_client: redis.Redis, queue: str
) -> None:
    task = scenario_app.close_campaign
    a = task.apply_async((6,), queue=queue, dedup_lock="while_executing")
    b = task.apply_async((6,), queue=queue, dedup_lock="while_executing")
    assert not a.deduplicated and not b.deduplicated
    assert list(redis_client.scan_iter("dedup:*")) == []


def test_a_failed_publish_leaves_no_claim(redis_client: redis.Redis) -> None:
    app = Celery("broken", set_as_current=False)
    app.conf.update(
        broker_url=f"redis://127.0.0.1:{free_port()}/0",
        dedup_redis_url=redis_client.connection_pool.connection_kwargs
        and "redis://{host}:{port}/0".format(
            **redis_client.connection_pool.connection_kwargs
        ),
        broker_connection_timeout=1,
    )

    @app.task(base=DedupTask, name="broken.job", shared=False)
    def job(n: int) -> int:
        return n

    with pytest.raises(OperationalError):
        job.apply_async((1,), retry=False)
    assert list(redis_client.scan_iter("dedup:*")) == []
    reset(app)


def test_redis_down_at_enqueue_follows_the_setting(redis_client: redis.Redis) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = Celery("nodedup", broker="memory://", set_as_current=False)
    app.conf.update(dedup_redis_url=dead)

    @app.task(base=DedupTask, name="nodedup.job", shared=False)
    def job(n: int) -> int:
        return n

    with pytest.raises(BackendUnavailableError, match="dedup_on_redis_error"):
        job.apply_async((1,))
    app.conf.dedup_on_redis_error = "proceed"
    reset(app)
    result = job.apply_async((1,))
    assert result.deduplicated is False


def test_a_retry_is_published_even_when_redis_is_down(
    redis_client: redis.Redis,
) -> None:
    app = Celery("retrydown", broker="memory://", set_as_current=False)
    app.conf.update(dedup_redis_url=f"redis://127.0.0.1:{free_port()}/0")

    @app.task(base=DedupTask, name="retrydown.job", shared=False, bind=True)
    def job(self: DedupTask, n: int) -> int:
        return n

    # Given the task is running (as a worker would run it) and Redis is gone,
    job.push_request(id="running-id", retries=0)
    try:
        # a retry republishes the message under its own id, with no claim
        result = job.apply_async(
            (1,), task_id="running-id", expires="2099-01-01T00:00:00+00:00"
        )
    finally:
        job.pop_request()
    assert result.id == "running-id"
    # while a fresh call still refuses to go on without Redis
    with pytest.raises(BackendUnavailableError):
        job.apply_async((1,))


def test_the_same_explicit_task_id_twice_publishes_once(
    scenario_app: Any, redis_client: redis.Redis, queue: str
) -> None:
    task = scenario_app.close_campaign
    first = task.apply_async((12,), queue=queue, task_id="order-12")
    again = task.apply_async((12,), queue=queue, task_id="order-12")
    assert not first.deduplicated
    assert again.deduplicated
    assert again.id == "order-12"
    assert queue_length(redis_client, queue) == 1


def test_eager_mode_runs_at_once_without_redis() -> None:
    app = Celery("eager", broker="memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, dedup_redis_url="redis://127.0.0.1:1/0")

    @app.task(base=DedupTask, name="eager.job", shared=False)
    def job(n: int) -> int:
        return n * 2

    assert job.apply_async((2,)).get() == 4
    assert job.apply_async((2,)).get() == 4
    assert job.apply((3,)).get() == 6


def test_disabled_publishes_every_call(
    scenario_app: Any, redis_client: redis.Redis, queue: str
) -> None:
    app = scenario_app.app
    app.conf.dedup_enabled = False
    reset(app)
    try:
        task = scenario_app.close_campaign
        assert (
            task.apply_async((1,), queue=queue).id
            != task.apply_async((1,), queue=queue).id
        )
        assert queue_length(redis_client, queue) == 2
    finally:
        app.conf.dedup_enabled = True
        reset(app)


# -- with real workers -------------------------------------------------------


def test_until_executed_frees_the_key_when_the_task_finishes(
    scenario_app: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    task = scenario_app.close_campaign
    first = task.apply_async((8, 0.1), queue=queue)
    workers(concurrency=1)
    assert first.get(timeout=20) == 8
    wait_for(
        lambda: claim_holder(scenario_app.app, task.dedup_key_for((8, 0.1))) is None,
        5,
        "release",
    )
    second = task.apply_async((8, 0.1), queue=queue)
    assert not second.deduplicated
    assert second.get(timeout=20) == 8
    assert [r["task_id"] for r in recorder.runs("close_campaign")] == [
        first.id,
        second.id,
    ]


def test_until_executing_frees_the_key_when_the_body_starts(
    scenario_app: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    task = scenario_app.close_campaign
    workers(concurrency=2)
    first = task.apply_async((9, 2), queue=queue, dedup_lock="until_executing")
    wait_for(lambda: recorder.started("close_campaign"), 20, "the body to start")
    # the claim is gone once the body started: the next call is published
    second = task.apply_async((9, 2), queue=queue, dedup_lock="until_executing")
    assert not second.deduplicated
    third = task.apply_async((9, 2), queue=queue, dedup_lock="until_executing")
    assert third.deduplicated
    assert third.id == second.id
    assert first.get(timeout=20) == 9
    # but the lease keeps it from running beside the first: it was dropped,
    # and its result says onto which task
    wait_for(lambda: second.state == "FAILURE", 5, "the second to be dropped")
    assert isinstance(second.result, DuplicateTaskError)
    assert second.result.existing_task_id == first.id
    assert len(recorder.started("close_campaign")) == 1
    assert [r["task_id"] for r in recorder.runs("close_campaign")] == [first.id]


def test_until_and_while_executing_runs_one_more_after_the_running_one(
    scenario_app: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    task = scenario_app.close_campaign
    mode = {"dedup_lock": "until_and_while_executing"}
    workers(concurrency=2)
    first = task.apply_async((11, 1.5), queue=queue, **mode)
    wait_for(lambda: recorder.started("close_campaign"), 20, "the body to start")
    # one queued behind the running one; more calls fold into it
    second = task.apply_async((11, 1.5), queue=queue, **mode)
    third = task.apply_async((11, 1.5), queue=queue, **mode)
    assert not second.deduplicated
    assert third.id == second.id
    assert first.get(timeout=20) == second.get(timeout=30) == 11
    runs = recorder.runs("close_campaign")
    assert [r["task_id"] for r in runs] == [first.id, second.id]
    assert max_overlap(runs) == 1


def test_until_expired_holds_after_success_and_frees_on_final_failure(
    scenario_app: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    workers(concurrency=1)
    ok = scenario_app.close_campaign.apply_async(
        (10, 0.05), queue=queue, dedup_lock="until_expired", dedup_ttl=60
    )
    assert ok.get(timeout=20) == 10
    again = scenario_app.close_campaign.apply_async(
        (10, 0.05), queue=queue, dedup_lock="until_expired", dedup_ttl=60
    )
    assert again.deduplicated and again.id == ok.id

    doomed = scenario_app.doomed.apply_async(
        ("x",), queue=queue, dedup_lock="until_expired", dedup_ttl=60
    )
    with pytest.raises(RuntimeError):
        doomed.get(timeout=20)
    wait_for(
        lambda: (
            claim_holder(scenario_app.app, scenario_app.doomed.dedup_key_for(("x",)))
            is None
        ),
        5,
        "release",
    )
    retry = scenario_app.doomed.apply_async(
        ("x",), queue=queue, dedup_lock="until_expired", dedup_ttl=60
    )
    assert not retry.deduplicated


def test_retries_are_never_deduplicated_and_release_after_success(
    scenario_app: Any, workers: Callable[..., Worker], recorder: Recorder, queue: str
) -> None:
    # Given a task that fails twice, then succeeds (autoretry_for)
    flaky = scenario_app.flaky
    result = flaky.apply_async(("job",), queue=queue)
    key = flaky.dedup_key_for(("job",))
    # When a worker runs it
    workers(concurrency=2)
    # Then duplicates are refused while it is between retries
    dup = flaky.apply_async(("job",), queue=queue)
    assert dup.deduplicated and dup.id == result.id
    assert result.get(timeout=30) == "job"
    # and it ran exactly three times, under one task id, retries 0, 1, 2
    runs = recorder.runs("flaky")
    assert [(r["task_id"], r["retries"]) for r in runs] == [
        (result.id, 0),
        (result.id, 1),
        (result.id, 2),
    ]
    # and the claim is gone once it succeeded
    wait_for(lambda: claim_holder(scenario_app.app, key) is None, 5, "release")


def test_only_the_holder_releases_a_claim(
    scenario_app: Any, redis_client: redis.Redis, queue: str
) -> None:
    task = scenario_app.close_campaign
    result = task.apply_async((13,), queue=queue)
    backend = get_backend(scenario_app.app)
    key = task.dedup_key_for((13,))
    name = backend.store.names(key).claim
    assert not backend.store.release_claim(key, "some-late-finisher")
    assert redis_client.get(name) == result.id.encode()
    assert backend.store.release_claim(key, result.id)
    assert redis_client.get(name) is None
