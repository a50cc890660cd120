"""The queue's consumer woken by an enqueue (``ORCH_POLL_FALLBACK``, the default: BLPOP on the
queue's wake-up list) against polling every 10 ms (``ORCH_POLL_FALLBACK=0``, as before), in the
same run: pickup (enqueue → handler), and what idle costs, in Redis calls a second and CPU
seconds per 10 s, for 10 idle consumers in this process and for one whole worker process.
Everything runs on a redis-server of its own, so that ``INFO commandstats`` counts these alone."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from arq.worker import func

from orchestrator.keys import Keys
from orchestrator.queue import JobQueue, Operation
from orchestrator.redis_conn import JobRedis
from workers.jobs import ResilientWorker

from .harness import Result, Side, alternate, cleanup, cpu_seconds, free_port

POLL_DELAY_S = 0.01  # ORCH_POLL_DELAY's default: the poll every 10 ms of ORCH_POLL_FALLBACK=0
FALLBACK_S = 1.0  # ORCH_POLL_FALLBACK's default
WINDOW_S = 10.0
IDLE_CONSUMERS = 10


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is not installed (scripts/env.sh installs it)")
    workdir = tempfile.mkdtemp(prefix="orch-bench-redis-")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--bind", "127.0.0.1", "--port", str(port), "--dir", workdir, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout != b"PONG\n":
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Consumer:
    """One sandbox queue's arq consumer (ResilientWorker, as JobRunner builds it), its job a no-op."""

    keys: Keys
    sandbox: str
    worker: ResilientWorker
    redis: JobRedis
    arrived: dict[str, asyncio.Event] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None


def consumer(redis_url: str, fallback_s: float) -> Consumer:
    tag = uuid.uuid4().hex[:8]
    keys, redis = Keys(f"idle-{tag}:"), JobRedis.from_url(redis_url)
    arrived: dict[str, asyncio.Event] = {}
    started: dict[str, float] = {}

    async def stop_session(ctx: dict[str, Any], session: str, generation: int) -> str:
        started[session] = time.perf_counter()
        arrived.setdefault(session, asyncio.Event()).set()
        return "ok"

    worker = ResilientWorker(
        functions=[func(stop_session, name=Operation.STOP.value)],
        redis_pool=redis,
        queue_name=keys.queue("sb"),
        job_serializer=redis.job_serializer,
        job_deserializer=redis.job_deserializer,
        poll_delay=POLL_DELAY_S,
        keep_result=0,
        handle_signals=False,
        fallback_s=fallback_s,
    )
    return Consumer(keys, "sb", worker, redis, arrived, started)


@contextlib.asynccontextmanager
async def consumers(redis_url: str, fallback_s: float, count: int) -> AsyncIterator[list[Consumer]]:
    made = [consumer(redis_url, fallback_s) for _ in range(count)]
    for c in made:
        c.task = asyncio.create_task(c.worker.main())
    try:
        yield made
    finally:
        for c in made:
            assert c.task is not None
            c.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await c.task
            await c.redis.aclose()


async def redis_calls(admin: JobRedis) -> dict[str, int]:
    stats: dict[str, dict[str, int]] = await admin.info("commandstats")
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items() if k != "cmdstat_info"}


async def idle_window(admin: JobRedis, cpu: Any) -> tuple[float, float, dict[str, float]]:
    """(Redis calls/s, CPU s of ``cpu()`` per 10 s, calls/s by command) over WINDOW_S."""
    calls, used = await redis_calls(admin), cpu()
    await asyncio.sleep(WINDOW_S)
    after, used = await redis_calls(admin), cpu() - used
    by = {k: round((v - calls.get(k, 0)) / WINDOW_S, 1) for k, v in after.items() if v != calls.get(k, 0)}
    return sum(by.values()), used * 10 / WINDOW_S, by


def worker_process(redis_url: str, fallback_s: float) -> tuple[subprocess.Popen[bytes], str, str]:
    tag = uuid.uuid4().hex[:6]
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "ORCH_KEY_PREFIX": f"bench-{tag}:",
        "ORCH_SANDBOX_ID": f"bench{tag}",
        "ORCH_SOCKET_DIR": tempfile.mkdtemp(prefix="orch-bench-"),
        "ORCH_POLL_FALLBACK": str(fallback_s),
    }
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker"], env=env, stderr=subprocess.DEVNULL)
    return proc, f"bench-{tag}:", f"bench{tag}"


