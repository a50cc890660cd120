"""The scenarios. Each returns Results comparing the project's path with a bare baseline
measured alternately in the same run (see harness.py)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

import aiodocker
import redis.asyncio as aioredis

from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.events import EventBus, make_event
from orchestrator.keys import Keys
from orchestrator.names import desktop_name
from orchestrator.queue import JobQueue, Operation
from orchestrator.redis_conn import redis_client
from workers.runtime import DesktopRuntime
from workers.worker import SandboxWorker

from .harness import (
    Result,
    Services,
    Side,
    alternate,
    bare_bring_up,
    bare_remove,
    bare_runtime,
    cpu_seconds,
    rss_mb,
    services,
    wait_healthy,
)

Scenario = Callable[[int], Coroutine[Any, Any, list[Result]]]


def new_id(prefix: str = "bare") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def ready_client(svc: Services) -> Client:
    await wait_healthy(svc.url)
    client = Client(svc.url, token=svc.token)
    # Warm-up, not measured: the worker's start-up (privilege probe), first use of the image.
    record = await client.create()
    await client.wait_ready(record.id, timeout=120)
    await delete(client, record.id)
    return client


async def delete(client: Client, session_id: str) -> None:
    await client.delete(session_id)
    await client.wait_for(session_id, {"session.deleted"}, timeout=120)


async def bare_cold(runtime: DesktopRuntime) -> float:
    """The cold baseline: a new volume and desktop to a ready inner dockerd (removal untimed)."""
    session = new_id()
    started = time.perf_counter()
    await bare_bring_up(runtime, session)
    elapsed = time.perf_counter() - started
    await bare_remove(runtime, session)
    return elapsed


# -- cold ---------------------------------------------------------------------------------------


async def cold(n: int) -> list[Result]:
    """POST /v1/sessions → dockerd.ready seen on the SSE stream, one after another."""
    result = Result("cold", "s", Side("project: POST → dockerd.ready"), Side("bare: aiodocker"))
    phases: list[dict[str, int]] = []
    with services() as svc:
        client = await ready_client(svc)
        async with client, bare_runtime(svc.socket_dir, svc.sandbox_id) as runtime:

            async def project() -> float:
                started = time.perf_counter()
                record = await client.create()
                events = await client.wait_for(record.id, {"dockerd.ready", "session.failed"}, timeout=120)
                elapsed = time.perf_counter() - started
                if events[-1].type != "dockerd.ready":
                    raise RuntimeError(events[-1].data)
                ready = await client.wait_for(record.id, {"session.ready"}, timeout=30, after=events[-1].id)
                phases.append(ready[-1].data["data"]["phases_ms"])
                await delete(client, record.id)
                return elapsed

            await alternate(n, project, lambda: bare_cold(runtime), result)
    if phases:
        result.notes["project phases, median ms"] = {
            k: statistics.median(p.get(k, 0) for p in phases) for k in phases[0]
        }
    return [result]


# -- burst --------------------------------------------------------------------------------------


def machine_cpu() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine so far (all cores)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / tick, idle / tick


def redis_pid() -> int | None:
    try:
        with open("/run/orchestrator-dev/redis.pid") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


class CpuMeter:
    """CPU seconds used during a round by the API, the worker, Redis, this benchmark process
    and the whole machine: where a saturated machine's time went."""

    def __init__(self, svc: Services) -> None:
        self.pids = {"api": svc.api.pid, "worker": svc.worker.pid}
        if (pid := redis_pid()) is not None:
            self.pids["redis"] = pid
        self.rounds: dict[str, list[dict[str, float]]] = {"project": [], "bare": []}

    def _now(self) -> dict[str, float]:
        busy, idle = machine_cpu()
        out = {"machine busy": busy, "machine idle": idle, "benchmark client": time.process_time()}
        out.update({name: cpu_seconds(pid) for name, pid in self.pids.items()})
        return out

    def start(self) -> dict[str, float]:
        return self._now()

    def stop(self, side: str, started: dict[str, float]) -> None:
        now = self._now()
        self.rounds[side].append({k: round(now[k] - started[k], 2) for k in now})

    def medians(self) -> dict[str, dict[str, float]]:
        return {
            side: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            for side, rounds in self.rounds.items()
            if rounds
        }


