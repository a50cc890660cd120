"""The terminal route: an interactive PTY in a ready session's desktop over a WebSocket.

``/v1/sessions/{id}/terminal?cols=&rows=[&user=&cwd=]`` (scope ``sessions:exec``; the token as
``Authorization: Bearer`` or, for browsers, which cannot send a header on a WebSocket,
``?access_token=``). Binary frames are the terminal's bytes both ways; the client sends
``{"type": "resize", "cols": C, "rows": R}`` as text; the server sends ``{"type": "exit",
"exit_code": N}`` then closes (1000), or ``{"type": "error", "code", "message"}`` then closes
with 4000 + the HTTP status the same refusal has elsewhere (4401, 4403, 4404, 4409, 4429, 503:
4503; an idle terminal: 4408 ``idle_timeout``).

The bytes travel the access route (orchestrator/access.py); the worker opens the shell through
desktop-enter, as every way in does."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import anyio
import msgspec
from litestar import WebSocket, websocket
from litestar.datastructures import State
from litestar.params import FromPath

from . import auth
from .access import AccessRouter, ready_record, ticket_for
from .access_channel import Channel, ChannelClosed, Control, FrameKind, decode_control
from .access_types import AccessKind, AccessTicket
from .auth import AuthError
from .config import ApiSettings
from .errors import ServiceError
from .guards import token_of
from .keys import Keys

log = logging.getLogger("orchestrator.api_terminal")

MAX_SIZE = 1000  # columns or rows
LEASE_MS = 60_000
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class _ClientMessage(msgspec.Struct):
    type: str
    cols: int | None = None
    rows: int | None = None


def _size(value: str | None, default: int, name: str) -> int:
    if value is None or value == "":
        return default
    try:
        size = int(value)
    except ValueError:
        raise ServiceError(400, "invalid_request", f"{name} must be an integer, got {value!r}", name) from None
    if not 1 <= size <= MAX_SIZE:
        raise ServiceError(400, "invalid_request", f"{name} must be 1 to {MAX_SIZE}, got {size}", name)
    return size


async def _refuse(socket: WebSocket[Any, Any, Any], status: int, code: str, message: str) -> None:
    with contextlib.suppress(Exception):
        await socket.send_text(msgspec.json.encode({"type": "error", "code": code, "message": message}).decode())
        await socket.close(code=4000 + status, reason=code)


class TerminalSlots:
    """Terminals open per session, across API processes: leases in a sorted set."""

    def __init__(self, state: State) -> None:
        self.redis = state.redis
        self.keys: Keys = state.core.keys

    async def admit(self, session_id: str, terminal_id: str, limit: int) -> bool:
        now = int(time.time() * 1000)
        admit = self.redis.register_script(_ADMIT)  # EVALSHA, loaded once (the ACL has no EVAL)
        admitted = await admit(keys=[self.keys.session_terminals(session_id)], args=[now, LEASE_MS, limit, terminal_id])
        return bool(admitted)

    async def renew(self, session_id: str, terminal_id: str) -> None:
        key = self.keys.session_terminals(session_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {terminal_id: int(time.time() * 1000) + LEASE_MS}, xx=True)
            pipe.pexpire(key, LEASE_MS)
            await pipe.execute()

    async def release(self, session_id: str, terminal_id: str) -> None:
        await self.redis.zrem(self.keys.session_terminals(session_id), terminal_id)


@websocket("/v1/sessions/{session_id:str}/terminal")
async def terminal(socket: WebSocket[Any, Any, Any], session_id: FromPath[str], state: State) -> None:
    await socket.accept()
    try:
        token = token_of(socket)
        auth.authorize(token, auth.SESSIONS_EXEC)
        query = socket.query_params
        cols = _size(query.get("cols"), 80, "cols")
        rows = _size(query.get("rows"), 24, "rows")
        record = await ready_record(state.sessions, session_id, token.visible_tenant, "terminals")
        settings: ApiSettings = state.settings
        ticket = ticket_for(
            record,
            AccessKind.TERMINAL,
            by=token.name,
            cols=cols,
            rows=rows,
            user=query.get("user") or None,
            cwd=query.get("cwd") or None,
        )
        slots = TerminalSlots(state)
        if not await slots.admit(session_id, ticket.id, settings.terminal_max_per_session):
            raise ServiceError(
                429,
                "too_many_terminals",
                f"session {session_id} has {settings.terminal_max_per_session} terminals open"
                " (ORCH_TERMINAL_MAX_PER_SESSION)",
            )
    except AuthError as e:
        await _refuse(socket, e.status, e.code, e.message)
        return
    except ServiceError as e:
        await _refuse(socket, e.status, e.code, e.message)
        return
    try:
        router: AccessRouter = state.access
        try:
            channel, _ = await router.open(ticket)
        except ServiceError as e:
            await _refuse(socket, e.status, e.code, e.message)
            return
        try:
            await _pump(socket, channel, slots, ticket, settings.terminal_idle_s)
        finally:
            await channel.aclose()
    finally:
        with contextlib.suppress(Exception):
            await slots.release(session_id, ticket.id)


async def _pump(
    socket: WebSocket[Any, Any, Any], channel: Channel, slots: TerminalSlots, ticket: AccessTicket, idle_s: float
) -> None:
    await _TerminalPump(socket, channel, slots, ticket, idle_s).run()


class _TerminalPump:
    """The WebSocket and the channel, both ways, until either ends, plus the slot's lease
    renewed and the idle timeout (no input or output for ``idle_s``) watched."""

    def __init__(
        self,
        socket: WebSocket[Any, Any, Any],
        channel: Channel,
        slots: TerminalSlots,
        ticket: AccessTicket,
        idle_s: float,
    ) -> None:
        self.socket, self.channel, self.slots, self.ticket, self.idle_s = socket, channel, slots, ticket, idle_s
        self.last = time.monotonic()

    async def run(self) -> None:
        async with anyio.create_task_group() as tasks:
            for pump in (self._keys, self._screen, self._watch):
                tasks.start_soon(pump, tasks.cancel_scope)

    async def _keys(self, scope: anyio.CancelScope) -> None:
        while True:
            message: dict[str, Any] = dict(await self.socket.receive())
            if message["type"] == "websocket.disconnect":
                scope.cancel()
                return
            self.last = time.monotonic()
            if message.get("bytes"):
                await self.channel.send(message["bytes"])
            elif message.get("text"):
                try:
                    control = msgspec.json.decode(message["text"], type=_ClientMessage)
                except msgspec.DecodeError:
                    continue  # not ours to act on: dropped
                if control.type == "resize" and control.cols and control.rows:
                    cols = min(max(control.cols, 1), MAX_SIZE)
                    rows = min(max(control.rows, 1), MAX_SIZE)
                    await self.channel.send_control(Control(type="resize", cols=cols, rows=rows))

    async def _screen(self, scope: anyio.CancelScope) -> None:
        try:
            while True:
                kind, payload = await self.channel.receive()
                if kind is FrameKind.DATA:
                    self.last = time.monotonic()
                    await self.socket.send_bytes(payload)
                elif kind is FrameKind.CONTROL:
                    control = decode_control(payload)
                    if control.type == "exit":
                        exit_message = {"type": "exit", "exit_code": control.exit_code}
                        await self.socket.send_text(msgspec.json.encode(exit_message).decode())
                        await self.socket.close(code=1000)
                        break
                elif kind in (FrameKind.EOF, FrameKind.CLOSE):
                    await self.socket.close(code=1000)
                    break
        except ChannelClosed as e:
            await _refuse(self.socket, 502, "terminal_lost", f"the terminal's route broke: {e}")
        scope.cancel()

    async def _watch(self, scope: anyio.CancelScope) -> None:
        idle_s = self.idle_s
        while True:
            await anyio.sleep(min(idle_s / 4, 5.0) if idle_s > 0 else 20.0)
            await self.slots.renew(self.ticket.session, self.ticket.id)
            if idle_s > 0 and time.monotonic() - self.last > idle_s:
                await _refuse(self.socket, 408, "idle_timeout", f"no input or output for {idle_s:g} s")
                scope.cancel()
                return


ROUTES = [terminal]
