"""The relay road's channel on a real Redis: bytes in order, written behind the sender and
coalesced while a write is under way, frames other than bytes after the bytes before them."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
import redis.asyncio as aioredis

from orchestrator import access_relay
from orchestrator.access_channel import Control, FrameKind
from orchestrator.access_relay import RelayChannel, RelaySide
from orchestrator.config import Settings
from orchestrator.keys import Keys


async def test_small_sends_arrive_whole_in_order_in_fewer_entries_and_controls_after_them(
    settings: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access_relay, "TRIM_BYTES", 1 << 40)  # every entry stays, to be counted
    keys = Keys(settings.key_prefix)
    reader = aioredis.Redis.from_url(settings.redis_url)
    api = RelayChannel(redis, reader, keys, "coalesce", RelaySide.API)
    worker = RelayChannel(redis, reader, keys, "coalesce", RelaySide.WORKER)
    pieces = [os.urandom(4096) for _ in range(400)]  # 1.6 MB in 4 KiB sends, as Docker hands output on
    try:
        for piece in pieces:
            await worker.send(piece)
        await worker.send_control(Control(type="exit", exit_code=0))
        written = await redis.xlen(keys.relay("coalesce", RelaySide.WORKER.value))
        got = bytearray()
        async with asyncio.timeout(10):
            while True:
                kind, payload = await api.receive()
                if kind is FrameKind.CONTROL:
                    break
                assert kind is FrameKind.DATA
                got += payload
        assert hashlib.sha256(got).digest() == hashlib.sha256(b"".join(pieces)).digest()
        assert written < len(pieces) // 4, written  # coalesced: not one entry per send
    finally:
        await worker.aclose()
        await api.aclose()
        await reader.aclose()
