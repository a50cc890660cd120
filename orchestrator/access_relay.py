"""The relay route: a Channel (orchestrator/access_channel.py) over two Redis streams, for a
sandbox the API cannot open a connection to. The worker only reaches out, to Redis, as it does
for everything else, so this works wherever the worker works: behind NAT, in another cluster,
at any depth.

Each side appends its frames to its own stream (``relay:<id>:a`` from the API, ``relay:<id>:w``
from the worker) and reads the other's with a blocking XREAD on a connection of its own, in a
background task, so acknowledgements flow while the user's side only sends:

- Flow control: a sender has at most ``WINDOW`` bytes that its reader has not taken; the
  reader acknowledges what it took. Redis never holds more than a window per direction.
- Memory: the reader trims what it read; both streams expire ``EXPIRE_MS`` after their last
  write, so a side that died leaves nothing for long.
- Throughput: what a side sends is written behind it, one write at a time, and what is sent
  while a write is under way goes in the next, together (up to ``CHUNK`` an entry, in one
  round trip): a sender of small pieces (Docker hands on output 32 KiB at a time) is not held
  to a round trip each. Frames other than bytes wait for the bytes before them.
- Liveness: each side writes a ping when it has been quiet for ``PING_S``; silence longer than
  ``SILENT_S`` ends the channel (ChannelClosed)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from typing import Any

import msgspec
import redis.asyncio as aioredis

from .access_channel import ChannelClosed, Control, FrameKind
from .keys import Keys

CHUNK = 256 * 1024
WINDOW = 4 * 1024 * 1024
EXPIRE_MS = 30_000
TRIM_BYTES = 1 << 20
PING_S = 10.0
SILENT_S = 35.0
_BLOCK_MS = 5_000
OUTGOING_MAX = 2 * CHUNK  # bytes written behind a sender before it waits for them
_ACK = 101  # relay-internal frame kinds, never seen by the channel's user
_PING = 102


class RelaySide(enum.StrEnum):
    API = "a"
    WORKER = "w"

    @property
    def other(self) -> RelaySide:
        return RelaySide.WORKER if self is RelaySide.API else RelaySide.API


class RelayChannel:
    """One side of a relayed channel. ``reader`` is a client whose connections may block (the
    background XREAD holds one for the channel's life); ``writer`` any client."""

    def __init__(
        self,
        writer: aioredis.Redis,
        reader: aioredis.Redis,
        keys: Keys,
        channel_id: str,
        side: RelaySide,
        *,
        window: int = WINDOW,
    ) -> None:
        self._redis = writer
        self._reader = reader
        self._out = keys.relay(channel_id, side.value)
        self._in = keys.relay(channel_id, side.other.value)
        self._window = window
        self._frames: asyncio.Queue[tuple[FrameKind, bytes] | BaseException] = asyncio.Queue()
        self._sent = 0  # DATA bytes sent
        self._acked = 0  # of those, taken by the other side
        self._taken = 0  # DATA bytes this side's user took
        self._acked_sent = 0
        self._room = asyncio.Event()
        self._last_write = time.monotonic()
        self._expiry_set = -float(EXPIRE_MS)  # never: the first write sets it
        self._closed = False
        self._peer_gone = False  # its reader saw the other side close (or the route break)
        self._write_lock = asyncio.Lock()
        self._outgoing = bytearray()  # sent, not yet in Redis (the flusher writes it)
        self._flusher: asyncio.Task[None] | None = None
        self._flush_error: ChannelClosed | None = None
        self._task = asyncio.create_task(self._read())
        self._pinger = asyncio.create_task(self._ping())

    # -- sending ------------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            chunk = view[start : start + CHUNK]
            while self._sent - self._acked + len(chunk) > self._window and self._sent != self._acked:
                if self._peer_gone:
                    raise ChannelClosed("the other side has closed")
                self._room.clear()
                await self._wait_for_room()
            if self._flush_error is not None:
                raise self._flush_error
            if self._closed:
                raise ChannelClosed("the channel is closed")
            self._sent += len(chunk)
            self._outgoing += chunk
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush())
            if len(self._outgoing) >= OUTGOING_MAX:
                await self._drain()

    async def _flush(self) -> None:
        try:
            while self._outgoing:
                data = bytes(self._outgoing)
                self._outgoing.clear()
                pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
                await self._append(int(FrameKind.DATA), *pieces)
        except ChannelClosed as e:
            self._flush_error = e
            self._outgoing.clear()

    async def _drain(self) -> None:
        """Until what was sent is in Redis; ChannelClosed if it could not be written."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._flush_error is not None:
            raise self._flush_error

    async def _wait_for_room(self) -> None:
        try:
            await asyncio.wait_for(self._room.wait(), SILENT_S)
        except TimeoutError:
            raise ChannelClosed("the other side took nothing for too long") from None
        if self._closed:
            raise ChannelClosed("the channel is closed")

    async def send_eof(self) -> None:
        await self._drain()
        await self._append(int(FrameKind.EOF), b"")

    async def send_control(self, control: Control) -> None:
        await self._drain()
        await self._append(int(FrameKind.CONTROL), msgspec.json.encode(control))

    async def _append(self, kind: int, *payloads: bytes) -> None:
        if self._closed:
            raise ChannelClosed("the channel is closed")
        async with self._write_lock:  # entries in the order they were sent
            now = time.monotonic()
            try:
                if len(payloads) > 1 or now - self._expiry_set > EXPIRE_MS / 1000 / 3:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for payload in payloads:
                            pipe.xadd(self._out, {"k": str(kind), "d": payload})
                        pipe.pexpire(self._out, EXPIRE_MS)
                        await pipe.execute()
                    self._expiry_set = now
                else:  # the expiry set less than a third of it ago stands: one command
                    await self._redis.xadd(self._out, {"k": str(kind), "d": payloads[0]})
            except Exception as e:
                raise ChannelClosed(f"the relay is unavailable: {e}") from e
            self._last_write = now

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(PING_S / 2)
            if time.monotonic() - self._last_write >= PING_S:
                with contextlib.suppress(ChannelClosed):
                    await self._append(_PING, b"")

    # -- receiving ----------------------------------------------------------------------------

    async def receive(self) -> tuple[FrameKind, bytes]:
        if self._closed and self._frames.empty():
            raise ChannelClosed("the channel is closed")
        item = await self._frames.get()
        if isinstance(item, BaseException):
            self._frames.put_nowait(item)  # every later receive sees it too
            raise ChannelClosed(str(item)) from item
        kind, payload = item
        if kind is FrameKind.DATA:
            self._taken += len(payload)
            if self._taken - self._acked_sent >= self._window // 4:
                self._acked_sent = self._taken
                with contextlib.suppress(ChannelClosed):
                    await self._append(_ACK, str(self._taken).encode())
        elif kind is FrameKind.CLOSE:
            self._frames.put_nowait((FrameKind.CLOSE, b""))
        return kind, payload

    async def _read(self) -> None:
        after = "0-0"
        heard = time.monotonic()
        untrimmed = 0  # bytes read since the last trim
        try:
            while True:
                reply: Any = await self._reader.xread({self._in: after}, count=256, block=_BLOCK_MS)
                if not reply:
                    if time.monotonic() - heard > SILENT_S:
                        raise ChannelClosed("the other side is silent")
                    continue
                heard = time.monotonic()
                entries = reply[0][1]
                for entry_id, fields in entries:
                    after = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    kind = int(fields[b"k"])
                    payload = fields.get(b"d", b"")
                    untrimmed += len(payload) + 64
                    if kind == _ACK:
                        self._acked = max(self._acked, int(payload))
                        self._room.set()
                    elif kind == _PING:
                        pass
                    else:
                        self._frames.put_nowait((FrameKind(kind), payload))
                        if kind == FrameKind.CLOSE:
                            return
                # What was read is not needed again: trimmed once it adds up (a keystroke at a
                # time costs no extra command), so Redis holds at most TRIM_BYTES of it.
                if untrimmed >= TRIM_BYTES:
                    await self._redis.xtrim(self._in, minid=after, approximate=False)
                    untrimmed = 0
        except asyncio.CancelledError:
            raise
        except ChannelClosed as e:
            self._frames.put_nowait(e)
        except Exception as e:
            self._frames.put_nowait(ChannelClosed(f"the relay is unavailable: {e}"))
        finally:
            self._peer_gone = True
            self._room.set()  # a sender waiting for room finds out

    async def aclose(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(ChannelClosed):
            await self._drain()  # what was sent goes before the CLOSE
            await self._append(int(FrameKind.CLOSE), b"")
        self._closed = True
        self._room.set()
        tasks = [t for t in (self._task, self._pinger, self._flusher) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            # The other side may still read the CLOSE: the out stream expires on its own.
            await self._redis.delete(self._in)
