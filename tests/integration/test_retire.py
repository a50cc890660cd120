"""Retiring a sandbox that will never return (POST /v1/sandboxes/{id}/retire), over the real
API and a real Redis: heartbeats written through the registry, records through the store, as
a worker would have left them. No Docker. Also the sandbox keys' expiries (L6) and what the
API tells callers when Redis or the queue fails (L4)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any, cast

import httpx
import pytest
import redis.asyncio as aioredis

from orchestrator.client import ApiError, Client
from orchestrator.config import Settings
from orchestrator.events import EventBus
from orchestrator.keys import Keys
from orchestrator.queue import JobQueue
from orchestrator.records import new_record
from orchestrator.sandboxes import SANDBOX_INFO_TTL_S, SandboxRegistry
from orchestrator.schemas import DrainRequest, SandboxInfo, SessionCreate
from orchestrator.states import SandboxStatus
from orchestrator.states import SessionState as S
from orchestrator.store import SessionStore
from tests.conftest import awaited, free_port
from tests.fakes import open_stack
from workers.drain import Drain

from .conftest import running_api

GONE = "gone-box"
# Each session's way from pending to the state the sandbox left it in.
PATHS = {
    "r-ready": [S.CREATING, S.STARTING, S.READY],
    "r-failed": [S.FAILED],
    "r-stopped": [S.CREATING, S.STARTING, S.READY, S.STOPPING, S.STOPPED],
    "r-deleting": [S.DELETING],
}


def info(sandbox_id: str, status: SandboxStatus = SandboxStatus.AVAILABLE) -> SandboxInfo:
    return SandboxInfo(
        id=sandbox_id,
        depth=1,
        version="0.1.0",
        hostname="h",
        sessions=0,
        capacity=8,
        load=0.0,
        free_disk_bytes=0,
        privilege="caps",
        ts="2026-01-01T00:00:00.000Z",
        status=status,
        lost_after_s=120.0,
    )


@dataclasses.dataclass
class Parts:
    keys: Keys
    registry: SandboxRegistry
    store: SessionStore


@pytest.fixture
def parts(redis: aioredis.Redis, settings: Settings) -> Parts:
    keys = Keys(settings.key_prefix)
    return Parts(keys, SandboxRegistry(redis, keys), SessionStore(redis, EventBus(redis, keys)))


async def live(parts: Parts, sandbox_id: str, status: SandboxStatus = SandboxStatus.AVAILABLE) -> None:
    """One heartbeat, as workers/heartbeat.py sends it."""
    if status is not SandboxStatus.DRAINED:
        assert await parts.registry.mark_alive(sandbox_id, 120.0)
    assert await parts.registry.beat(info(sandbox_id, status))


async def events(redis: aioredis.Redis, keys: Keys, session_id: str) -> list[dict[str, Any]]:
    entries = await redis.xrange(keys.session_events(session_id))
    return [json.loads(fields[b"event"]) for _, fields in entries]


async def leave_a_dead_sandbox(parts: Parts, redis: aioredis.Redis, settings: Settings) -> None:
    """GONE beat, had a session in each state, a warm desktop, a queued job, a drain asked for
    and a lost mark, then went silent (its alive key lapsed)."""
    await live(parts, GONE)
    for sid, path in PATHS.items():
        await parts.store.create(new_record(SessionCreate(id=sid), GONE, settings))
        for state in path:
            if state is S.FAILED:
                await parts.store.fail(sid, None, "desktop_lost", "silent")
            else:
                await parts.store.transition(sid, state)
    k = parts.keys
    await awaited(redis.rpush(k.pool(GONE), "r-ready"))
    await awaited(redis.rpush(k.pool(GONE, "graphical"), "r-ready-graphical"))
    await redis.zadd(k.queue(GONE), {"delete_session:r-deleting:1": 1})
    await awaited(redis.sadd(k.placed(GONE), "a-ghost"))  # its record is long gone
    await parts.registry.request_drain(GONE, DrainRequest(by="api"))
    await redis.delete(k.sandbox_alive(GONE))
    assert await parts.registry.declare_lost(GONE, "2026-01-01T00:00:00.000Z")


async def test_a_retired_sandbox_ends_every_session_and_leaves_nothing(
    client: Client, redis: aioredis.Redis, settings: Settings, parts: Parts
) -> None:
    await leave_a_dead_sandbox(parts, redis, settings)
    await live(parts, "other")
    await parts.store.create(new_record(SessionCreate(id="o-kept"), "other", settings))
    assert {s.id: s.status for s in await client.sandboxes()}[GONE] is SandboxStatus.UNAVAILABLE

    retired = await client.retire(GONE)

    assert sorted(retired.sessions) == sorted(PATHS)
    for sid in PATHS:
        with pytest.raises(ApiError, match="session_not_found"):
            await client.get(sid)
        history = await events(redis, parts.keys, sid)
        assert "session.failed" not in [e["type"] for e in history[-2:]]  # a delete never fails
        assert [e["type"] for e in history[-2:]] == ["session.deleting", "session.deleted"] or (
            sid == "r-deleting" and history[-1]["type"] == "session.deleted"
        )
        assert history[-1]["data"] == {"from": "deleting", "reason": "sandbox_retired", "volume_removed": False}
    assert [r.id for r in await client.list()] == ["o-kept"]
    assert [s.id for s in await client.sandboxes()] == ["other"]
    k = parts.keys
    left = [
        k.sandbox(GONE),
        k.sandbox_alive(GONE),
        k.sandbox_drain(GONE),
        k.sandbox_lost(GONE),
        k.pool(GONE),
        k.pool(GONE, "graphical"),
        k.queue(GONE),
        k.placed(GONE),
        *(k.session(s) for s in PATHS),
        *(k.session_env(s) for s in PATHS),
    ]
    assert await redis.exists(*left) == 0
    assert not await awaited(redis.sismember(k.sandbox_index, GONE))
    assert await redis.exists(k.sandbox_retired(GONE))
    firehose = [json.loads(f[b"event"]) for _, f in await redis.xrange(k.firehose)]
    announced = [e for e in firehose if e["type"] == "sandbox.retired"]
    assert [(e["sandbox"], e["data"]) for e in announced] == [(GONE, {"sessions": 4})]

    # Its worker comes back anyway: every beat is refused, nothing is listed again.
    assert not await parts.registry.mark_alive(GONE, 120.0)
    assert not await parts.registry.beat(info(GONE))
    assert await redis.exists(k.sandbox(GONE), k.sandbox_alive(GONE)) == 0
    assert [s.id for s in await client.sandboxes()] == ["other"]
    # Asking again is harmless (it finishes an interrupted retire).
    assert (await client.retire(GONE)).sessions == []


async def test_a_live_sandbox_is_not_retired_and_an_unknown_one_is_not_found(
    client: Client, redis: aioredis.Redis, settings: Settings, parts: Parts
) -> None:
    await live(parts, "up")
    await live(parts, "draining")
    await parts.registry.request_drain("draining", DrainRequest(by="api"))
    await parts.store.create(new_record(SessionCreate(id="u-one"), "up", settings))
    for sandbox in ("up", "draining"):
        with pytest.raises(ApiError) as refused:
            await client.retire(sandbox)
        assert (refused.value.status, refused.value.code) == (409, "sandbox_live")
    assert not await redis.exists(parts.keys.sandbox_retired("up"))
    assert (await client.get("u-one")).state is S.PENDING
    assert {s.id for s in await client.sandboxes()} == {"up", "draining"}

    with pytest.raises(ApiError) as unknown:
        await client.retire("never-seen")
    assert (unknown.value.status, unknown.value.code) == (404, "sandbox_not_found")

    # A drained one (its worker said goodbye) may be retired.
    await live(parts, "left", SandboxStatus.DRAINED)
    assert (await client.retire("left")).sessions == []
    assert "left" not in {s.id for s in await client.sandboxes()}


async def test_the_lost_mark_and_drain_requests_expire_with_the_sandbox(
    redis: aioredis.Redis, settings: Settings, parts: Parts
) -> None:
    """L6: a sandbox that never returns (and is never retired) leaves no key forever."""
    k = parts.keys
    await live(parts, "b")
    assert await parts.registry.request_drain("b", DrainRequest(by="api"))
    assert 0 < await redis.ttl(k.sandbox_drain("b")) <= SANDBOX_INFO_TTL_S
    await redis.expire(k.sandbox_drain("b"), 60)
    await live(parts, "b", SandboxStatus.DRAINED)  # an idle drained worker's beat renews it
    assert await redis.ttl(k.sandbox_drain("b")) > 60
    assert await parts.registry.declare_lost("b", "2026-01-01T00:00:00.000Z")
    assert 0 < await redis.ttl(k.sandbox_lost("b")) <= SANDBOX_INFO_TTL_S


async def test_healthz_says_nothing_of_the_redis_it_cannot_reach(settings: Settings) -> None:
    """L4: /healthz is open to anyone; the Redis error (host, port) goes to the log only."""
    port = free_port()
    dead = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{port}/0")
    async with running_api(dead) as url, httpx.AsyncClient(base_url=url) as http:
        health = await http.get("/healthz")
    assert health.status_code == 503
    assert health.json() == {"status": "unhealthy", "redis": "unreachable"}


async def test_an_enqueue_failure_tells_the_caller_nothing_internal(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L4: the exception (a host, a Redis error) stays in the API's log."""

    async def unreachable(*_: object, **__: object) -> bool:
        raise ConnectionError("Error 111 connecting to redis-internal.example:6379. Connection refused.")

    monkeypatch.setattr(JobQueue, "enqueue", unreachable)
    with pytest.raises(ApiError) as refused:
        await client.create("q-one")
    assert (refused.value.status, refused.value.code) == (503, "queue_unavailable")
    assert "redis-internal" not in refused.value.message and "111" not in refused.value.message