async def burst(n: int, size: int = 20) -> list[Result]:
    """``size`` sessions requested at once on one sandbox: wall time until all are ready, seen
    on the firehose (one SSE stream, as a dashboard follows them)."""
    result = Result(f"burst ({size} at once)", "s", Side("project: all dockerd.ready"), Side("bare: aiodocker"))
    rss = {"api": 0.0, "worker": 0.0}
    with services() as svc:
        client = await ready_client(svc)
        meter = CpuMeter(svc)
        redis = aioredis.Redis.from_url(svc.redis_url)
        firehose = Keys(svc.key_prefix).firehose
        async with client, bare_runtime(svc.socket_dir, svc.sandbox_id) as runtime:

            async def all_ready(ids: set[str], after: str) -> None:
                async for event in client.events(after=after):
                    if event.type == "session.failed" and event.data.get("session") in ids:
                        raise RuntimeError(event.data)
                    if event.type == "dockerd.ready":
                        ids.discard(event.data.get("session", ""))
                        if not ids:
                            return

            async def project() -> float:
                tail = await redis.xrevrange(firehose, count=1)
                after = tail[0][0].decode() if tail else "0-0"
                cpu = meter.start()
                started = time.perf_counter()
                records = await asyncio.gather(*(client.create() for _ in range(size)))
                sampler = asyncio.create_task(sample_rss(svc, rss))
                try:
                    await asyncio.wait_for(all_ready({r.id for r in records}, after), 300)
                finally:
                    sampler.cancel()
                elapsed = time.perf_counter() - started
                meter.stop("project", cpu)
                await asyncio.gather(*(delete(client, r.id) for r in records))
                return elapsed

            async def bare() -> float:
                sessions = [new_id() for _ in range(size)]
                cpu = meter.start()
                started = time.perf_counter()
                await asyncio.gather(*(bare_bring_up(runtime, s) for s in sessions))
                elapsed = time.perf_counter() - started
                meter.stop("bare", cpu)
                await asyncio.gather(*(bare_remove(runtime, s) for s in sessions))
                return elapsed

            try:
                await alternate(n, project, bare, result)
            finally:
                await redis.aclose()
    result.notes["peak RSS under the burst, MB"] = {k: round(v, 1) for k, v in rss.items()}
    result.notes["CPU seconds per round (median)"] = meter.medians()
    return [result]


async def sample_rss(svc: Services, peak: dict[str, float]) -> None:
    while True:
        peak["api"] = max(peak["api"], rss_mb(svc.api.pid))
        peak["worker"] = max(peak["worker"], rss_mb(svc.worker.pid))
        await asyncio.sleep(0.05)


# -- resume -------------------------------------------------------------------------------------


async def resume(n: int) -> list[Result]:
    """stop → start → dockerd.ready, the volume kept (only the start is timed)."""
    result = Result("resume", "s", Side("project: start → dockerd.ready"), Side("bare: aiodocker"))
    with services() as svc:
        client = await ready_client(svc)
        async with client, bare_runtime(svc.socket_dir, svc.sandbox_id) as runtime:
            record = await client.create()
            await client.wait_ready(record.id, timeout=120)
            sid = record.id
            bare_session = new_id()
            await bare_bring_up(runtime, bare_session)

            last = [(await client.wait_for(sid, {"session.ready"}, timeout=120))[-1].id]

            async def project() -> float:
                await client.stop(sid)
                stopped = await client.wait_for(sid, {"session.stopped"}, timeout=120, after=last[-1])
                started = time.perf_counter()
                await client.start(sid)
                events = await client.wait_for(
                    sid, {"dockerd.ready", "session.failed"}, timeout=120, after=stopped[-1].id
                )
                elapsed = time.perf_counter() - started
                if events[-1].type != "dockerd.ready":
                    raise RuntimeError(events[-1].data)
                ready = await client.wait_for(sid, {"session.ready"}, timeout=30, after=events[-1].id)
                last.append(ready[-1].id)
                return elapsed

            async def bare() -> float:
                await bare_remove(runtime, bare_session, volume=False)
                started = time.perf_counter()
                await bare_bring_up(runtime, bare_session, new_volume=False)
                return time.perf_counter() - started

            await alternate(n, project, bare, result)
            await delete(client, sid)
            await bare_remove(runtime, bare_session)
    return [result]


