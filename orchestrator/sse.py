"""Server-Sent Events over a Redis stream: ``id:`` is the stream entry id, so a client that
reconnects with ``Last-Event-ID`` gets exactly what it missed, in order.

A following client catches up from Redis on what it asked for, then takes live events from the
process's shared reader for the stream (``hub.py``): one Redis read per event for all clients.
A client that falls behind the shared reader goes back to reading Redis itself, at its own
pace and one batch at a time: a stalled client holds one batch of memory and delays nobody."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from .errors import ServiceError
from .events import EventBus, encode_event
from .hub import Overflow, StreamHub, frame
from .schemas import Event

_ENTRY_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")
BATCH = 200

LabelLookup = Callable[[str], Awaitable[dict[str, str] | None]]


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


def entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class EventFilter:
    """Which events a client wants: types (exact, or a prefix ending in ``*``), sessions, labels."""

    types: tuple[str, ...] = ()
    sessions: frozenset[str] = frozenset()
    labels: dict[str, str] = field(default_factory=dict)

    def wants_type(self, type: str) -> bool:
        return not self.types or any(type.startswith(t[:-1]) if t.endswith("*") else type == t for t in self.types)

    def wants_session(self, session: str | None) -> bool:
        return not self.sessions or session in self.sessions

    @property
    def empty(self) -> bool:
        return not (self.types or self.sessions or self.labels)


class EventFeed:
    def __init__(
        self,
        bus: EventBus,
        stream: str,
        after: str,
        keepalive_s: float,
        follow: bool = True,
        filter: EventFilter | None = None,
        labels_of: LabelLookup | None = None,
        hub: StreamHub | None = None,
    ) -> None:
        self.bus = bus
        self.hub = hub
        self.stream = stream
        self.after = after
        self.keepalive_ms = int(keepalive_s * 1000)
        # follow=False: send what the stream holds now, then end (for scripts and `events`).
        self.follow = follow
        self.filter = filter or EventFilter()
        self._labels_of = labels_of
        self._labels: dict[str, dict[str, str] | None] = {}

    async def _matches(self, event: Event) -> bool:
        f = self.filter
        if not (f.wants_type(event.type) and f.wants_session(event.session)):
            return False
        if not f.labels:
            return True
        if event.session is None or self._labels_of is None:
            return False
        if event.session not in self._labels:
            if len(self._labels) > 10_000:  # bounded: forget and look up again
                self._labels.clear()
            self._labels[event.session] = await self._labels_of(event.session)
        labels = self._labels[event.session]
        return labels is not None and all(labels.get(k) == v for k, v in f.labels.items())

    async def frames(self) -> AsyncIterator[bytes]:
        # Tell the client how long to wait before reconnecting, then stream.
        yield b"retry: 1000\n\n"
        reset = await self._trimmed()
        if reset is not None:
            yield reset
        if self.follow and self.hub is not None:
            try:
                async for chunk in self._shared():
                    yield chunk
            except Overflow:
                pass  # fell behind the shared reader: on at our own pace, from our last id
        async for chunk in self._own():
            yield chunk

    async def _shared(self) -> AsyncIterator[bytes]:
        assert self.hub is not None
        async with self.hub.follow(self.stream) as follower:
            # What came before the shared reader's position, from Redis (no blocking: it exists).
            caught_up = entry_key(self.after) >= entry_key(follower.start)
            while not caught_up:
                entries = await self.bus.read(self.stream, self.after, count=BATCH)
                caught_up = not entries
                for entry_id, event in entries:
                    if entry_key(entry_id) > entry_key(follower.start):
                        caught_up = True  # the follower's buffer has the rest
                        break
                    self.after = entry_id
                    if await self._matches(event):
                        yield frame(entry_id, event.type, encode_event(event))
                caught_up = caught_up or entry_key(self.after) >= entry_key(follower.start)
            while True:
                batch = await follower.next()
                if not batch:
                    yield b": keep-alive\n\n"
                    continue
                for entry_id, event, data in batch:
                    if entry_key(entry_id) <= entry_key(self.after):
                        continue
                    self.after = entry_id
                    if await self._matches(event):
                        yield data

    async def _own(self) -> AsyncIterator[bytes]:
        while True:
            entries = await self.bus.read(
                self.stream, self.after, block_ms=self.keepalive_ms if self.follow else None, count=BATCH
            )
            if not entries:
                if not self.follow:
                    return
                yield b": keep-alive\n\n"
                continue
            for entry_id, event in entries:
                self.after = entry_id
                if await self._matches(event):
                    yield frame(entry_id, event.type, encode_event(event))

    async def _trimmed(self) -> bytes | None:
        """A ``reset`` event when the events after the client's id were trimmed away: the client
        cannot get what it missed and must re-read the state it cares about."""
        if self.after == "0-0":
            return None
        oldest = await self.bus.first_id(self.stream)
        if oldest is None or entry_key(oldest) <= entry_key(self.after):
            return None
        data = b'{"reason": "trimmed", "requested_after": "%s", "oldest": "%s"}' % (
            self.after.encode(),
            oldest.encode(),
        )
        self.after = "0-0"  # then everything still kept, in order
        return b"event: reset\ndata: " + data + b"\n\n"
