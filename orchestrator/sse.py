"""Server-Sent Events over a Redis stream: ``id:`` is the stream entry id, so a client that
reconnects with ``Last-Event-ID`` gets exactly what it missed, in order."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from .events import EventBus, encode_event
from .service import ServiceError

_ENTRY_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")


def parse_after(last_event_id: str | None, after: str | None) -> str | None:
    """The id to resume after: the Last-Event-ID header wins over ``?after=``."""
    value = last_event_id if last_event_id else after
    if value is None or value == "":
        return None
    if not _ENTRY_ID.fullmatch(value):
        raise ServiceError(
            400,
            "invalid_event_id",
            f"event id {value[:60]!r} is not a stream entry id like 1700000000000-0",
            field="Last-Event-ID" if last_event_id else "after",
        )
    return value if "-" in value else f"{value}-0"


def frame(entry_id: str, type: str, data: bytes) -> bytes:
    return b"id: " + entry_id.encode() + b"\nevent: " + type.encode() + b"\ndata: " + data + b"\n\n"


class EventFeed:
    def __init__(self, bus: EventBus, stream: str, after: str, keepalive_s: float, follow: bool = True) -> None:
        self.bus = bus
        self.stream = stream
        self.after = after
        self.keepalive_ms = int(keepalive_s * 1000)
        # follow=False: send what the stream holds now, then end (for scripts and `events`).
        self.follow = follow

    async def frames(self) -> AsyncIterator[bytes]:
        # Tell the client how long to wait before reconnecting, then stream.
        yield b"retry: 1000\n\n"
        while True:
            entries = await self.bus.read(self.stream, self.after, block_ms=self.keepalive_ms if self.follow else None)
            if not entries:
                if not self.follow:
                    return
                yield b": keep-alive\n\n"
                continue
            for entry_id, event in entries:
                self.after = entry_id
                yield frame(entry_id, event.type, encode_event(event))