# -- warm ---------------------------------------------------------------------------------------


async def warm(n: int, pool: int = 2) -> list[Result]:
    """Claim from the pool: POST → session.ready seen on the SSE stream. The baseline is a bare
    cold start (what the pool saves); the targets are absolute (p50 <= 50 ms, p99 <= 150 ms)."""
    result = Result("warm (pool)", "s", Side("project: POST → session.ready"), Side("bare: aiodocker cold"))
    with services(ORCH_POOL_SIZE=str(pool)) as svc:
        client = await ready_client(svc)
        redis = aioredis.Redis.from_url(svc.redis_url)
        pool_key = Keys(svc.key_prefix).pool(svc.sandbox_id)
        async with client, bare_runtime(svc.socket_dir, svc.sandbox_id) as runtime:
            created: list[str] = []

            async def project() -> float:
                async with asyncio.timeout(120):  # not timed: the pool refills between claims
                    while await redis.llen(pool_key) < pool:
                        await asyncio.sleep(0.05)
                started = time.perf_counter()
                record = await client.create()
                events = await client.wait_for(record.id, {"session.ready", "session.failed"}, timeout=120)
                elapsed = time.perf_counter() - started
                if events[-1].type != "session.ready" or not events[-1].data["data"].get("warm"):
                    raise RuntimeError(f"not a warm claim: {events[-1].data}")
                created.append(record.id)
                return elapsed

            await alternate(n, project, lambda: bare_cold(runtime), result)
            await asyncio.gather(*(delete(client, sid) for sid in created))
        await redis.aclose()
    result.notes["baseline"] = "a bare cold start: the ratio is what the pool saves"
    return [result]


# -- events -------------------------------------------------------------------------------------


