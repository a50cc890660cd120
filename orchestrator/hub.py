"""Fan-out of the event streams to the SSE clients of one API process.

One reader per process, whatever the number of streams and clients: it follows the firehose
alone (one ``XREAD BLOCK`` on one pooled connection) and hands each batch to the firehose's
followers and each event to the followers of its session. That is exact because every entry of
a session stream is also in the firehose, with the same id, in the same order (``events.py``
and the store's scripts write both in one script). So a client asking for a made-up session
costs no Redis connection, and a new stream needs no change to the blocking read: it is
already being read. Each entry is decoded and framed once for all followers.

A follower that falls behind by more than its buffer is cut loose (``Overflow``) and reads
Redis at its own pace from its last id, without blocking (``EventFeed`` does that, then
follows again), so a stalled client delays nobody and loses nothing.

No gap at hand-over: a follower registers first (its ``start`` is the reader's position at
that moment, and every later batch is buffered for it), then catches up on anything before
``start`` from its own stream directly, then drains its buffer, skipping ids it has sent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
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
        """The next batch; an empty one when its stream was quiet for a keep-alive period (one
        timer in the shared reader for all followers, none per follower)."""
        if not self._batches and not self.overflowed:
            self._wake.clear()
            await self._wake.wait()
        if self.overflowed:
            raise Overflow
        return self._batches.popleft()


@dataclass(eq=False)
class _Channel:
    """The followers of one stream: the firehose (session None) or one session's."""

    session: str | None
    followers: set[Follower] = field(default_factory=set)
    handed_at: float = field(default_factory=time.monotonic)  # last batch or keep-alive

    def hand(self, batch: list[Entry], now: float) -> None:
        self.handed_at = now
        for follower in list(self.followers):
            follower.offer(batch)


class StreamHub:
    def __init__(self, bus: EventBus, *, block_ms: int = 5_000, buffer_batches: int = 256) -> None:
        self.bus = bus
        self.block_ms = block_ms
        self.buffer_batches = buffer_batches
        self._channels: dict[str | None, _Channel] = {}
        self._position: str | None = None  # the firehose id read up to; None: no reader yet
        self._task: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._session_prefix = bus.keys.session_events("")

    @property
    def followers(self) -> int:
        return sum(len(c.followers) for c in self._channels.values())

    @property
    def channels(self) -> int:
        return len(self._channels)

    def _session_of(self, stream: str) -> str | None:
        if stream == self.bus.keys.firehose:
            return None
        if stream.startswith(self._session_prefix):
            return stream[len(self._session_prefix) :]
        raise ValueError(f"the hub serves the firehose and session streams, not {stream!r}")

    @contextlib.asynccontextmanager
    async def follow(self, stream: str) -> AsyncIterator[Follower]:
        session = self._session_of(stream)
        await self._ensure_reader()
        assert self._position is not None
        channel = self._channels.get(session)
        if channel is None:
            channel = self._channels[session] = _Channel(session)
        # No await between reading the position and registering: every batch after it is ours.
        follower = Follower(self._position, self.buffer_batches)
        channel.followers.add(follower)
        try:
            yield follower
        finally:
            channel.followers.discard(follower)
            if not channel.followers and self._channels.get(session) is channel:
                del self._channels[session]

    async def _ensure_reader(self) -> None:
        """One reader for the process, started at the firehose's newest entry on first use and
        kept running (an idle one costs one blocked connection, not a reconnect per client)."""
        if self._task is not None and not self._task.done():
            return
        async with self._start_lock:
            if self._task is not None and not self._task.done():
                return
            if self._position is None:
                self._position = await self.bus.last_id(self.bus.keys.firehose)
            self._task = asyncio.create_task(self._run(), name="hub:reader")

    async def close(self) -> None:
        task, self._task = self._task, None
        self._channels = {}
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        delay = 0.1
        while True:
            assert self._position is not None
            try:
                upto, entries = await self.bus.read_tolerant(
                    self.bus.keys.firehose, self._position, block_ms=self.block_ms, count=BATCH
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis away: followers get keep-alives; retry with backoff
                log.warning("hub: reading the firehose failed (%s); retrying in %.1f s", e, delay)
                self._keep_alive(time.monotonic(), force=True)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                continue
            delay = 0.1
            self._dispatch(upto, entries)

    def _dispatch(self, upto: str, entries: list[tuple[str, Event]]) -> None:
        """Position and hand-out together (no await): a follower registering now either gets
        this batch or starts after it."""
        now = time.monotonic()
        self._position = upto
        if entries:
            batch = [(entry_id, event, frame(entry_id, event.type, encode_event(event))) for entry_id, event in entries]
            by_session: dict[str, list[Entry]] = defaultdict(list)
            for entry in batch:
                if entry[1].session is not None:
                    by_session[entry[1].session].append(entry)
            firehose = self._channels.get(None)
            if firehose is not None:
                firehose.hand(batch, now)
            for session, part in by_session.items():
                channel = self._channels.get(session)
                if channel is not None:
                    channel.hand(part, now)
        self._keep_alive(now)

    def _keep_alive(self, now: float, force: bool = False) -> None:
        """An empty batch (a keep-alive frame) to the followers of each stream quiet for a
        keep-alive period, however busy the others are."""
        period = self.block_ms / 1000
        for channel in list(self._channels.values()):
            if force or now - channel.handed_at >= period:
                channel.hand([], now)
