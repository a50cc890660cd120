"""GET /metrics of the real API over a real Redis: a fleet written as heartbeats would leave
it, creates through the API, and the samples read back against what Redis holds. No Docker."""

from __future__ import annotations

import time

import msgspec
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.client import ApiError, Client
from orchestrator.config import Settings
from orchestrator.keys import Keys
from orchestrator.schemas import SandboxInfo
from tests.conftest import awaited


def heartbeat(id: str, capacity: int, pool_ready: int = 0, pool_target: int = 0) -> bytes:
    info = SandboxInfo(
        id=id,
        depth=1,
        version="0.1.0",
        hostname="h",
        sessions=0,
        capacity=capacity,
        load=0.0,
        free_disk_bytes=0,
        privilege="caps",
        ts="2026-01-01T00:00:00.000Z",
        pool_ready=pool_ready,
        pool_target=pool_target,
    )
    return msgspec.json.encode(info)


async def test_metrics_say_what_redis_holds(client: Client, redis: aioredis.Redis, settings: Settings) -> None:
    keys = Keys(settings.key_prefix)
    # "up": live, cap 3, two sessions placed already and a job queued 5 s ago; "gone": no heartbeat.
    await redis.set(keys.sandbox("up"), heartbeat("up", 3, pool_ready=1, pool_target=2))
    await redis.set(keys.sandbox_alive("up"), "x", px=60_000)
    await awaited(redis.sadd(keys.placed("up"), "old-1", "old-2"))
    await redis.zadd(keys.queue("up"), {"create_session:old-1:1": time.time() * 1000 - 5000})
    await redis.set(keys.sandbox("gone"), heartbeat("gone", 6))
    await awaited(redis.sadd(keys.sandbox_index, "up", "gone"))

    await client.create("fits")  # the last place on "up"
    with pytest.raises(ApiError, match="no_capacity"):
        await client.create("no-room")

    text = await client.metrics()
    # Prometheus's own parser: the text must be valid, with its 18 families.
    families = list(text_string_to_metric_families(text))
    assert len(families) == 18
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}

    def metric(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert metric("orchestrator_sessions", state="pending") == 1
    assert metric("orchestrator_sessions", state="ready") == 0
    assert metric("orchestrator_sandboxes", status="available") == 1
    assert metric("orchestrator_sandboxes", status="unavailable") == 1
    assert metric("orchestrator_sandboxes_live") == 1
    assert metric("orchestrator_sandbox_up", sandbox="up") == 1
    assert metric("orchestrator_sandbox_up", sandbox="gone") == 0
    assert metric("orchestrator_sandbox_placed", sandbox="up") == 3
    assert metric("orchestrator_sandbox_capacity", sandbox="gone") == 6
    assert metric("orchestrator_queue_depth", sandbox="up") == 2  # the old job and the create's
    assert 5 <= metric("orchestrator_queue_oldest_age_seconds", sandbox="up") < 30
    assert metric("orchestrator_queue_oldest_age_seconds", sandbox="gone") == 0
    assert metric("orchestrator_pool_ready", sandbox="up") == 1
    assert metric("orchestrator_pool_target", sandbox="up") == 2
    assert metric("orchestrator_sandboxes_desired") == 1  # 3 placed / cap 3
    assert metric("orchestrator_capacity_refusals_total") == 1
    assert metric("orchestrator_event_stream_length") == await redis.xlen(keys.firehose) > 0
    assert metric("orchestrator_sse_followers") == 0
    # The command stream: nothing waiting, nothing held.
    assert metric("orchestrator_command_lag", tenant="default") == 0
    assert metric("orchestrator_command_pending", tenant="default") == 0
