"""A Channel pumped to and from a raw TCP connection: what a port's access is at the far end
(the worker's connection to 127.0.0.1:port inside the desktop), and what tests stand in for it.

Both ways at once, each with backpressure (a write waits for its drain before the next read),
half-closes passed on (the channel's EOF is the socket's ``write_eof``, the socket's EOF the
channel's), and one end for both: the channel's CLOSE, a broken route or a reset connection
ends the whole bridge, as does the second half-close."""

from __future__ import annotations

import asyncio
import contextlib

from .access_channel import Channel, ChannelClosed, FrameKind

READ_SIZE = 64 * 1024


async def bridge(channel: Channel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Pump until both sides are done; then the socket is closed and the channel too."""
    eof_from_channel = asyncio.Event()
    socket_done = asyncio.Event()
    to_socket = asyncio.create_task(_channel_to_socket(channel, writer, eof_from_channel, socket_done))
    to_channel = asyncio.create_task(_socket_to_channel(channel, reader))
    try:
        done, _ = await asyncio.wait({to_socket, to_channel}, return_when=asyncio.FIRST_COMPLETED)
        if to_channel in done and to_channel.result() and not to_socket.done():
            # The socket half-closed cleanly: the other way may go on until the channel ends it too.
            socket_done.set()
            if not eof_from_channel.is_set():
                await to_socket
    finally:
        for task in (to_socket, to_channel):
            task.cancel()
        for task in (to_socket, to_channel):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
        with contextlib.suppress(ChannelClosed, ConnectionError, OSError):
            await channel.aclose()


async def _channel_to_socket(
    channel: Channel, writer: asyncio.StreamWriter, eof_from_channel: asyncio.Event, socket_done: asyncio.Event
) -> None:
    """Until the channel closes (or breaks), or its EOF comes after the socket's own."""
    try:
        while True:
            kind, payload = await channel.receive()
            if kind is FrameKind.DATA:
                if eof_from_channel.is_set():
                    return  # bytes after an EOF: a broken peer, end the exchange
                writer.write(payload)
                await writer.drain()
            elif kind is FrameKind.EOF:
                eof_from_channel.set()
                if writer.can_write_eof():
                    writer.write_eof()
                if socket_done.is_set():
                    return
            elif kind is FrameKind.CLOSE:
                return
            # CONTROL: nothing a raw connection carries; ignored.
    except (ChannelClosed, ConnectionError, OSError):
        return


async def _socket_to_channel(channel: Channel, reader: asyncio.StreamReader) -> bool:
    """True when the socket ended cleanly (its EOF passed on), False when it or the channel broke."""
    try:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                await channel.send_eof()
                return True
            await channel.send(data)  # waits for the route's drain: the socket is read no faster
    except (ChannelClosed, ConnectionError, OSError):
        return False
