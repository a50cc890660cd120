"""The API's shared exec-output reader on a real Redis: a follower of a new stream is served at
once although the shared read is blocked on others, without dropping its connection."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from orchestrator import exec_output
from orchestrator.config import Settings
from orchestrator.exec_output import ExecOutputHub
from orchestrator.keys import Keys


async def test_a_new_follower_interrupts_the_blocked_read_and_keeps_its_connection(
    settings: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exec_output, "ROUND_MS", 60_000)  # a read left alone would block a minute
    keys = Keys(settings.key_prefix)
    hub = ExecOutputHub(redis, keys)
    first, second = "x" + "1" * 20, "x" + "2" * 20
    try:
        async with hub.follow(first, "0-0"):
            await asyncio.sleep(0.2)  # the shared read is now blocked on the first stream alone
            connections = await redis.client_list()
            async with hub.follow(second, "0-0") as follower:
                await redis.xadd(keys.exec_output(second), {"s": "stdout", "d": b"hi"})
                async with asyncio.timeout(5):
                    batch = await follower.entries.get()
                assert [fields[b"d"] for _, fields in batch] == [b"hi"]
            after = await redis.client_list()
        # Interrupted by its wake-up stream, not by a cancel: no connection was dropped and made again.
        assert {c["id"] for c in connections} <= {c["id"] for c in after}
    finally:
        await hub.close()
        await redis.delete(keys.exec_output(first), keys.exec_output(second))
    assert not [k async for k in redis.scan_iter(match=keys.exec_output("wake-*"))]  # closed: removed