async def test_a_worker_of_a_retired_sandbox_stops_and_a_restarted_one_idles(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """workers/drain.py: the watch ends the worker's run; at start it idles, beating nothing."""
    caplog.set_level(logging.WARNING, "workers.drain")
    async with open_stack(redis_url) as stack:
        registry = SandboxRegistry(stack.redis, stack.keys)
        beats: list[None] = []

        async def beat() -> None:
            beats.append(None)

        drain = Drain(
            stack.settings, registry, stack.bus, stack.store, stack.lifecycle, cast(Any, None), cast(Any, None), beat
        )
        assert await registry.retire(stack.settings.sandbox_id)

        async with asyncio.timeout(10):
            await drain.watch()  # returns: the worker's run ends as after a drain
        assert drain.drained.is_set() and drain.status is SandboxStatus.DRAINED

        stop = asyncio.Event()
        idling = asyncio.create_task(drain.wait_while_drained(stop))
        async with asyncio.timeout(10):
            while "is retired: this worker idles" not in caplog.text:
                await asyncio.sleep(0.01)
        assert not idling.done()
        stop.set()
        async with asyncio.timeout(10):
            assert await idling is False
        assert beats == []


async def test_a_retired_default_sandbox_takes_no_fallback_creates(
    client: Client, settings: Settings, parts: Parts
) -> None:
    """ORCH_DEFAULT_SANDBOX queues creates while nothing has reported; never for a retired one."""
    assert settings.default_sandbox
    await live(parts, settings.default_sandbox, SandboxStatus.DRAINED)
    await client.retire(settings.default_sandbox)
    with pytest.raises(ApiError) as refused:
        await client.create("f-one")
    assert refused.value.status in (422, 503)
    assert await client.list() == []
