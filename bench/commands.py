"""The command stream (docs/jobs.md) against HTTP: a create sent with one ``XADD`` to its
``session.ready`` on the firehose, against the same through ``POST /v1/sessions``, alternating in
one run; and 1,000 commands sent at once: how fast they are accepted, and how long each waits."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from orchestrator.keys import Keys
from orchestrator.sandboxes import SandboxRegistry
from orchestrator.schemas import SandboxInfo, now_rfc3339

from .harness import Result, Side, alternate, percentile, services
from .scenarios import Scenario, delete, ready_client


class Follower:
    """Reads the firehose from where it was made, keeping what each request id was told."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.stream = keys.firehose
        self.cursor = "$"
        self.seen: dict[tuple[str, str], float] = {}  # (request id, type) → when read
        self.data: dict[tuple[str, str], dict[str, Any]] = {}

    async def start(self) -> None:
        last = await self.redis.xrevrange(self.stream, count=1)
        self.cursor = last[0][0].decode() if last else "0-0"

    async def until(self, request_id: str, types: set[str], timeout: float = 120) -> tuple[str, float]:
        async with asyncio.timeout(timeout):
            while True:
                for t in types:
                    if (request_id, t) in self.seen:
                        return t, self.seen[(request_id, t)]
                await self.read()

    async def read(self) -> None:
        reply: Any = await self.redis.xread({self.stream: self.cursor}, count=1000, block=1000)
        now = time.perf_counter()
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self.cursor = entry_id.decode()
                event = json.loads(fields[b"event"])
                rid = event.get("data", {}).get("request_id")
                if rid is not None:
                    self.seen.setdefault((rid, event["type"]), now)
                    self.data.setdefault((rid, event["type"]), event["data"])


async def command_ready(n: int) -> list[Result]:
    """``XADD`` create → ``session.ready`` on the firehose, against POST → ``session.ready`` on
    the session's SSE stream; each session deleted (untimed) before the next."""
    result = Result("command create", "s", Side("project: XADD → session.ready"), Side("HTTP: POST → session.ready"))
    with services() as svc:
        client = await ready_client(svc)
        keys = Keys(svc.key_prefix)
        redis = aioredis.Redis.from_url(svc.redis_url)
        follower = Follower(redis, keys)
        await follower.start()
        try:

            async def by_command() -> float:
                rid = f"bench-{uuid.uuid4().hex[:10]}"
                started = time.perf_counter()
                await redis.xadd(keys.commands(), {"command": json.dumps({"op": "create", "request_id": rid})})
                outcome, at = await follower.until(rid, {"session.ready", "session.failed", "command.rejected"})
                if outcome != "session.ready":
                    raise RuntimeError(f"{outcome}: {follower.data.get((rid, outcome))}")
                await delete(client, follower.data[(rid, "command.accepted")]["session"])
                return at - started

            async def by_http() -> float:
                started = time.perf_counter()
                record = await client.create()
                events = await client.wait_for(record.id, {"session.ready", "session.failed"}, timeout=120)
                elapsed = time.perf_counter() - started
                await delete(client, record.id)
                if events[-1].type != "session.ready":
                    raise RuntimeError(events[-1].data)
                return elapsed

            await alternate(n, by_command, by_http, result)
        finally:
            await client.aclose()
            await redis.aclose()
    return [result]


async def command_burst(n: int, size: int = 1000) -> list[Result]:
    """``size`` creates sent at once (one pipeline of XADDs), pinned to a sandbox that only
    beats (no desktop starts): accepted per second, and each one's XADD → command.accepted."""
    result = Result(f"command burst x{size}", "s", Side("project: XADD → command.accepted"), Side("-"))
    rates = []
    with services() as svc:
        await (await ready_client(svc)).aclose()
        keys = Keys(svc.key_prefix)
        redis = aioredis.Redis.from_url(svc.redis_url)
        box = f"{svc.sandbox_id}-idle"
        registry = SandboxRegistry(redis, keys)
        info = SandboxInfo(
            id=box,
            depth=1,
            version="bench",
            hostname="bench",
            sessions=0,
            capacity=size * n + 10,
            load=0.0,
            free_disk_bytes=0,
            privilege="caps",
            ts=now_rfc3339(),
            lost_after_s=600.0,
        )
        await registry.mark_alive(box, 600.0)
        await registry.beat(info)
        follower = Follower(redis, keys)
        await follower.start()
        try:
            for round_ in range(n):
                tag = uuid.uuid4().hex[:6]
                rids = [f"burst-{tag}-{i}" for i in range(size)]
                async with redis.pipeline(transaction=False) as pipe:
                    for rid in rids:
                        body = {"op": "create", "request_id": rid, "sandbox": box}
                        pipe.xadd(keys.commands(), {"command": json.dumps(body)})
                    sent = time.perf_counter()
                    await pipe.execute()
                answered = [(await follower.until(rid, {"command.accepted", "command.rejected"}, 300)) for rid in rids]
                refused = [t for t, _ in answered if t != "command.accepted"]
                if refused:
                    raise RuntimeError(f"{len(refused)} of {size} refused")
                waits = [at - sent for _, at in answered]
                result.project.values += waits
                rates.append(size / max(waits))
                rate, p99 = size / max(waits), percentile(waits, 99)
                print(f"  burst {round_ + 1}/{n}: {rate:.0f} accepted/s, p99 {p99:.2f} s", flush=True)
        finally:
            await redis.aclose()
    result.notes["accepted per second"] = [round(r) for r in rates]
    return [result]


SCENARIOS: dict[str, Scenario] = {"commands": command_ready, "command-burst": command_burst}
DEFAULT_N = {"commands": 20, "command-burst": 2}
