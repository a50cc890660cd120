"""Workers that cost nothing when idle (workers/jobs.py ``ResilientWorker`` with ``fallback_s``):
an idle worker blocks in BLPOP on its queue's wake-up list, which every enqueue pushes to
(orchestrator/queue.py ``wake``), instead of polling. Real Redis, the real arq consumer.

The fallback is set far beyond each test's own bound (30 s against 5 s), so a job that starts
within the bound was started by a wake-up, a deferred job's deadline or a slot freeing up,
never by the fallback poll; the one test of the fallback itself sets it short."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from arq.worker import Retry, func
from redis.exceptions import ConnectionError as RedisConnectionError

from orchestrator.keys import Keys, queue_wake
from orchestrator.queue import WAKE_TTL_MS, JobQueue, Operation, wake
from orchestrator.redis_conn import JobRedis
from tests.conftest import free_port
from workers.jobs import ResilientWorker

FAR = 30.0  # the fallback where a test must not depend on it
BOUND = 5.0  # how long a woken pickup may take in a test, on a loaded machine


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = BOUND) -> None:
    """Wait for ``condition``, checking every 10 ms; fail loudly after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.01)


@dataclass
class Harness:
    redis: JobRedis  # the worker's client (connections named ``name``)
    admin: JobRedis  # the test's own
    name: str
    keys: Keys
    sandbox: str
    worker: ResilientWorker
    started: dict[str, list[float]] = field(default_factory=dict)  # session -> wall-clock start times
    hold: dict[str, asyncio.Event] = field(default_factory=dict)  # session -> released when set
    retry_once: set[str] = field(default_factory=set)

    @property
    def queue(self) -> JobQueue:
        return JobQueue(self.admin, self.keys)

    async def blocked(self) -> bool:
        """The worker's connection waits in BLPOP now (seen by Redis, not by the worker)."""
        try:
            clients = await self.admin.client_list()
        except RedisConnectionError:  # Redis is away (restarted by a test)
            return False
        return any(c["name"] == self.name and c["cmd"] == "blpop" and "b" in c["flags"] for c in clients)

    async def ran(self, session: str, times: int = 1) -> bool:
        return len(self.started.get(session, [])) >= times


@contextlib.asynccontextmanager
async def running(redis_url: str, *, fallback_s: float = FAR, max_jobs: int = 10) -> AsyncIterator[Harness]:
    tag = uuid.uuid4().hex[:8]
    name = f"wake-test-{tag}"
    redis = JobRedis.from_url(redis_url, client_name=name)
    admin = JobRedis.from_url(redis_url)
    keys = Keys(f"wake-{tag}:")
    sandbox = "sb"
    harness: Harness | None = None

    async def stop_session(ctx: dict[str, Any], session: str, generation: int) -> str:
        assert harness is not None
        harness.started.setdefault(session, []).append(time.time())
        if session in harness.hold:
            await harness.hold[session].wait()
        if session in harness.retry_once:
            harness.retry_once.discard(session)
            raise Retry(defer=0.3)
        return "ok"

    worker = ResilientWorker(
        functions=[func(stop_session, name=Operation.STOP.value)],
        redis_pool=redis,
        queue_name=keys.queue(sandbox),
        job_serializer=redis.job_serializer,
        job_deserializer=redis.job_deserializer,
        poll_delay=0.01,
        max_jobs=max_jobs,
        keep_result=0,
        max_tries=100,
        handle_signals=False,
        fallback_s=fallback_s,
    )
    harness = Harness(redis, admin, name, keys, sandbox, worker)
    main = asyncio.create_task(worker.main())
    try:
        yield harness
    finally:
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main
        for event in harness.hold.values():
            event.set()
        for task in worker.tasks.values():
            task.cancel()
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        await redis.aclose()
        await admin.aclose()


async def test_an_enqueue_wakes_the_blocked_worker(redis_url: str) -> None:
    async with running(redis_url) as h:
        await until(h.blocked, "the idle worker blocks in BLPOP")
        assert await h.queue.enqueue(Operation.STOP, h.sandbox, "woken", 1)
        await until(lambda: h.ran("woken"), f"the job starts (woken), well before the {FAR:g} s fallback")
        # The wake-up was taken, and the worker waits again.
        await until(h.blocked, "the worker blocks again")
        assert not await h.admin.exists(h.keys.queue_wake(h.sandbox))


