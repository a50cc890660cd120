"""Keep-alive HTTP/1.1 connections to the ports of desktops, per API process.

A new route into a desktop costs a ticket in Redis, a connection to the worker (or a relay),
the worker's take of the ticket and a socket made in the desktop's network namespace: several
milliseconds, against a fraction of one for the request itself. So a connection whose exchange
ended cleanly (h11 says both sides may go on: no ``Connection: close``, the body read to its
end, the request's sent whole) is kept, per (session, generation, port), and the next request
to that port takes it, as any reverse proxy keeps its upstream connections.

Safe because:
- Only a request that can be sent again takes a kept connection (an idempotent method without
  a body): a server that closed the connection just as it was reused (its keep-alive timeout)
  fails it before any answer, and it is sent again on a new connection, once.
- While kept, a connection is watched: anything from the upstream then (its close, the
  desktop's end, bytes nobody asked for) drops it at once.
- Kept at most ``idle_s`` seconds, ``per_port`` per port and ``total`` in all (the oldest go
  first); a new generation of the session (a restart) never meets the old one's connections.
Who may reach the port is checked on every request before a connection is taken (the
session's tenant, its state, the caller's scope or grant), as for a new one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from .access_channel import Channel, ChannelClosed, Control, FrameKind
from .port_proxy import HttpExchange
from .schemas import SessionRecord

log = logging.getLogger("orchestrator.port_pool")

# Methods whose request may be sent twice (RFC 9110 9.2.2): the only ones that reuse a kept
# connection, so that losing the keep-alive race can be answered by sending again.
REPLAYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})


class PortOpener(Protocol):
    async def open_port(self, record: SessionRecord, port: int, *, by: str) -> Channel: ...


PoolKey = tuple[str, int, int]  # session, generation, port


class _Resumed:
    """A kept channel back in use: the receive its watcher had pending is its next frame."""

    def __init__(self, channel: Channel, pending: asyncio.Task[tuple[FrameKind, bytes]]) -> None:
        self._channel = channel
        self._pending: asyncio.Task[tuple[FrameKind, bytes]] | None = pending

    async def send(self, data: bytes) -> None:
        await self._channel.send(data)

    async def send_eof(self) -> None:
        await self._channel.send_eof()

    async def send_control(self, control: Control) -> None:
        await self._channel.send_control(control)

    @property
    def inner(self) -> Channel:
        return self._channel

    @property
    def pending(self) -> bool:
        return self._pending is not None

    async def receive(self) -> tuple[FrameKind, bytes]:
        if self._pending is not None:
            frame = await asyncio.shield(self._pending)  # a cancelled caller leaves it for the next
            self._pending = None
            return frame
        return await self._channel.receive()

    async def aclose(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        await self._channel.aclose()


@dataclass(eq=False)
class PortConnection:
    """A channel to a desktop's port and the HTTP/1.1 state of the connection at its far end."""

    key: PoolKey
    channel: Channel
    exchange: HttpExchange = field(default_factory=HttpExchange)
    reused: bool = False

    async def aclose(self) -> None:
        with contextlib.suppress(ChannelClosed, ConnectionError, OSError, RuntimeError):
            await self.channel.aclose()


@dataclass(eq=False)
class _Kept:
    connection: PortConnection
    since: float
    watch: asyncio.Task[tuple[FrameKind, bytes]]


class PortConnections:
    def __init__(self, opener: PortOpener, *, idle_s: float, per_port: int = 8, total: int = 64) -> None:
        self.opener = opener
        self.idle_s = idle_s
        self.per_port = per_port
        self.total = total
        self._kept: OrderedDict[int, _Kept] = OrderedDict()  # oldest first, by id()
        self._closing: set[asyncio.Task[None]] = set()
        self.reused = 0  # connections taken from the pool (for the tests and the benchmark)
        self.opened = 0

    def __len__(self) -> int:
        return len(self._kept)

    async def connect(
        self, record: SessionRecord, port: int, *, by: str, method: bytes, replayable: bool
    ) -> PortConnection:
        """A kept connection when the request may be sent again and one is there, else a new one."""
        key: PoolKey = (record.id, record.generation, port)
        if replayable and method in REPLAYABLE:
            kept = self._take(key)
            if kept is not None:
                self.reused += 1
                return kept
        return await self.fresh(record, port, by=by)

    async def fresh(self, record: SessionRecord, port: int, *, by: str) -> PortConnection:
        channel = await self.opener.open_port(record, port, by=by)
        self.opened += 1
        return PortConnection((record.id, record.generation, port), channel)

    def _take(self, key: PoolKey) -> PortConnection | None:
        now = time.monotonic()
        for ident, kept in list(reversed(self._kept.items())):  # the newest first: the least likely closed
            if kept.connection.key != key:
                continue
            del self._kept[ident]
            if kept.watch.done() or now - kept.since > self.idle_s:
                self._drop(kept)
                continue
            connection = kept.connection
            connection.channel = _Resumed(connection.channel, kept.watch)
            connection.reused = True
            return connection
        return None

    async def release(self, connection: PortConnection, *, reusable: bool) -> None:
        """The exchange ended: kept when it ended cleanly and there is room, else closed."""
        if not reusable or self.idle_s <= 0 or not connection.exchange.next_cycle():
            await connection.aclose()
            return
        same = [i for i, k in self._kept.items() if k.connection.key == connection.key]
        if len(same) >= self.per_port:
            self._drop(self._kept.pop(same[0]))
        while len(self._kept) >= self.total:
            self._drop(self._kept.popitem(last=False)[1])
        channel = connection.channel
        if isinstance(channel, _Resumed):
            if channel.pending:  # never read from: a watcher beside it would split its frames
                await connection.aclose()
                return
            channel = channel.inner  # its pending receive was taken: the bare channel again
        connection.channel = channel
        connection.reused = False
        ident = id(connection)
        watch = asyncio.create_task(channel.receive())
        kept = _Kept(connection, time.monotonic(), watch)
        self._kept[ident] = kept
        watch.add_done_callback(lambda _: self._spoke(ident, kept))

    def _spoke(self, ident: int, kept: _Kept) -> None:
        """The upstream said something while kept (its close, most often): dropped now."""
        if self._kept.get(ident) is kept:
            del self._kept[ident]
            self._drop(kept)

    def _drop(self, kept: _Kept) -> None:
        kept.watch.cancel()
        task = asyncio.get_running_loop().create_task(kept.connection.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        while self._kept:
            self._drop(self._kept.popitem()[1])
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task

    def expire(self) -> int:
        """Drop the connections kept longer than ``idle_s`` (run now and then; a take checks too)."""
        now = time.monotonic()
        old = [i for i, k in self._kept.items() if now - k.since > self.idle_s]
        for ident in old:
            self._drop(self._kept.pop(ident))
        return len(old)
