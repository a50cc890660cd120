"""A producer's job can neither end a worker nor act outside the API's rules: malformed jobs
are screened out (orchestrator/queue.py ``screen``, workers/jobs.py ``ResilientWorker``), a
stop job only stops what the API (or a drain, or a TTL) moved to stopping, and a create job
with a spec goes through placement on its sandbox. Real Redis, real job functions, real
Lifecycle over the in-memory Docker port; no value of a job's arguments reaches a log."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix

from orchestrator.queue import Operation, Rejection, screen
from orchestrator.redis_conn import JobRedis
from orchestrator.sandboxes import SandboxRegistry
from orchestrator.schemas import DrainRequest
from orchestrator.states import SessionState
from tests.fakes import SANDBOX, Stack, open_stack
from workers.disk import DiskGauge
from workers.jobs import JobContext, JobRunner, ResilientWorker, job_function

# Short, so that arq's job-start line (arguments cut at 80 characters) would show it.
MARKER = "ENV-MARKER-7f3a"
FUNCTIONS = {op.value for op in Operation}
GOOD: dict[str, Any] = {"t": 1, "f": "create_session", "a": [], "k": {"session": "abc", "generation": 1}, "et": 1}


def body(**changes: Any) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


MALFORMED: list[tuple[str, bytes | None, Rejection]] = [
    ("no body", None, Rejection.MISSING_BODY),
    ("not json", b"{not json " + MARKER.encode(), Rejection.NOT_JSON),
    ("a list", b"[1, 2]", Rejection.NOT_OBJECT),
    ("a string", json.dumps(MARKER).encode(), Rejection.NOT_OBJECT),
    ("t a string", body(t="1"), Rejection.BAD_ENVELOPE),
    ("t negative", body(t=-1), Rejection.BAD_ENVELOPE),
    ("et a string", body(et=MARKER), Rejection.BAD_ENVELOPE),
    ("et past year 9999", body(et=1e300), Rejection.BAD_ENVELOPE),
    ("t a boolean", body(t=True), Rejection.BAD_ENVELOPE),
    ("et missing", json.dumps({k: v for k, v in GOOD.items() if k != "et"}).encode(), Rejection.BAD_ENVELOPE),
    ("f a number", body(f=3), Rejection.BAD_ENVELOPE),
    ("a an object", body(a={}), Rejection.BAD_ENVELOPE),
    ("k a list", body(k=[MARKER]), Rejection.BAD_ENVELOPE),
    ("unknown function", body(f="rm_rf"), Rejection.UNKNOWN_FUNCTION),
    ("positional arguments", body(a=[MARKER]), Rejection.BAD_ARGUMENTS),
    ("generation a string", body(k={"session": "abc", "generation": "1"}), Rejection.BAD_ARGUMENTS),
    ("bad session id", body(k={"session": "BAD!", "generation": 1}), Rejection.BAD_ARGUMENTS),
    ("unknown argument", body(k={"session": "abc", "generation": 1, "x": MARKER}), Rejection.BAD_ARGUMENTS),
    (
        "env value not a string",
        body(k={"session": "abc", "generation": 1, "spec": {"env": {"A": 1, "B": MARKER}}}),
        Rejection.BAD_ARGUMENTS,
    ),
    (
        "a value msgspec would quote",
        body(k={"session": "abc", "generation": 1, "spec": {"ttl_action": MARKER, "env": {"S": MARKER}}}),
        Rejection.BAD_ARGUMENTS,
    ),
]


@pytest.mark.parametrize(
    ("raw", "reason"), [(raw, reason) for _, raw, reason in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_every_malformed_shape_is_named_without_its_values(raw: bytes | None, reason: Rejection) -> None:
    rejected = screen(raw, FUNCTIONS)
    assert rejected is not None
    assert rejected.reason is reason
    assert MARKER not in rejected.detail


def test_a_well_formed_job_passes_with_arqs_null_try_and_a_spec() -> None:
    assert screen(body(), FUNCTIONS) is None
    assert screen(body(t=None), FUNCTIONS) is None
    assert screen(body(et=time.time() * 1000), FUNCTIONS) is None  # a float, as Python producers write
    spec = {"labels": {"a": "b"}, "env": {"TOKEN": MARKER}}
    assert screen(body(k={"session": "abc", "generation": 1, "spec": spec}), FUNCTIONS) is None


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[Stack]:
    async with open_stack(redis_url) as stack:
        await SandboxRegistry(stack.redis, stack.keys).mark_alive(SANDBOX, 60)
        yield stack


def context_for(stack: Stack, rejected: list[Rejection], **settings: Any) -> JobContext:
    worker_settings = dataclasses.replace(stack.settings, **settings)
    return JobContext(stack.lifecycle, stack.store, worker_settings, lambda *_: None, rejected.append)


@pytest.fixture
async def arq_worker(stack: Stack, redis_url: str) -> AsyncIterator[tuple[ResilientWorker, list[Rejection]]]:
    """The worker's arq loop on real Redis, with the real job functions."""
    redis = JobRedis.from_url(redis_url)
    rejected: list[Rejection] = []
    worker = JobRunner(redis, stack.keys.queue(SANDBOX), context_for(stack, rejected)).arq
    yield worker, rejected
    await redis.aclose()


async def put(stack: Stack, job_id: str, raw: bytes | None) -> None:
    if raw is not None:
        await stack.redis.set(job_key_prefix + job_id, raw, px=60_000)
    await stack.redis.zadd(stack.keys.queue(SANDBOX), {job_id: int(time.time() * 1000)})


