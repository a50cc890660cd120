"""The route from the API into a desktop: a ticket in Redis, then a channel to the worker of
the desktop's sandbox that takes it, by one of two roads.

- **direct**: a TCP connection to the address the sandbox advertises in its heartbeat
  (``access_address``; the worker's access port), whose first line names the ticket. Used
  whenever it answers: it is the fast road (no hop through Redis).
- **relay**: the ticket's id on the sandbox's ``access-requests`` stream, and the bytes over
  two Redis streams (orchestrator/access_relay.py). Works whenever the worker reaches Redis,
  which it must anyway: behind NAT, across clusters, at any depth.

``auto`` (the default) tries direct first and falls back to the relay, remembering for a
while a sandbox whose direct road failed. Either way the worker's first frame says whether it
could do what the ticket asks (``ready``, or ``error`` with a code): the caller answers a
precise status before any byte of a body has gone out.

Authentication is the ticket: random, one use, seconds long, written only by the API (the
Redis ACL), so a connection to a worker's access port that names none gets nothing; desktops
cannot open one anyway (workers/firewall.py drops their new connections to the sandbox)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from .access_channel import Channel, ChannelClosed, Control, FrameKind, StreamChannel, decode_control
from .access_relay import RelayChannel, RelaySide
from .access_types import TICKET_TTL_MS, AccessKind, AccessRoute, AccessTicket, encode_ticket, new_ticket_id
from .errors import ServiceError
from .keys import Keys
from .sandboxes import SandboxRegistry
from .schemas import SessionRecord
from .service import Sessions
from .states import SessionState

log = logging.getLogger("orchestrator.access")

HANDSHAKE = b"ORCH-ACCESS/1 "
# How long a sandbox whose direct road failed is reached by the relay only.
DIRECT_RETRY_S = 30.0
# How long a sandbox's advertised address is used without reading its heartbeat again (a
# worker that moved fails the connection, which forgets it at once).
ADDRESS_TTL_S = 5.0
REQUESTS_MAXLEN = 10_000

# What a worker's error code means to an HTTP caller.
STATUS_OF = {
    "invalid_path": 400,
    "invalid_request": 400,
    "unknown_user": 400,
    "file_failed": 422,
    "not_found": 404,
    "not_a_directory": 409,
    "is_a_directory": 409,
    "permission_denied": 403,
    "desktop_gone": 409,
    "port_closed": 502,
    "port_unreachable": 502,
    "too_many_terminals": 429,
}
CODE_OF = {"not_found": "file_not_found", "desktop_gone": "session_not_ready"}


async def ready_record(sessions: Sessions, session_id: str, tenant: str | None, what: str) -> SessionRecord:
    """The session, ready: 404 for an unknown one or another tenant's, 409 for one not ready."""
    record = await sessions.get(session_id, tenant)
    if record.state is not SessionState.READY or record.sandbox is None:
        raise ServiceError(
            409, "session_not_ready", f"session {session_id} is {record.state.value}; {what} need a ready session"
        )
    return record


def ticket_for(record: SessionRecord, kind: AccessKind, *, by: str, **params: Any) -> AccessTicket:
    """A new ticket for an access into ``record``'s desktop (ready, so placed), by ``by``."""
    assert record.sandbox is not None
    return AccessTicket(
        id=new_ticket_id(),
        kind=kind,
        session=record.id,
        sandbox=record.sandbox,
        by=by,
        tenant=record.tenant,
        created_at=time.time(),
        **params,
    )


def worker_error(control: Control) -> ServiceError:
    code = control.code or "access_failed"
    return ServiceError(STATUS_OF.get(code, 502), CODE_OF.get(code, code), control.message or code)


