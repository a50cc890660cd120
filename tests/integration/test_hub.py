"""The SSE fan-out hub on a real Redis: one reader per stream for all followers, no gap at the
hand-over from catch-up to live, and a follower that falls behind continues on its own, losing
nothing and delaying nobody."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from orchestrator.events import EventBus, make_event
from orchestrator.hub import StreamHub
from orchestrator.sse import EventFeed

Feed = AsyncGenerator[bytes, None]


async def publish(bus: EventBus, n: int, start: int = 0) -> list[str]:
    return [await bus.publish(make_event("hub.test", sandbox="t", data={"n": i})) for i in range(start, start + n)]


async def take_ids(frames: Feed, count: int, timeout: float = 10) -> list[str]:
    """The next ``count`` event ids from an SSE frame iterator (keep-alives and retry skipped)."""
    ids: list[str] = []
    async with asyncio.timeout(timeout):
        while len(ids) < count:
            chunk = await anext(frames)
            if chunk.startswith(b"id: "):
                ids.append(chunk.split(b"\n", 1)[0][4:].decode())
    return ids


def feed(bus: EventBus, hub: StreamHub, after: str) -> Feed:
    frames = EventFeed(bus, bus.keys.firehose, after, keepalive_s=0.2, hub=hub).frames()
    assert isinstance(frames, AsyncGenerator)  # typed as an AsyncIterator: narrowed for aclose()
    return frames


async def test_many_followers_share_one_reader_and_each_gets_every_event(bus: EventBus) -> None:
    hub = StreamHub(bus, block_ms=200)
    start = await bus.last_id(bus.keys.firehose)
    feeds = [feed(bus, hub, start) for _ in range(50)]
    try:
        # Each feed registers with the hub on its first read (the retry line comes before).
        for f in feeds:
            await anext(f)
        readers = [asyncio.create_task(take_ids(f, 30)) for f in feeds]
        async with asyncio.timeout(10):
            while hub.followers < 50:
                await asyncio.sleep(0.01)
        assert hub.channels == 1 and hub._task is not None  # one XREAD for fifty clients
        published = await publish(bus, 30)
        for got in await asyncio.gather(*readers):
            assert got == published
    finally:
        for f in feeds:
            await f.aclose()
        await hub.close()
    assert hub.followers == 0 and hub.channels == 0


async def test_a_late_follower_catches_up_then_goes_live_without_a_gap(bus: EventBus) -> None:
    hub = StreamHub(bus, block_ms=200)
    before = await bus.last_id(bus.keys.firehose)
    early = await publish(bus, 5)
    live = feed(bus, hub, before)  # keeps a reader running, positioned after `early`
    await anext(live)
    live_ids = asyncio.create_task(take_ids(live, 25))
    async with asyncio.timeout(10):
        while hub.followers < 1:
            await asyncio.sleep(0.01)
    more = await publish(bus, 10, start=5)

    # Joins mid-stream asking for everything after `before`, while publishing goes on.
    late = feed(bus, hub, before)
    await anext(late)
    late_ids = asyncio.create_task(take_ids(late, 25))
    rest = await publish(bus, 10, start=15)
    assert await late_ids == early + more + rest
    assert await live_ids == early + more + rest
    await live.aclose()
    await late.aclose()
    await hub.close()


async def test_a_follower_that_falls_behind_continues_on_its_own_losing_nothing(bus: EventBus) -> None:
    hub = StreamHub(bus, block_ms=200, buffer_batches=2)
    start = await bus.last_id(bus.keys.firehose)
    slow, fast = feed(bus, hub, start), feed(bus, hub, start)
    await anext(slow)
    await anext(fast)
    fast_ids = asyncio.create_task(take_ids(fast, 40))
    # The slow one registers, then reads nothing while 40 events arrive one by one.
    first = asyncio.create_task(take_ids(slow, 1))
    published = [await publish(bus, 1, start=i) for i in range(40)]
    flat = [i for ids in published for i in ids]
    assert await fast_ids == flat  # the fast follower was never held up
    assert await first == flat[:1]
    # Far more batches than its buffer: cut loose, it reads Redis itself, in order, from where it was.
    assert await take_ids(slow, 39) == flat[1:]
    assert hub.followers == 1  # only the fast one still follows the shared reader
    await slow.aclose()
    await fast.aclose()
    await hub.close()
