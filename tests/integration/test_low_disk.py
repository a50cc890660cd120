"""The free-disk watermark over the real API and a real Redis (no worker, no Docker): the
heartbeats say each sandbox's free disk and its own watermark, as workers/heartbeat.py sends
them; placement never puts a new session on a sandbox below its watermark, and when every
sandbox that could take one is, the create is refused 503 ``no_capacity`` saying so."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from orchestrator.client import ApiError, Client
from orchestrator.config import Settings
from orchestrator.keys import Keys
from orchestrator.sandboxes import SandboxRegistry
from orchestrator.schemas import SandboxInfo

from .test_cli import cli

GIB = 2**30
WATERMARK = 2 * GIB


async def beat(redis: aioredis.Redis, settings: Settings, sandbox: str, free: int) -> None:
    registry = SandboxRegistry(redis, Keys(settings.key_prefix))
    assert await registry.mark_alive(sandbox, 120.0)
    info = SandboxInfo(
        id=sandbox,
        depth=1,
        version="0.1.0",
        hostname="h",
        sessions=0,
        capacity=50,
        load=0.0,
        free_disk_bytes=free,
        min_free_disk_bytes=WATERMARK,
        privilege="caps",
        ts="2026-01-01T00:00:00.000Z",
        lost_after_s=120.0,
    )
    assert await registry.beat(info)


async def test_placement_skips_sandboxes_below_their_free_disk_watermark(
    redis: aioredis.Redis, settings: Settings, api: str, client: Client
) -> None:
    low, roomy = "disk-low", "disk-roomy"
    await beat(redis, settings, low, 1 * GIB)
    await beat(redis, settings, roomy, 50 * GIB)
    # The low one is emptier (0 placed), so least-loaded alone would pick it every other time.
    for n in range(4):
        record = await client.create(f"on-roomy-{n}")
        assert record.sandbox == roomy, f"create {n} went to {record.sandbox}"
    listed = {s.id: s for s in await client.sandboxes()}
    assert listed[low].min_free_disk_bytes == WATERMARK and listed[low].free_disk_bytes == 1 * GIB
    code, out, _ = await cli(api, "sandboxes", "ls")
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert code == 0 and "1.0 GiB (low)" in rows[low] and "50.0 GiB" in rows[roomy], out
    assert "(low)" not in rows[roomy]

    # A session asking for the low one by name: refused, not queued where it cannot grow.
    with pytest.raises(ApiError) as named:
        await client.create("named-low", sandbox=low)
    assert named.value.status == 503 and named.value.code == "no_capacity", named.value
    assert f"{low}: 1.0 GiB free, below its watermark of 2.0 GiB" in named.value.message

    await beat(redis, settings, roomy, 1 * GIB + GIB // 2)
    with pytest.raises(ApiError) as refused:
        await client.create("nowhere")
    assert refused.value.status == 503 and refused.value.code == "no_capacity", refused.value
    assert "low on disk" in refused.value.message
    assert f"{roomy}: 1.5 GiB free, below its watermark" in refused.value.message
    assert f"{low}: 1.0 GiB free" in refused.value.message
    with pytest.raises(ApiError) as unstored:
        await client.get("nowhere")
    assert unstored.value.status == 404

    # Room again (the desktops deleted their data, or the disk grew): placed at once.
    await beat(redis, settings, low, WATERMARK)
    assert (await client.create("room-again")).sandbox == low