async def poll_until_empty(worker: ResilientWorker, timeout: float = 10) -> None:
    """arq's own poll iteration (which re-raises a failed job task: what ended the worker)."""
    async with asyncio.timeout(timeout):
        while await worker.pool.zcard(worker.queue_name) or worker.running():
            await worker._poll_iteration()
            await asyncio.sleep(0.01)
    await worker._poll_iteration()


async def test_malformed_jobs_leave_the_queue_and_a_good_one_still_runs(
    stack: Stack, arq_worker: tuple[ResilientWorker, list[Rejection]], caplog: pytest.LogCaptureFixture
) -> None:
    worker, rejected = arq_worker
    caplog.set_level(logging.DEBUG)
    for n, (_, raw, _) in enumerate(MALFORMED):
        await put(stack, f"bad-{n}", raw)
    spec = {"env": {"T": MARKER}}
    await put(stack, "create_session:good-one:1", body(k={"session": "good-one", "generation": 1, "spec": spec}))

    await poll_until_empty(worker)

    assert sorted(rejected) == sorted(reason for _, _, reason in MALFORMED)
    for n in range(len(MALFORMED)):
        for prefix in (job_key_prefix, retry_key_prefix, in_progress_key_prefix):
            assert not await stack.redis.exists(f"{prefix}bad-{n}")
    good = await stack.store.get("good-one")
    assert good is not None and good.state is SessionState.READY
    assert await stack.store.get_env("good-one") == {"T": MARKER}
    assert caplog.records, "nothing was logged"
    for record in caplog.records:
        assert MARKER not in record.getMessage(), (record.name, record.getMessage())
    assert any("rejected job 'bad-4': bad_envelope" in r.getMessage() for r in caplog.records)


async def test_a_stop_job_for_a_ready_session_is_refused(
    stack: Stack, arq_worker: tuple[ResilientWorker, list[Rejection]]
) -> None:
    worker, _ = arq_worker
    await stack.create("ready-one")
    assert await stack.run_queued() == ["ready"]
    await put(stack, "stop_session:ready-one:1", body(f="stop_session", k={"session": "ready-one", "generation": 1}))

    await poll_until_empty(worker)

    record = await stack.store.get("ready-one")
    assert record is not None and record.state is SessionState.READY
    assert stack.runtime.containers["ready-one"].running
    # Moved to stopping first, as the API does, the same job stops it.
    await stack.sessions.stop("ready-one")
    assert await stack.run_queued() == ["stopped"]


async def run_create(stack: Stack, session: str, cpus: float = 1, **settings: Any) -> str:
    context = context_for(stack, [], **settings)
    kwargs = {"session": session, "generation": 1, "spec": {"env": {"TOKEN": MARKER}, "resources": {"cpus": cpus}}}
    result: str = await job_function(Operation.CREATE, context).coroutine({}, **kwargs)
    return result


async def test_a_create_job_with_a_spec_obeys_the_cap_and_the_drain(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert await run_create(stack, "first", max_sessions=1) == "ready"
    full = await run_create(stack, "second", max_sessions=1)
    assert full.startswith("refused: no_capacity"), full
    assert await stack.store.get("second") is None

    await SandboxRegistry(stack.redis, stack.keys).request_drain(SANDBOX, DrainRequest())
    draining = await run_create(stack, "third", max_sessions=5)
    assert draining.startswith("refused: no_sandbox"), draining
    assert await stack.store.get("third") is None

    await stack.redis.delete(stack.keys.sandbox_drain(SANDBOX), stack.keys.sandbox_alive(SANDBOX))
    silent = await run_create(stack, "fourth", max_sessions=5)
    assert silent.startswith("refused: no_sandbox"), silent
    too_big = await run_create(stack, "fifth", cpus=4, max_cpus=2)
    assert too_big.startswith("refused: resources_exceed_sandbox"), too_big
    assert any("refusing create_session for second: no_capacity" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        assert MARKER not in record.getMessage()


async def test_a_create_job_with_a_spec_is_refused_below_the_free_disk_watermark(stack: Stack) -> None:
    free = {"bytes": 1024 * 2**20}  # what the sandbox's disk has free, as the gauge measures it
    gauge = DiskGauge(stack.runtime, min_free_mb=2048, measure=lambda _path: free["bytes"])
    context = dataclasses.replace(context_for(stack, []), disk=gauge)
    kwargs = {"session": "low-one", "generation": 1, "spec": {}}
    low = await job_function(Operation.CREATE, context).coroutine({}, **kwargs)
    assert low.startswith("refused: no_capacity") and "1.0 GiB free on /, below the watermark of 2.0 GiB" in low, low
    assert await stack.store.get("low-one") is None
    free["bytes"] = 3 * 2**30
    assert await job_function(Operation.CREATE, context).coroutine({}, **kwargs) == "ready"


async def test_a_shape_the_screen_misses_is_removed_not_fatal(
    stack: Stack, arq_worker: tuple[ResilientWorker, list[Rejection]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last line of defence: were the screen to pass a body arq fails on (here ``"t":
    "1"``, which made arq raise out of run_job and end the worker), it is still removed."""
    worker, rejected = arq_worker
    monkeypatch.setattr("workers.jobs.screen", lambda raw, functions: None)
    await put(stack, "slipped-through", body(t="1"))
    await poll_until_empty(worker)
    assert rejected == [Rejection.UNRUNNABLE]
    assert not await stack.redis.exists(job_key_prefix + "slipped-through", in_progress_key_prefix + "slipped-through")