async def test_a_burst_of_wake_ups_is_one_element_with_a_ttl(redis_url: str) -> None:
    """Five enqueues while the worker is busy: its next wait ends once, not five times; a
    wake-up nobody takes (a retired sandbox's) expires."""
    redis = JobRedis.from_url(redis_url)
    queue = f"wake-{uuid.uuid4().hex[:8]}:queue:sb"
    try:
        for _ in range(5):
            await wake(redis, queue)
        assert await redis.lrange(queue_wake(queue), 0, -1) == [b"1"]
        assert 0 < await redis.pttl(queue_wake(queue)) <= WAKE_TTL_MS
    finally:
        await redis.delete(queue_wake(queue))
        await redis.aclose()


async def calls_per_second(admin: JobRedis, seconds: float) -> float:
    """Commands Redis ran per second over ``seconds`` (``INFO commandstats``), our INFOs aside."""

    async def total() -> int:
        stats: dict[str, dict[str, int]] = await admin.info("commandstats")
        return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")

    before = await total()
    await asyncio.sleep(seconds)
    return (await total() - before) / seconds


async def test_an_idle_worker_makes_a_handful_of_redis_calls_a_second(redis_url: str) -> None:
    async with running(redis_url, fallback_s=1.0) as h:
        await until(h.blocked, "the idle worker blocks in BLPOP")
        waking = await calls_per_second(h.admin, 3.0)
    # The same worker polling every 10 ms (no wake-ups): the measure sees a poller.
    async with running(redis_url, fallback_s=0) as h:
        polling = await calls_per_second(h.admin, 1.0)
    # Each fallback period: the deferred-job check, BLPOP, arq's poll.
    assert 0 < waking <= 5, waking
    assert polling >= 30, polling


async def test_a_job_enqueued_the_arq_way_is_found_by_the_fallback_poll(redis_url: str) -> None:
    """A producer that writes arq's keys itself and sends no wake-up (docs/jobs.md)."""
    async with running(redis_url, fallback_s=0.5) as h:
        await until(h.blocked, "the idle worker blocks in BLPOP")
        job = await h.admin.enqueue_job(
            Operation.STOP.value,
            _job_id="stop_session:direct:1",
            _queue_name=h.keys.queue(h.sandbox),
            session="direct",
            generation=1,
        )
        assert job is not None
        assert not await h.admin.exists(h.keys.queue_wake(h.sandbox))  # nothing woke it
        await until(lambda: h.ran("direct"), "the fallback poll starts it")


async def test_a_deferred_job_runs_at_its_time(redis_url: str) -> None:
    async with running(redis_url) as h:
        await until(h.blocked, "the idle worker blocks in BLPOP")
        job = await h.admin.enqueue_job(
            Operation.STOP.value,
            _job_id="stop_session:later:1",
            _queue_name=h.keys.queue(h.sandbox),
            _defer_by=0.6,
            session="later",
            generation=1,
        )
        assert job is not None
        await wake(h.admin, h.keys.queue(h.sandbox))  # woken now: nothing is due yet
        score = await h.admin.zscore(h.keys.queue(h.sandbox), "stop_session:later:1")
        assert score is not None
        await until(lambda: h.ran("later"), f"the deferred job starts at its time, not at the {FAR:g} s fallback")
        assert h.started["later"][0] * 1000 >= score - 5, "started before it was due"


async def test_a_retried_job_runs_again_after_its_defer(redis_url: str) -> None:
    """A Retry re-scores the job 0.3 s ahead while the worker may be blocked: the job's end
    wakes it, and it waits for the new score."""
    async with running(redis_url) as h:
        h.retry_once.add("retried")
        assert await h.queue.enqueue(Operation.STOP, h.sandbox, "retried", 1)
        await until(lambda: h.ran("retried", 2), f"the retry runs, well before the {FAR:g} s fallback")
        first, second = h.started["retried"]
        assert second - first >= 0.3 - 0.01


