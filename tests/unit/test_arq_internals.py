"""workers/jobs.py's ResilientWorker overrides and reads arq internals. These tests fail when an
arq upgrade moves any of them, before a worker misbehaves in production."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import arq
import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.utils import poll
from arq.worker import Worker
from redis.exceptions import ConnectionError as RedisConnectionError

from orchestrator.redis_conn import JobRedis
from workers.jobs import ARQ_WRITTEN_FOR, ResilientWorker


async def noop(ctx: dict[str, Any]) -> None:
    return None


def make_worker(redis: JobRedis, **kwargs: Any) -> ResilientWorker:
    return ResilientWorker(
        functions=[noop], redis_pool=redis, queue_name="arq-internals:q", handle_signals=False, **kwargs
    )


def test_arq_is_the_minor_version_the_overrides_were_written_for() -> None:
    assert arq.VERSION.rsplit(".", 1)[0] == ARQ_WRITTEN_FOR, (
        f"arq {arq.VERSION}: re-check workers/jobs.py ResilientWorker against it, then update ARQ_WRITTEN_FOR"
    )


def test_the_internals_we_use_still_have_their_shape() -> None:
    assert inspect.iscoroutinefunction(Worker._poll_iteration)
    assert list(inspect.signature(Worker._poll_iteration).parameters) == ["self"]
    assert list(inspect.signature(Worker.start_jobs).parameters) == ["self", "job_ids"]
    assert inspect.iscoroutinefunction(Worker.run_job)
    assert list(inspect.signature(Worker.run_job).parameters) == ["self", "job_id", "score"]
    # The waiting iteration relies on main's loop: _poll_iteration, then poll() sleeps
    # poll_delay_s less what the iteration took (nothing, after a wait longer than that).
    main = inspect.getsource(Worker.main)
    assert "async for _ in poll(self.poll_delay_s):" in main and "await self._poll_iteration()" in main
    assert "wait = max([0, step - after + before])" in inspect.getsource(poll)
    assert in_progress_key_prefix == "arq:in-progress:"
    # docs/jobs.md tells producers the job key; ResilientWorker.reject deletes these three.
    assert job_key_prefix == "arq:job:"
    assert retry_key_prefix == "arq:retry:"


async def test_a_worker_built_on_our_pool_has_the_attributes_we_read() -> None:
    redis = JobRedis(host="127.0.0.1", port=1)
    worker = make_worker(redis)
    assert worker.pool is redis
    assert worker.tasks == {}
    assert worker.allow_pick_jobs is True
    assert set(worker.functions) == {"noop"}  # name -> function: what screen checks "f" against
    assert isinstance(worker.health_check_key, str)
    await redis.aclose()


@pytest.mark.parametrize("fallback_s", [0.0, 1.0], ids=["polling", "waiting"])
async def test_a_poll_that_cannot_reach_redis_is_survived_not_fatal(fallback_s: float) -> None:
    redis = JobRedis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)  # nothing listens there
    worker = make_worker(redis, fallback_s=fallback_s)
    await worker._poll_iteration()  # arq's own would raise ConnectionError and end the worker
    assert worker._outage_since is not None
    worker._outage_since = None
    await worker._poll_iteration()  # a wait (BLPOP) that cannot reach Redis: the same outage
    assert worker._outage_since is not None
    await redis.aclose()


async def test_ids_the_worker_runs_itself_are_not_checked_again() -> None:
    redis = JobRedis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    worker = make_worker(redis)
    running = asyncio.get_running_loop().create_future()
    worker.tasks["mine"] = asyncio.ensure_future(running)
    # With only its own running job queued, start_jobs must not touch Redis (which is away).
    await worker.start_jobs([b"mine"])
    with pytest.raises(RedisConnectionError):  # a fresh id does reach arq's start_jobs, and so Redis
        await worker.start_jobs([b"other"])
    running.cancel()
    await redis.aclose()


async def test_stale_in_progress_marks_of_queued_jobs_are_released(redis_url: str) -> None:
    redis = JobRedis.from_url(redis_url)
    worker = make_worker(redis)
    await redis.zadd(worker.queue_name, {"dead-run": 1, "live-run": 2})
    await redis.set(in_progress_key_prefix + "dead-run", b"1")
    await redis.set(in_progress_key_prefix + "live-run", b"1")
    worker.tasks["live-run"] = asyncio.ensure_future(asyncio.sleep(10))
    assert await worker.release_orphaned_jobs() == 1
    assert not await redis.exists(in_progress_key_prefix + "dead-run")
    assert await redis.exists(in_progress_key_prefix + "live-run")
    worker.tasks["live-run"].cancel()
    await redis.delete(worker.queue_name, in_progress_key_prefix + "live-run")
    await redis.aclose()


async def test_the_job_start_task_runs_our_run_job(redis_url: str) -> None:
    """start_jobs must reach the override (arq calls self.run_job(job_id, score)): a queued id
    with no body is rejected by ours (counted), where arq's own would only log "expired"."""
    redis = JobRedis.from_url(redis_url)
    seen: list[str] = []
    worker = ResilientWorker(
        functions=[noop], redis_pool=redis, queue_name="arq-internals:q2", handle_signals=False, on_reject=seen.append
    )
    await redis.zadd(worker.queue_name, {"no-body": 1})
    await worker.start_jobs([b"no-body"])
    await asyncio.gather(*worker.tasks.values())
    assert seen == ["missing_body"]
    assert not await redis.exists(worker.queue_name, in_progress_key_prefix + "no-body")
    await redis.aclose()


async def test_a_started_jobs_end_is_seen_after_arq_has_freed_its_slot(redis_url: str) -> None:
    """ResilientWorker's job-end callback wakes a poll for a job that waited for a slot: arq's
    own done callback (start_jobs adds it first) must have freed the slot by then."""
    counters: list[int] = []

    class Watched(ResilientWorker):
        def _on_job_end(self, task: asyncio.Task[Any]) -> None:
            counters.append(self.job_counter)
            super()._on_job_end(task)

    redis = JobRedis.from_url(redis_url)
    worker = Watched(
        functions=[noop],
        redis_pool=redis,
        queue_name="arq-internals:q3",
        handle_signals=False,
        max_jobs=1,
        fallback_s=1,
    )
    await redis.zadd(worker.queue_name, {"no-body-2": 1})
    await worker.start_jobs([b"no-body-2"])
    assert worker.job_counter == 1
    await asyncio.gather(*worker.tasks.values())  # (gather's own callback runs after ours)
    assert counters == [0]
    await redis.delete(worker.queue_name)
    await redis.aclose()


def test_the_wait_ends_within_the_socket_timeout() -> None:
    """A BLPOP longer than the socket timeout would fail every idle wait as an outage."""
    redis = JobRedis(host="127.0.0.1", port=1, socket_timeout=4)
    assert make_worker(redis, fallback_s=30).fallback_s == 2
    assert make_worker(JobRedis(host="127.0.0.1", port=1), fallback_s=30).fallback_s == 30  # no timeout


def test_waiting_replaces_the_main_loops_sleep() -> None:
    """main's ``poll(poll_delay_s)`` would sleep out the rest of poll_delay after a short
    iteration: a job enqueued just after a poll would wait for it."""
    redis = JobRedis(host="127.0.0.1", port=1)
    assert make_worker(redis, fallback_s=1, poll_delay=0.5).poll_delay_s == 0
    assert make_worker(redis, poll_delay=0.5).poll_delay_s == 0.5  # polling: arq's own
