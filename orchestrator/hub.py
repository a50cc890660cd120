"""Fan-out of Redis streams to the SSE clients of one API process.

One reader per stream with live followers (``XREAD BLOCK`` on one connection), however many
clients follow it; each entry is decoded and framed once and handed to every follower's
bounded buffer. A client that falls behind by more than its buffer is cut loose (``Overflow``)
and reads Redis at its own pace from its last id (``EventFeed`` does that), so a stalled
client delays nobody and loses nothing.

No gap at hand-over: a follower registers first (its ``start`` is the reader's position at
that moment, and every later batch is buffered for it), then catches up on anything before
``start`` from Redis directly, then drains its buffer, skipping ids it has already sent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .events import EventBus, encode_event
from .schemas import Event

log = logging.getLogger("orchestrator.hub")

# (entry id, event, the SSE frame for it)
Entry = tuple[str, Event, bytes]

BATCH = 200


def frame(entry_id: str, type: str, data: bytes) -> bytes:
    return b"id: " + entry_id.encode() + b"\nevent: " + type.encode() + b"\ndata: " + data + b"\n\n"


class Overflow(Exception):
    """The follower fell too far behind the shared reader: it must read Redis itself."""


class Follower:
    def __init__(self, start: str, limit: int) -> None:
        self.start = start
        self._limit = limit
        self._batches: deque[list[Entry]] = deque()
        self._wake = asyncio.Event()
        self.overflowed = False

    def offer(self, batch: list[Entry]) -> None:
        if self.overflowed:
            return
        if len(self._batches) >= self._limit:
            self.overflowed = True
            self._batches.clear()  # the follower re-reads from Redis: free the memory now
        else:
            self._batches.append(batch)
        self._wake.set()

    async def next(self) -> list[Entry]:
        """The next batch; an empty one when the stream was quiet for a keep-alive period (the
        shared reader's block timeout: one timer for all followers, none per follower)."""
        if not self._batches and not self.overflowed:
            self._wake.clear()
            await self._wake.wait()
        if self.overflowed:
            raise Overflow
        return self._batches.popleft()


@dataclass
class _Reader:
    stream: str
    position: str
    followers: set[Follower] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


class StreamHub:
    def __init__(self, bus: EventBus, *, block_ms: int = 5_000, buffer_batches: int = 256) -> None:
        self.bus = bus
        self.block_ms = block_ms
        self.buffer_batches = buffer_batches
        self._readers: dict[str, _Reader] = {}
        self._lock = asyncio.Lock()

    @property
    def followers(self) -> int:
        return sum(len(r.followers) for r in self._readers.values())

    @contextlib.asynccontextmanager
    async def follow(self, stream: str) -> AsyncIterator[Follower]:
        async with self._lock:  # one reader per stream, started at the stream's newest entry
            reader = self._readers.get(stream)
            if reader is None:
                reader = _Reader(stream, await self.bus.last_id(stream))
                reader.task = asyncio.create_task(self._run(reader), name=f"hub:{stream}")
                self._readers[stream] = reader
            follower = Follower(reader.position, self.buffer_batches)
            reader.followers.add(follower)
        try:
            yield follower
        finally:
            reader.followers.discard(follower)
            if not reader.followers and self._readers.get(stream) is reader:
                del self._readers[stream]
                if reader.task is not None:
                    reader.task.cancel()

    async def close(self) -> None:
        readers, self._readers = list(self._readers.values()), {}
        for reader in readers:
            if reader.task is not None:
                reader.task.cancel()
        for reader in readers:
            if reader.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await reader.task

    async def _run(self, reader: _Reader) -> None:
        delay = 0.1
        while True:
            try:
                entries = await self.bus.read(reader.stream, reader.position, block_ms=self.block_ms, count=BATCH)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis away: followers get keep-alives; retry with backoff
                log.warning("hub: reading %s failed (%s); retrying in %.1f s", reader.stream, e, delay)
                for follower in list(reader.followers):
                    follower.offer([])
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                continue
            delay = 0.1
            if not entries:
                for follower in list(reader.followers):
                    follower.offer([])  # quiet for block_ms: each follower sends a keep-alive
                continue
            batch = [(entry_id, event, frame(entry_id, event.type, encode_event(event))) for entry_id, event in entries]
            # Position and hand-out together (no await between): a follower registering now
            # either gets this batch or starts after it.
            reader.position = batch[-1][0]
            for follower in list(reader.followers):
                follower.offer(batch)
