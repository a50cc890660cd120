"""The byte channel every access into a desktop travels: a terminal's keystrokes and screen, a
file's bytes, a port's connection. One small interface, two routes under it (orchestrator/
access.py chooses): a TCP connection straight to the sandbox's worker when the API can open
one, or a pair of Redis streams when it cannot (the worker only reaches out).

Both ends see the same thing: ordered bytes each way, a half-close (``send_eof``: the other
side reads ``b""``), and for terminals a few control messages beside the bytes (a resize, the
exit). Frames keep the two apart; ``StreamChannel`` is the TCP framing, sans anything else."""

from __future__ import annotations

import asyncio
import enum
import struct
from typing import Protocol

import msgspec


class FrameKind(enum.IntEnum):
    DATA = 1  # bytes of the stream
    EOF = 2  # no more bytes this way (the other way may go on)
    CONTROL = 3  # a JSON message beside the bytes (Control)
    CLOSE = 4  # the channel ends (the other side drops what it would still send)


class Control(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=False):
    """A message beside the bytes: ``resize`` (cols, rows), ``exit`` (exit_code), ``error``
    (code, message: the worker could not do what the ticket asked), ``meta`` (what a file read
    found: kind, size), ``ready`` (the worker has started what the ticket asked)."""

    type: str
    cols: int | None = None
    rows: int | None = None
    exit_code: int | None = None
    code: str | None = None
    message: str | None = None
    kind: str | None = None
    size: int | None = None


class ChannelClosed(Exception):
    """The other side went away (or the route broke) before the exchange ended."""


class Channel(Protocol):
    """One access's exchange. ``receive`` returns the next frame, ``(FrameKind.CLOSE, b"")``
    once the other side closed; it raises ChannelClosed when the route broke instead."""

    async def send(self, data: bytes) -> None: ...

    async def send_eof(self) -> None: ...

    async def send_control(self, control: Control) -> None: ...

    async def receive(self) -> tuple[FrameKind, bytes]: ...

    async def aclose(self) -> None: ...


_HEADER = struct.Struct("!BI")  # kind, length
MAX_FRAME = 1 << 20


def encode_frame(kind: FrameKind, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def encode_control(control: Control) -> bytes:
    return encode_frame(FrameKind.CONTROL, msgspec.json.encode(control))


def decode_control(payload: bytes) -> Control:
    try:
        return msgspec.json.decode(payload, type=Control)
    except msgspec.DecodeError as e:
        raise ChannelClosed(f"a malformed control message: {e}") from e


class StreamChannel:
    """The framing over a TCP connection (the direct route), or any asyncio stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._closed = False

    async def send(self, data: bytes) -> None:
        for start in range(0, len(data), MAX_FRAME):
            await self._write(encode_frame(FrameKind.DATA, data[start : start + MAX_FRAME]))

    async def send_eof(self) -> None:
        await self._write(encode_frame(FrameKind.EOF))

    async def send_control(self, control: Control) -> None:
        await self._write(encode_control(control))

    async def _write(self, frame: bytes) -> None:
        if self._closed:
            raise ChannelClosed("the channel is closed")
        try:
            self._writer.write(frame)
            await self._writer.drain()
        except (ConnectionError, OSError) as e:
            raise ChannelClosed(str(e)) from e

    async def receive(self) -> tuple[FrameKind, bytes]:
        try:
            header = await self._reader.readexactly(_HEADER.size)
            kind, length = _HEADER.unpack(header)
            if length > MAX_FRAME:
                raise ChannelClosed(f"a frame of {length} bytes (at most {MAX_FRAME})")
            payload = await self._reader.readexactly(length) if length else b""
        except asyncio.IncompleteReadError as e:
            if not e.partial and not self._closed:
                return FrameKind.CLOSE, b""  # the other side closed between frames
            raise ChannelClosed("the connection ended inside a frame") from e
        except (ConnectionError, OSError) as e:
            raise ChannelClosed(str(e)) from e
        try:
            return FrameKind(kind), payload
        except ValueError as e:
            raise ChannelClosed(f"an unknown frame kind {kind}") from e

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self._writer.is_closing():
                self._writer.write(encode_frame(FrameKind.CLOSE))
            self._writer.close()
            await self._writer.wait_closed()
        except (ConnectionError, OSError, RuntimeError):  # uvloop: a transport closed already
            pass