class AccessRouter:
    def __init__(
        self,
        redis: aioredis.Redis,
        relay_reader: aioredis.Redis,
        keys: Keys,
        sandboxes: SandboxRegistry,
        *,
        route: AccessRoute = AccessRoute.AUTO,
        connect_timeout_s: float = 1.0,
        open_timeout_s: float = 10.0,
    ) -> None:
        self.redis = redis
        self.relay_reader = relay_reader
        self.keys = keys
        self.sandboxes = sandboxes
        self.route = route
        self.connect_timeout_s = connect_timeout_s
        self.open_timeout_s = open_timeout_s
        self._direct_failed: dict[str, float] = {}
        self._addresses: dict[str, tuple[str, float]] = {}  # sandbox -> (access_address, read at)
        self.opened: Counter[str] = Counter()  # by road, for /metrics

    async def open(self, ticket: AccessTicket) -> tuple[Channel, Control]:
        """The channel and the worker's first control message (``ready`` or ``meta``); a
        ServiceError when the worker refused (its code) or no road reached it in time."""
        await self.redis.set(self.keys.access_ticket(ticket.id), encode_ticket(ticket), px=TICKET_TTL_MS)
        channel: Channel | None = None
        road = "relay"
        try:
            if self.route is not AccessRoute.RELAY:
                channel = await self._direct(ticket)
                road = "direct"
                if channel is None and self.route is AccessRoute.DIRECT:
                    raise ServiceError(
                        503, "sandbox_unreachable", f"sandbox {ticket.sandbox} has no direct route (ORCH_ACCESS_ROUTE)"
                    )
            if channel is None:
                road = "relay"
                channel = RelayChannel(self.redis, self.relay_reader, self.keys, ticket.id, RelaySide.API)
                await self.redis.xadd(
                    self.keys.access_requests(ticket.sandbox),
                    {"t": ticket.id},
                    maxlen=REQUESTS_MAXLEN,
                    approximate=True,
                )
            first = await self._first_control(channel, ticket)
        except BaseException:
            if channel is not None:
                await channel.aclose()
            with contextlib.suppress(Exception):
                await self.redis.delete(self.keys.access_ticket(ticket.id))
            raise
        self.opened[road] += 1
        return channel, first

    async def open_port(self, record: SessionRecord, port: int, *, by: str) -> Channel:
        """A channel whose far end is a TCP connection to ``port`` on the desktop's loopback
        (orchestrator/api_ports.py speaks HTTP or WebSocket over it)."""
        channel, _ = await self.open(ticket_for(record, AccessKind.PORT, by=by, port=port))
        return channel

    async def _direct(self, ticket: AccessTicket) -> Channel | None:
        failed_at = self._direct_failed.get(ticket.sandbox)
        if failed_at is not None and time.monotonic() - failed_at < DIRECT_RETRY_S and self.route is AccessRoute.AUTO:
            return None
        address = await self._address(ticket.sandbox)
        if not address:
            return None
        host, _, port = address.rpartition(":")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), self.connect_timeout_s
            )
        except (OSError, TimeoutError, ValueError) as e:
            log.info("sandbox %s: no direct route to %s (%s); relaying", ticket.sandbox, address, e)
            self._direct_failed[ticket.sandbox] = time.monotonic()
            self._addresses.pop(ticket.sandbox, None)
            return None
        self._direct_failed.pop(ticket.sandbox, None)
        writer.write(HANDSHAKE + ticket.id.encode() + b"\n")
        return StreamChannel(reader, writer)

    async def _address(self, sandbox_id: str) -> str:
        known = self._addresses.get(sandbox_id)
        if known is not None and time.monotonic() - known[1] < ADDRESS_TTL_S:
            return known[0]
        info = await self.sandboxes.get(sandbox_id)
        address = info.access_address if info is not None else ""
        if len(self._addresses) >= 4096:
            self._addresses.clear()
        self._addresses[sandbox_id] = (address, time.monotonic())
        return address

    async def _first_control(self, channel: Channel, ticket: AccessTicket) -> Control:
        try:
            async with asyncio.timeout(self.open_timeout_s):
                kind, payload = await channel.receive()
        except (TimeoutError, ChannelClosed) as e:
            raise ServiceError(
                503,
                "sandbox_unreachable",
                f"the worker of sandbox {ticket.sandbox} did not answer ({e or 'timeout'}); retry shortly",
            ) from e
        if kind is not FrameKind.CONTROL:
            raise ServiceError(502, "access_failed", f"the worker answered a {kind.name} frame first")
        control = decode_control(payload)
        if control.type == "error":
            raise worker_error(control)
        return control
