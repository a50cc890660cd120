"""The worker's side of the access route (orchestrator/access.py): it takes tickets by both
roads and hands each, with its channel, to the handlers (workers/access_handlers.py).

- direct: a TCP listener on the worker's access port; a connection's first line names its
  ticket (``ORCH-ACCESS/1 <id>``), anything else is dropped.
- relay: the sandbox's ``access-requests`` stream, read through a consumer group so one
  worker of the sandbox takes each; the bytes then flow over Redis (orchestrator/access_relay.py).

A ticket is taken with GETDEL and must name this sandbox: one use, and only where the API
meant it to go. Redis away is waited out, never the end of the worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from orchestrator.access import HANDSHAKE
from orchestrator.access_channel import Channel, Control, StreamChannel
from orchestrator.access_relay import RelayChannel, RelaySide
from orchestrator.access_types import AccessTicket, decode_ticket
from orchestrator.keys import Keys

log = logging.getLogger("workers.access")

GROUP = "workers"
HANDSHAKE_TIMEOUT_S = 5.0
MAX_LINE = 256

Handler = Callable[[AccessTicket, Channel], Awaitable[None]]


def advertised_host(configured: str) -> str:
    """Where the API can reach this worker: ORCH_WORKER_ACCESS_HOST, else this host's address
    (a container's on its network, a pod's IP)."""
    if configured:
        return configured
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class AccessServer:
    def __init__(
        self,
        redis: aioredis.Redis,
        relay_reader: aioredis.Redis,
        keys: Keys,
        handle: Handler,
        *,
        sandbox_id: str,
        consumer: str,
        host: str,
        port: int | None,
    ) -> None:
        self.redis = redis
        self.relay_reader = relay_reader
        self.keys = keys
        self.handle = handle
        self.sandbox_id = sandbox_id
        self.consumer = consumer
        self.host = host
        self.port = port
        self.address = ""  # host:port once listening (the heartbeat advertises it)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen(self) -> None:
        """Bind the direct road (before the first heartbeat, which advertises it)."""
        if self.port is None:
            return
        try:
            self._server = await asyncio.start_server(self._connected, self.host, self.port, limit=MAX_LINE * 4)
        except OSError as e:
            log.warning("access port %s:%s not bound (%s): accesses go through the relay", self.host, self.port, e)
            return
        bound = self._server.sockets[0].getsockname()
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.address = f"{host}:{bound[1]}"
        log.info("access: direct road on %s, relay on %s", self.address, self.keys.access_requests(self.sandbox_id))

    async def run(self) -> None:
        """The relay road, until cancelled (then the direct one closes too)."""
        try:
            while True:
                try:
                    await self._relay_once()
                except (RedisError, OSError) as e:
                    log.warning("access relay: Redis unavailable (%s); retrying", e)
                    await anyio.sleep(1)
        finally:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()

    async def _relay_once(self) -> None:
        stream = self.keys.access_requests(self.sandbox_id)
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
            await self.redis.xgroup_create(stream, GROUP, id="$", mkstream=True)
        while True:
            try:
                reply: Any = await self.relay_reader.xreadgroup(
                    GROUP, self.consumer, {stream: ">"}, count=64, block=5_000
                )
            except ResponseError as e:
                if "NOGROUP" in str(e):  # Redis emptied: make the group again
                    return
                raise
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    ticket_id = fields.get(b"t", b"").decode()
                    async with self.redis.pipeline(transaction=False) as pipe:
                        pipe.xack(stream, GROUP, entry_id)
                        pipe.xdel(stream, entry_id)
                        await pipe.execute()
                    ticket = await self._take(ticket_id)
                    if ticket is None:
                        continue
                    channel = RelayChannel(self.redis, self.relay_reader, self.keys, ticket.id, RelaySide.WORKER)
                    self._spawn(ticket, channel)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve_connection(reader, writer)
        except asyncio.CancelledError:
            # The worker is shutting down. Not re-raised: asyncio's server would log a cancelled
            # handler as an error ("Exception in callback ... connection_made").
            writer.close()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                line = await reader.readline()
        except (TimeoutError, ValueError, OSError):
            line = b""
        ticket = None
        if line.startswith(HANDSHAKE) and line.endswith(b"\n") and len(line) <= MAX_LINE:
            ticket = await self._take(line[len(HANDSHAKE) : -1].decode(errors="replace"))
        channel = StreamChannel(reader, writer)
        if ticket is None:
            with contextlib.suppress(Exception):
                await channel.send_control(Control(type="error", code="ticket_unknown", message="no such ticket"))
            await channel.aclose()
            return
        await self._run(ticket, channel)

    async def _take(self, ticket_id: str) -> AccessTicket | None:
        if not ticket_id or len(ticket_id) > 64:
            return None
        try:
            raw = await self.redis.getdel(self.keys.access_ticket(ticket_id))
        except RedisError as e:
            log.warning("access: could not take ticket %s (%s)", ticket_id, e)
            return None
        if raw is None:
            log.info("access: ticket %s is unknown or taken", ticket_id)
            return None
        try:
            ticket = decode_ticket(raw)
        except msgspec.DecodeError as e:
            log.warning("access: ticket %s is malformed (%s)", ticket_id, e)
            return None
        if ticket.sandbox != self.sandbox_id or ticket.id != ticket_id:
            log.warning("access: ticket %s is for sandbox %s, not this one", ticket_id, ticket.sandbox)
            return None
        return ticket

    def _spawn(self, ticket: AccessTicket, channel: Channel) -> None:
        task = asyncio.create_task(self._run(ticket, channel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, ticket: AccessTicket, channel: Channel) -> None:
        try:
            await self.handle(ticket, channel)
        except Exception:
            log.exception("access %s (%s, session %s) failed", ticket.id, ticket.kind, ticket.session)
        finally:
            await channel.aclose()

    def running(self) -> int:
        return len(self._tasks)