async def test_a_job_that_ends_lets_a_waiting_one_start(redis_url: str) -> None:
    """One slot: the second job waits for it; the first one's end frees it, and starts the
    second at once (arq only starts jobs when it polls)."""
    async with running(redis_url, max_jobs=1) as h:
        h.hold["first"] = asyncio.Event()
        assert await h.queue.enqueue(Operation.STOP, h.sandbox, "first", 1)
        await until(lambda: h.ran("first"), "the first job starts")
        assert await h.queue.enqueue(Operation.STOP, h.sandbox, "second", 1)

        async def woken_and_blocked_again() -> bool:
            return await h.blocked() and not await h.admin.exists(h.keys.queue_wake(h.sandbox))

        await until(woken_and_blocked_again, "the worker polls (no slot) and blocks again")
        assert "second" not in h.started, "started with no free slot"
        h.hold["first"].set()
        await until(lambda: h.ran("second"), f"the freed slot starts the second job before the {FAR:g} s fallback")


async def test_a_worker_not_picking_jobs_is_woken_but_starts_none(redis_url: str) -> None:
    """``allow_pick_jobs`` off (JobRunner.finish): wake-ups end the wait, the poll takes nothing."""
    async with running(redis_url) as h:
        await until(h.blocked, "the idle worker blocks in BLPOP")
        h.worker.allow_pick_jobs = False
        assert await h.queue.enqueue(Operation.STOP, h.sandbox, "unpicked", 1)

        async def woken_and_blocked_again() -> bool:
            return await h.blocked() and not await h.admin.exists(h.keys.queue_wake(h.sandbox))

        await until(woken_and_blocked_again, "the worker is woken and blocks again")
        assert "unpicked" not in h.started
        h.worker.allow_pick_jobs = True
        await wake(h.admin, h.keys.queue(h.sandbox))
        await until(lambda: h.ran("unpicked"), "picking again, the next wake-up starts it")


def redis_server(port: int) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server")
    assert server is not None, "redis-server is not installed"
    return subprocess.Popen(
        [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


async def test_a_worker_blocked_when_redis_restarts_serves_the_next_job(caplog: pytest.LogCaptureFixture) -> None:
    """The BLPOP's connection dies with Redis: an outage like a failed poll (logged, retried
    with a backoff), and once Redis is back the worker waits for wake-ups again."""
    caplog.set_level(logging.INFO, "workers.jobs")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = redis_server(port)
    try:
        probe = JobRedis.from_url(url)

        async def answers() -> bool:
            try:
                return bool(await probe.ping())
            except RedisConnectionError:
                return False

        await until(answers, "the private Redis answers")
        await probe.aclose()
        async with running(url) as h:
            await until(h.blocked, "the idle worker blocks in BLPOP")
            proc.terminate()
            proc.wait(timeout=10)

            async def outage() -> bool:
                return h.worker._outage_since is not None

            await until(outage, "the worker sees the outage")
            proc = redis_server(port)
            await until(h.blocked, "back, the worker blocks in BLPOP again", timeout=15)
            assert "Redis is back" in caplog.text
            assert await h.queue.enqueue(Operation.STOP, h.sandbox, "after-restart", 1)
            await until(lambda: h.ran("after-restart"), f"woken, well before the {FAR:g} s fallback")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_a_worker_whose_user_may_not_blpop_polls_instead(redis_url: str) -> None:
    """A Redis ACL from before wake-ups (no BLPOP): the worker says so once and polls every
    poll_delay, instead of failing every wait as an outage."""
    admin = JobRedis.from_url(redis_url)
    user = f"wake-{uuid.uuid4().hex[:8]}"
    await admin.acl_setuser(user, enabled=True, nopass=True, keys=["*"], commands=["+@all", "-blpop"])
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    try:
        async with running(f"redis://{user}:x@{host}:{port}/0") as h:

            async def polling() -> bool:
                return h.worker.wake_key is None

            await until(polling, "the worker gives up waiting for wake-ups")
            assert h.worker.poll_delay_s == 0.01 and h.worker._outage_since is None
            job = await h.admin.enqueue_job(
                Operation.STOP.value,
                _job_id="stop_session:polled:1",
                _queue_name=h.keys.queue(h.sandbox),
                session="polled",
                generation=1,
            )
            assert job is not None
            await until(lambda: h.ran("polled"), f"polling, it starts the job before the {FAR:g} s fallback")
    finally:
        await admin.acl_deluser(user)
        await admin.aclose()