async def idle(n: int) -> list[Result]:
    modes = {"wake-up (BLPOP)": FALLBACK_S, "poll every 10 ms": 0.0}
    wake_name, poll_name = list(modes)
    pickup = Result("idle: queue pickup", "s", Side(f"{wake_name}: enqueue → handler"), Side(poll_name))
    calls = Result(f"idle: {IDLE_CONSUMERS} consumers' calls", "/s", Side(wake_name), Side(poll_name))
    cpu = Result(f"idle: {IDLE_CONSUMERS} consumers' CPU per 10 s", "s", Side(wake_name), Side(poll_name))
    whole = Result("idle: a worker's CPU per 10 s", "s", Side(wake_name), Side(poll_name))
    with private_redis() as url:
        admin = JobRedis.from_url(url)
        try:
            # Pickup: one consumer of each kind, alternating; jobs enqueued as the API does.
            async with consumers(url, FALLBACK_S, 1) as [woken], consumers(url, 0.0, 1) as [polling]:

                def round_of(c: Consumer) -> Any:
                    async def run() -> float:
                        sid = f"s-{uuid.uuid4().hex[:10]}"
                        c.arrived[sid] = asyncio.Event()
                        await asyncio.sleep(random.uniform(0, 0.05))  # requests come at any time
                        sent = time.perf_counter()
                        await JobQueue(admin, c.keys).enqueue(Operation.STOP, c.sandbox, sid, 1)
                        await asyncio.wait_for(c.arrived[sid].wait(), 10)
                        return c.started.pop(sid) - sent

                    return run

                await asyncio.sleep(1)  # both consumers past their start
                await alternate(n, round_of(woken), round_of(polling), pickup)
            # Idle: IDLE_CONSUMERS of each kind in turn, in this otherwise idle process.
            for side_calls, side_cpu, fallback_s in (
                (calls.project, cpu.project, FALLBACK_S),
                (calls.baseline, cpu.baseline, 0.0),
            ):
                async with consumers(url, fallback_s, IDLE_CONSUMERS):
                    await asyncio.sleep(2)
                    for _ in range(2):
                        per_s, cpu_s, by = await idle_window(admin, time.process_time)
                        side_calls.values.append(per_s)
                        side_cpu.values.append(cpu_s)
                    calls.notes[f"{side_calls.name}: calls/s by command"] = by
                    print(f"  {side_calls.name}: {per_s:.1f} calls/s, {cpu_s:.3f} CPU-s per 10 s", flush=True)
            # One whole worker process (its heartbeat, health checks, exec and access readers too).
            for side, fallback_s in ((whole.project, FALLBACK_S), (whole.baseline, 0.0)):
                proc, prefix, sandbox = worker_process(url, fallback_s)
                try:
                    async with asyncio.timeout(120):
                        while not await admin.exists(Keys(prefix).sandbox(sandbox)):
                            if proc.poll() is not None:
                                raise RuntimeError(f"the worker exited ({proc.returncode})")
                            await asyncio.sleep(0.1)
                    await asyncio.sleep(3)  # past its start-up
                    per_s, cpu_s, by = await idle_window(admin, functools.partial(cpu_seconds, proc.pid))
                    side.values.append(cpu_s)
                    whole.notes[f"{side.name}: Redis calls/s"] = {"total": round(per_s, 1), **by}
                    print(f"  worker, {side.name}: {per_s:.1f} calls/s, {cpu_s:.3f} CPU-s per 10 s", flush=True)
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
                    cleanup(sandbox)
        finally:
            await admin.aclose()
    pickup.notes["settings"] = f"ORCH_POLL_DELAY {POLL_DELAY_S * 1000:.0f} ms; ORCH_POLL_FALLBACK {FALLBACK_S:g} s or 0"
    return [pickup, calls, cpu, whole]


SCENARIOS = {"idle": idle}
DEFAULT_N = {"idle": 200}