async def events(n: int, audiences: tuple[int, ...] = (1, 100, 1000)) -> list[Result]:
    """publish → received, by SSE clients of one API process (project) and by clients reading
    the Redis stream directly with XREAD (baseline), for 1, 100 and 1,000 subscribers."""
    results = []
    with services() as svc:
        await wait_healthy(svc.url)
        redis = aioredis.Redis.from_url(svc.redis_url, max_connections=5000)
        keys = Keys(svc.key_prefix)
        bus = EventBus(redis, keys)
        for count in audiences:
            result = Result(
                f"events ({count} subscribers)",
                "s",
                Side("project: SSE via the API"),
                Side("bare: XREAD on Redis"),
            )
            # Alternate whole rounds: a round is `n` events to every subscriber of one kind.
            for i in range(2):
                for kind in ("project", "bare") if i % 2 == 0 else ("bare", "project"):
                    side = result.project if kind == "project" else result.baseline
                    try:
                        latencies, cpu = await deliver(kind, svc, bus, redis, keys, count, max(1, n // 2))
                        side.values += latencies
                        if kind == "project":
                            note = "API CPU per event, ms (fan-out to all subscribers)"
                            result.notes[note] = round(cpu / max(1, n // 2) * 1000, 2)
                    except Exception as e:
                        side.failures += 1
                        print(f"  events {kind} x{count}: failed: {type(e).__name__}: {e}", flush=True)
            results.append(result)
            print(f"  events x{count} done", flush=True)
        await redis.aclose()
    return results


# One event every 200 ms: each is fanned out on its own (a steady 5 events/s to every client).
EVENT_SPACING_S = float(os.environ.get("BENCH_EVENT_SPACING", "0.2"))


async def deliver(
    kind: str, svc: Services, bus: EventBus, redis: aioredis.Redis, keys: Keys, count: int, n: int
) -> tuple[list[float], float]:
    """Latencies of ``n`` events to ``count`` subscribers, and the API's CPU seconds meanwhile."""
    latencies: list[float] = []
    ready = asyncio.Semaphore(0)
    done = asyncio.Event()
    tag = uuid.uuid4().hex[:8]
    start = await bus.last_id(keys.firehose)
    sink = _Sink(tag, latencies, ready, done)

    def subscriber() -> Coroutine[Any, Any, None]:
        return _sse_subscriber(svc, sink) if kind == "project" else _xread_subscriber(redis, keys.firehose, start, sink)

    tasks = [asyncio.create_task(subscriber()) for _ in range(count)]
    try:
        async with asyncio.timeout(120):
            for _ in range(count):
                await ready.acquire()
        await asyncio.sleep(0.5)  # the last subscribers' first read reaches Redis
        cpu = cpu_seconds(svc.api.pid)
        for _ in range(n):
            await bus.publish(make_event(f"bench.{tag}", sandbox="bench", data={"sent": time.time()}))
            await asyncio.sleep(EVENT_SPACING_S)
        async with asyncio.timeout(30):
            while len(latencies) < count * n:
                await asyncio.sleep(0.05)
        cpu = cpu_seconds(svc.api.pid) - cpu
    finally:
        done.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return latencies, cpu


@dataclass(frozen=True)
class _Sink:
    """Where a subscriber of ``deliver`` puts what it measures: the events of type bench.<tag>
    arrive, their latencies go to ``latencies``; ``ready`` once it reads, until ``done``."""

    tag: str
    latencies: list[float]
    ready: asyncio.Semaphore
    done: asyncio.Event


async def _sse_subscriber(svc: Services, sink: _Sink) -> None:
    host, port = svc.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
    writer.write(
        (
            f"GET /v1/events?type=bench.{sink.tag} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {svc.token}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    released = False
    try:
        while not sink.done.is_set():
            line = await reader.readline()
            if not line:
                return
            if not released and line.startswith(b"retry:"):
                released = True
                sink.ready.release()
            at = line.find(b'"sent":')
            if at >= 0:
                received = time.time()
                sent = float(line[at + 7 : line.index(b"}", at)].split(b",")[0])
                sink.latencies.append(received - sent)
    finally:
        writer.close()


async def _xread_subscriber(redis: aioredis.Redis, firehose: str, start: str, sink: _Sink) -> None:
    conn = aioredis.Redis(connection_pool=redis.connection_pool)
    last = start  # not "$": a subscriber still connecting must not miss the first events
    sink.ready.release()
    while not sink.done.is_set():
        reply = await conn.xread({firehose: last}, block=1000)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                received = time.time()
                body = json.loads(fields[b"event"])
                if body["type"] == f"bench.{sink.tag}":
                    sink.latencies.append(received - body["data"]["sent"])


# -- queue --------------------------------------------------------------------------------------


async def queue(n: int) -> list[Result]:
    """enqueue → the worker's handler starts, for a no-op lifecycle job (a stop of a session that
    does not exist: the handler starts, finds nothing, returns). Baseline: LPUSH → BLPOP."""
    result = Result("queue pickup", "s", Side("project: arq enqueue → handler"), Side("bare: LPUSH → BLPOP"))
    tag = uuid.uuid4().hex[:6]
    settings = replace(
        Settings.from_env(),
        key_prefix=f"bench-{tag}:",
        sandbox_id=f"bench{tag}",
        socket_dir=f"/tmp/orch-bench-{tag}",
        reconcile_interval_s=3600,
        heartbeat_interval_s=3600,
        lost_after_s=7200,
    )
    sandbox = SandboxWorker(settings)
    started: dict[str, float] = {}
    arrived: dict[str, asyncio.Event] = {}
    real_run = sandbox.lifecycle.run

    async def timed_run(operation: Operation, session_id: str, generation: int, *, resumed: bool = False) -> str:
        started[session_id] = time.perf_counter()
        arrived[session_id].set()
        return await real_run(operation, session_id, generation, resumed=resumed)

    sandbox.lifecycle.run = timed_run  # type: ignore[method-assign]
    stop = asyncio.Event()
    serving = asyncio.create_task(sandbox.serve(stop))
    await asyncio.wait_for(sandbox.started.wait(), 60)
    redis = redis_client(settings)  # what the API enqueues with
    jobs = JobQueue(redis, Keys(settings.key_prefix))
    bare_key = f"bench-{tag}:bare-queue"
    consumer = aioredis.Redis.from_url(settings.redis_url)
    try:

        async def project() -> float:
            sid = f"s-nothing-{uuid.uuid4().hex[:10]}"
            arrived[sid] = asyncio.Event()
            # Requests arrive at random times, not just after the worker's last poll.
            await asyncio.sleep(random.uniform(0, 0.05))
            sent = time.perf_counter()
            await jobs.enqueue(Operation.STOP, settings.sandbox_id, sid, 1)
            await asyncio.wait_for(arrived[sid].wait(), 10)
            return started.pop(sid) - sent

        async def bare() -> float:
            waiter = asyncio.create_task(consumer.blpop([bare_key], timeout=10))
            await asyncio.sleep(random.uniform(0.005, 0.05))  # the consumer is blocked in BLPOP, as a worker would be
            sent = time.perf_counter()
            await redis.lpush(bare_key, "job")  # type: ignore[misc]
            await waiter
            return time.perf_counter() - sent

        await alternate(n, project, bare, result)
    finally:
        stop.set()
        await asyncio.wait_for(serving, 60)
        await redis.aclose()
        await consumer.aclose()
    result.notes["worker wake-ups"] = (
        f"BLPOP on the queue's wake-up list, fallback poll every {settings.poll_fallback_s:g} s"
        if settings.poll_fallback_s > 0
        else f"none: a poll every {settings.poll_delay_s * 1000:.0f} ms (arq's default is 500 ms)"
    )
    return [result]


# -- footprint ----------------------------------------------------------------------------------


async def footprint(n: int) -> list[Result]:
    """RSS of the API and a worker at idle, under a burst of 20 creates, and after; Redis
    memory per idle (ready) session, its event streams aside."""
    result = Result("footprint", "MB", Side("project"), Side("-"))
    with services() as svc:
        client = await ready_client(svc)
        async with client:
            await asyncio.sleep(2)  # idle: nothing in flight
            idle = {"api": rss_mb(svc.api.pid), "worker": rss_mb(svc.worker.pid)}
            peak = dict(idle)
            sampler = asyncio.create_task(sample_rss(svc, peak))
            records = await asyncio.gather(*(client.create() for _ in range(20)))
            await asyncio.gather(*(client.wait_ready(r.id, timeout=300) for r in records))
            sampler.cancel()
            redis = aioredis.Redis.from_url(svc.redis_url)
            keys = Keys(svc.key_prefix)
            per_session = []
            index = await redis.memory_usage(keys.session_index) or 0
            for r in records:
                used = await redis.memory_usage(keys.session(r.id)) or 0
                used += await redis.memory_usage(keys.session_env(r.id)) or 0
                per_session.append(used + index / len(records))
            await redis.aclose()
            await asyncio.gather(*(delete(client, r.id) for r in records))
            after = {"api": rss_mb(svc.api.pid), "worker": rss_mb(svc.worker.pid)}
    result.project.values = [idle["worker"]]
    result.notes.update(
        {
            "RSS idle, MB": {k: round(v, 1) for k, v in idle.items()},
            "RSS peak under 20 creates, MB": {k: round(v, 1) for k, v in peak.items()},
            "RSS after deleting them, MB": {k: round(v, 1) for k, v in after.items()},
            "Redis per idle session, bytes (record + env + share of the index)": round(statistics.mean(per_session)),
        }
    )
    return [result]


# -- profiles -------------------------------------------------------------------------------------


async def profiles(n: int, burst_size: int = 10) -> list[Result]:
    """The default privilege profile against the caps profile, both through the project's path
    (two workers on the same dockerd, alternating): cold (POST → dockerd.ready), resume (start →
    dockerd.ready) and a burst of ``burst_size`` creates (wall time to the last dockerd.ready)."""
    cold_r = Result("cold: default vs caps", "s", Side("default profile: POST → ready"), Side("caps: POST → ready"))
    resume_r = Result("resume: default vs caps", "s", Side("default profile: start → ready"), Side("caps"))
    burst_r = Result(f"burst {burst_size}: default vs caps", "s", Side("default profile: all ready"), Side("caps"))
    with services() as default_svc, services(ORCH_PRIVILEGE="caps") as caps_svc:
        default, caps = await ready_client(default_svc), await ready_client(caps_svc)
        async with default, caps:
            kinds = {}
            for name, client, svc in (("default", default, default_svc), ("caps", caps, caps_svc)):
                box = next(b for b in await client.sandboxes() if b.id == svc.sandbox_id)
                kinds[name] = box.privilege
            cold_r.notes["profiles"] = kinds
            phases: dict[str, list[dict[str, int]]] = {"default": [], "caps": []}
            await alternate(
                n, lambda: cold_once(default, phases["default"]), lambda: cold_once(caps, phases["caps"]), cold_r
            )
            # The worker's own phases (session.ready's phases_ms): where the profiles differ.
            for name, seen in phases.items():
                if seen:
                    cold_r.notes[f"{name} phases, median ms"] = {
                        k: statistics.median(p.get(k, 0) for p in seen) for k in seen[0]
                    }
            resumes = [await Resumable.make(default), await Resumable.make(caps)]
            await alternate(n, resumes[0].once, resumes[1].once, resume_r)
            for r in resumes:
                await delete(r.client, r.session)
            rounds = max(1, n // 5)
            await alternate(
                rounds, lambda: burst_once(default, burst_size), lambda: burst_once(caps, burst_size), burst_r
            )
    return [cold_r, resume_r, burst_r]


async def cold_once(client: Client, phases: list[dict[str, int]] | None = None) -> float:
    started = time.perf_counter()
    record = await client.create()
    events = await client.wait_for(record.id, {"dockerd.ready", "session.failed"}, timeout=120)
    elapsed = time.perf_counter() - started
    ready = await client.wait_for(record.id, {"session.ready", "session.failed"}, timeout=30, after=events[-1].id)
    if phases is not None and ready[-1].type == "session.ready":
        phases.append(ready[-1].data["data"]["phases_ms"])
    await delete(client, record.id)
    if events[-1].type != "dockerd.ready":
        raise RuntimeError(events[-1].data)
    return elapsed


async def burst_once(client: Client, size: int) -> float:
    started = time.perf_counter()
    records = await asyncio.gather(*(client.create() for _ in range(size)))
    waits = [client.wait_for(r.id, {"dockerd.ready", "session.failed"}, timeout=300) for r in records]
    outcomes = await asyncio.gather(*waits)
    elapsed = time.perf_counter() - started
    await asyncio.gather(*(delete(client, r.id) for r in records))
    failed = [seen[-1].data for seen in outcomes if seen[-1].type != "dockerd.ready"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {size} failed: {failed[0]}")
    return elapsed


class Resumable:
    """One ready session that is stopped and started again, each round."""

    def __init__(self, client: Client, session: str, last: str) -> None:
        self.client, self.session, self.last = client, session, last

    @classmethod
    async def make(cls, client: Client) -> Resumable:
        record = await client.create()
        ready = await client.wait_for(record.id, {"session.ready"}, timeout=120)
        return cls(client, record.id, ready[-1].id)

    async def once(self) -> float:
        client, sid = self.client, self.session
        await client.stop(sid)
        stopped = await client.wait_for(sid, {"session.stopped"}, timeout=120, after=self.last)
        started = time.perf_counter()
        await client.start(sid)
        events = await client.wait_for(sid, {"dockerd.ready", "session.failed"}, timeout=120, after=stopped[-1].id)
        elapsed = time.perf_counter() - started
        if events[-1].type != "dockerd.ready":
            raise RuntimeError(events[-1].data)
        ready = await client.wait_for(sid, {"session.ready"}, timeout=30, after=events[-1].id)
        self.last = ready[-1].id
        return elapsed


# -- exec ---------------------------------------------------------------------------------------


async def execs(n: int, concurrent: int = 100) -> list[Result]:
    """`true` in a ready desktop: through the API (wait), and through the command stream (XADD →
    exec.exited on the firehose), against aiodocker's exec of the same command (desktop-enter
    true) run directly on the sandbox's daemon. Then 100 at once through the API."""
    api_r = Result("exec true: API (wait)", "s", Side("project: POST exec wait"), Side("bare: aiodocker exec"))
    queue_r = Result(
        "exec true: command stream", "s", Side("project: XADD → exec.exited"), Side("bare: aiodocker exec")
    )
    many_r = Result(f"{concurrent} execs at once", "s", Side("project: all ended"), Side("bare: aiodocker, all"))
    with services(ORCH_EXEC_MAX_PER_SESSION=str(concurrent + 10)) as svc:
        client = await ready_client(svc)
        redis = redis_client(Settings(redis_url=svc.redis_url))
        keys = Keys(svc.key_prefix)
        async with client, aiodocker.Docker() as docker:
            record = await client.create()
            await client.wait_ready(record.id, timeout=120)
            desktop = docker.containers.container(desktop_name(record.id))

            async def bare() -> float:
                started = time.perf_counter()
                run = await desktop.exec(["desktop-enter", "true"])
                async with run.start(detach=False) as stream:
                    while await stream.read_out() is not None:
                        pass
                if (await run.inspect())["ExitCode"] != 0:
                    raise RuntimeError("bare exec failed")
                return time.perf_counter() - started

            async def via_api() -> float:
                started = time.perf_counter()
                done = await client.exec(record.id, ["true"])
                if done.exit_code != 0:
                    raise RuntimeError(done)
                return time.perf_counter() - started

            async def many(project: bool) -> float:
                started = time.perf_counter()
                await asyncio.gather(*(via_api() if project else bare() for _ in range(concurrent)))
                return time.perf_counter() - started

            await alternate(n, via_api, bare, api_r)
            await alternate(n, lambda: _exec_via_commands(redis, keys, record.id), bare, queue_r)
            await alternate(max(1, n // 20), lambda: many(True), lambda: many(False), many_r)
            await delete(client, record.id)
        await redis.aclose()
    return [api_r, queue_r, many_r]


async def _exec_via_commands(redis: aioredis.Redis, keys: Keys, session_id: str) -> float:
    """`true` through the command stream: from the XADD to its exec.exited on the firehose."""
    request = new_id("req")
    last = await redis.xrevrange(keys.firehose, count=1)
    after = last[0][0] if last else "0-0"
    command = {"op": "exec", "request_id": request, "session": session_id, "cmd": ["true"]}
    started = time.perf_counter()
    await redis.xadd(keys.commands(), {"command": json.dumps(command)})
    while True:
        reply = await redis.xread({keys.firehose: after}, block=10_000)
        if not reply:
            raise RuntimeError("no exec.exited within 10 s")
        for entry_id, fields in reply[0][1]:
            after = entry_id
            event = json.loads(fields[b"event"])
            if event["type"] == "exec.exited" and event["data"].get("request_id") == request:
                return time.perf_counter() - started


async def desktop_io(n: int) -> list[Result]:
    from .desktop_io import files  # (it imports this module's helpers)

    return await files(n)


SCENARIOS: dict[str, Scenario] = {
    "cold": cold,
    "burst": burst,
    "resume": resume,
    "warm": warm,
    "events": events,
    "queue": queue,
    "footprint": footprint,
    "profiles": profiles,
    "exec": execs,
    "files-worker": desktop_io,
}

# Rounds per scenario for `-n` (the counts: 20 sequential sessions; 20-at-once bursts).
DEFAULT_N = {
    "cold": 20,
    "burst": 3,
    "resume": 20,
    "warm": 20,
    "events": 40,
    "queue": 200,
    "footprint": 1,
    "profiles": 10,
    "exec": 100,
    "files-worker": 10,
}
