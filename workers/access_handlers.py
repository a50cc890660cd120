"""What the worker does with a ticket (workers/access.py takes them): a terminal, a file written
or read, a directory listed, a connection to a port, each in the ticket's desktop, each told on
the session's event stream (who, what, when: never the bytes).

Every handler's first frame is a control message: ``ready`` (or ``meta`` for a read) once it
could start, or ``error`` with a code the API maps to a status (orchestrator/access.py)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec

from orchestrator.access_bridge import bridge
from orchestrator.access_channel import Channel, ChannelClosed, Control, FrameKind, decode_control
from orchestrator.access_types import AccessKind, AccessTicket
from orchestrator.events import EventBus, make_event
from orchestrator.screen_types import InputAction, Screenshot, action_name, audit

from .runtime.errors import DesktopError
from .runtime.files import DesktopFiles, FileError
from .runtime.netns import DesktopPorts, PortError
from .runtime.screen import DesktopScreen, ScreenError
from .runtime.terminals import DockerTerminals, TerminalProcess

log = logging.getLogger("workers.access_handlers")

PORT_CONNECT_TIMEOUT_S = 5.0


class AccessHandlers:
    def __init__(
        self,
        terminals: DockerTerminals,
        files: DesktopFiles,
        ports: DesktopPorts,
        bus: EventBus,
        *,
        sandbox_id: str,
        screen: DesktopScreen | None = None,
    ) -> None:
        self.terminals = terminals
        self.files = files
        self.ports = ports
        self.screen = screen
        self.bus = bus
        self.sandbox_id = sandbox_id

    async def handle(self, ticket: AccessTicket, channel: Channel) -> None:
        match ticket.kind:
            case AccessKind.TERMINAL:
                await self.terminal(ticket, channel)
            case AccessKind.FILE_WRITE:
                await self.file_write(ticket, channel)
            case AccessKind.FILE_READ:
                await self.file_read(ticket, channel)
            case AccessKind.FILE_LIST:
                await self.file_list(ticket, channel)
            case AccessKind.PORT:
                await self.port(ticket, channel)
            case AccessKind.SCREEN if self.screen is not None:
                await self.screen_op(ticket, channel, self.screen)
            case _:
                await _refuse(channel, "invalid_request", f"this worker does not serve {ticket.kind} accesses")

    async def terminal(self, ticket: AccessTicket, channel: Channel) -> None:
        try:
            process = await self.terminals.open(
                ticket.session,
                argv=ticket.argv,
                env=ticket.env,
                cwd=ticket.cwd,
                user=ticket.user,
                cols=ticket.cols,
                rows=ticket.rows,
            )
        except DesktopError as e:
            await _refuse(channel, e.code, e.message)
            return
        await channel.send_control(Control(type="ready"))
        await self._publish(ticket, "terminal.opened", {"cols": ticket.cols, "rows": ticket.rows, "user": ticket.user})
        pumps = _TerminalPumps(process, channel)
        try:
            await pumps.run()
        except ChannelClosed as e:
            pumps.ended_by = "client_lost"
            log.info("terminal %s of session %s: the channel broke (%s)", ticket.id, ticket.session, e)
        exit_code: int | None = None
        try:
            if pumps.ended_by == "exited":
                exit_code = await process.exit_code()
                await channel.send_control(Control(type="exit", exit_code=exit_code))
            else:
                await process.hang_up()
        except ChannelClosed:
            pass
        finally:
            await process.close()
            await self._publish(
                ticket,
                "terminal.closed",
                {
                    "reason": pumps.ended_by,
                    "exit_code": exit_code,
                    "duration_ms": round((time.monotonic() - pumps.started) * 1000),
                    "bytes_in": pumps.received,
                    "bytes_out": pumps.sent,
                },
            )

    # -- files ------------------------------------------------------------------------------

    async def file_write(self, ticket: AccessTicket, channel: Channel) -> None:
        assert ticket.path is not None

        async def body() -> AsyncIterator[bytes]:
            # Asked for once the write could start (its directory there, writable): a refusal
            # comes as the first frame instead, before the API reads any of the body.
            await channel.send_control(Control(type="ready"))
            while True:
                kind, payload = await channel.receive()
                if kind is FrameKind.DATA:
                    yield payload
                elif kind is FrameKind.EOF:
                    return
                elif kind is FrameKind.CLOSE:
                    raise FileError("file_failed", "the upload was abandoned before its end")

        try:
            size = await self.files.write(ticket.session, ticket.path, body(), tar=ticket.tar, user=ticket.user)
        except FileError as e:
            await _refuse(channel, e.code, e.message)
            return
        except ChannelClosed as e:
            log.info("upload %s to %s broke: %s", ticket.id, ticket.session, e)
            return
        await channel.send_control(Control(type="done", size=size))
        await self._publish(ticket, "files.written", {"path": ticket.path, "bytes": size, "tar": ticket.tar})

    async def file_read(self, ticket: AccessTicket, channel: Channel) -> None:
        assert ticket.path is not None
        try:
            read = await self.files.read(ticket.session, ticket.path, user=ticket.user)
        except FileError as e:
            await _refuse(channel, e.code, e.message)
            return
        sent = 0
        try:
            await channel.send_control(Control(type="meta", kind=read.kind.value, size=read.size))
            async for chunk in read.chunks:
                sent += len(chunk)
                await channel.send(chunk)
            await channel.send_eof()
        except FileError as e:
            await _refuse(channel, e.code, e.message)
            return
        finally:
            await read.aclose()
        await self._publish(ticket, "files.read", {"path": ticket.path, "bytes": sent, "kind": read.kind.value})

    async def file_list(self, ticket: AccessTicket, channel: Channel) -> None:
        assert ticket.path is not None
        try:
            entries = await self.files.list(ticket.session, ticket.path, user=ticket.user)
        except FileError as e:
            await _refuse(channel, e.code, e.message)
            return
        await channel.send_control(Control(type="meta", kind="directory"))
        await channel.send(msgspec.json.encode(entries))
        await channel.send_eof()

    # -- ports ------------------------------------------------------------------------------

    async def port(self, ticket: AccessTicket, channel: Channel) -> None:
        """One connection to a port on the desktop's loopback, its bytes bridged as they come.
        Not an event each: a page makes dozens (``port.url_issued`` is the audited access)."""
        assert ticket.port is not None
        try:
            reader, writer = await self.ports.open(ticket.session, ticket.port, timeout_s=PORT_CONNECT_TIMEOUT_S)
        except PortError as e:
            await _refuse(channel, e.code, e.message)
            return
        try:
            await channel.send_control(Control(type="ready"))
            await bridge(channel, reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- the screen ---------------------------------------------------------------------------

    async def screen_op(self, ticket: AccessTicket, channel: Channel, screen: DesktopScreen) -> None:
        """A screenshot or an input action. ``ready`` at once (typing 10,000 characters outlasts
        the API's wait for a first frame), then the answer's bytes and EOF, or an ``error``.
        A screenshot's bytes are its ``Captured`` JSON line, then the image."""
        op = ticket.screen
        assert op is not None
        await channel.send_control(Control(type="ready"))
        began = time.monotonic()
        try:
            if isinstance(op, Screenshot):
                shot = await screen.screenshot(ticket.session, op)
                answer = msgspec.json.encode(shot.captured) + b"\n" + shot.image
            else:
                try:
                    done = await screen.act(ticket.session, op)
                except ScreenError as e:
                    if e.code == "input_failed":  # it may have half happened: audited too
                        await self._publish(ticket, f"input.{action_name(op)}", {**_audited(op), "error": e.code})
                    raise
                duration_ms = round((time.monotonic() - began) * 1000)
                answer = msgspec.json.encode({**done, "duration_ms": duration_ms})
                # Audited once done (a refusal sent nothing to the screen): who, what, where.
                await self._publish(ticket, f"input.{action_name(op)}", {**_audited(op), "duration_ms": duration_ms})
        except ScreenError as e:
            await _refuse(channel, e.code, e.message)
            return
        with contextlib.suppress(ChannelClosed):
            await channel.send(answer)
            await channel.send_eof()

    async def _publish(self, ticket: AccessTicket, type: str, data: dict[str, Any]) -> None:
        try:
            await self.bus.publish(
                make_event(
                    type,
                    sandbox=self.sandbox_id,
                    session=ticket.session,
                    data={"access_id": ticket.id, "by": ticket.by, **data},
                    tenant=ticket.tenant,
                )
            )
        except Exception:
            log.exception("could not publish %s for access %s", type, ticket.id)


class _TerminalPumps:
    """A terminal's two directions, until the process's output ends (``exited``) or the
    client's side does (``client_closed``); bytes counted each way for ``terminal.closed``."""

    def __init__(self, process: TerminalProcess, channel: Channel) -> None:
        self.process = process
        self.channel = channel
        self.started = time.monotonic()
        self.sent = self.received = 0
        self.ended_by = "exited"

    async def run(self) -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._screen, tasks.cancel_scope)
            tasks.start_soon(self._keys, tasks.cancel_scope)

    async def _screen(self, scope: anyio.CancelScope) -> None:
        while (data := await self.process.read()) is not None:
            self.sent += len(data)
            await self.channel.send(data)
        scope.cancel()

    async def _keys(self, scope: anyio.CancelScope) -> None:
        while True:
            kind, payload = await self.channel.receive()
            if kind is FrameKind.DATA:
                self.received += len(payload)
                await self.process.write(payload)
            elif kind is FrameKind.CONTROL:
                control = decode_control(payload)
                if control.type == "resize" and control.cols and control.rows:
                    await self.process.resize(control.cols, control.rows)
            elif kind in (FrameKind.EOF, FrameKind.CLOSE):
                self.ended_by = "client_closed"
                scope.cancel()
                return


def _audited(action: InputAction) -> dict[str, object]:
    return {"action": action_name(action), **audit(action)}


async def _refuse(channel: Channel, code: str, message: str) -> None:
    with contextlib.suppress(ChannelClosed):
        await channel.send_control(Control(type="error", code=code, message=message))
