"""Server-Sent Events over a Redis stream: ``id:`` is the stream entry id, so a client that
reconnects with ``Last-Event-ID`` gets exactly what it missed, in order.

A following client catches up from Redis on what it asked for, then takes live events from the
process's one shared reader (``hub.py``): one Redis read per event for all clients and streams.
A client that falls behind the shared reader reads Redis itself, at its own pace, one batch at
a time and without blocking, until it has caught up, then follows the shared reader again: a
stalled client holds one batch of memory, delays nobody, and never holds a connection idle."""

from __future__ import annotations

import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sized
from dataclasses import dataclass, field

from .errors import ServiceError
from .events import EventBus, encode_event
from .hub import Overflow, StreamHub, frame
from .schemas import Event

# ASCII digits only (``\d`` would take any Unicode digit), each part at most 20 digits and
# within uint64: what Redis accepts, so a bad id is a 400 before any frame, never a failure after.
_ENTRY_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")
_UINT64_MAX = 2**64 - 1
BATCH = 200

LabelLookup = Callable[[str], Awaitable[dict[str, str] | None]]


def parse_after(last_event_id: str | None, after: str | None) -> str | None:
    """The id to resume after: the Last-Event-ID header wins over ``?after=``."""
    value = last_event_id if last_event_id else after
    if value is None or value == "":
        return None
    if not _ENTRY_ID.fullmatch(value) or any(int(part) > _UINT64_MAX for part in value.split("-")):
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


# Each filter is checked against every event a stream carries: a bounded list keeps a stream's
# cost per event bounded (50,000 type filters took 9-25 ms of the event loop per event).
MAX_FILTERS = 32


def check_filter_counts(**lists: Sized | None) -> None:
    """400 ``too_many_filters`` when a filter list (named by its query parameter) is too long."""
    for name, items in lists.items():
        if items is not None and len(items) > MAX_FILTERS:
            raise ServiceError(
                400, "too_many_filters", f"{len(items)} {name} filters; at most {MAX_FILTERS} of each", name
            )


@dataclass(frozen=True)
class EventFilter:
    """Which events a client wants: types (exact, or a prefix ending in ``*``), sessions, labels;
    at most MAX_FILTERS of each. ``tenant`` is not the client's wish but its token's limit: only
    events carrying that tenant (None: every event, for admin tokens)."""

    types: tuple[str, ...] = ()
    sessions: frozenset[str] = frozenset()
    labels: dict[str, str] = field(default_factory=dict)
    tenant: str | None = None

    def __post_init__(self) -> None:
        check_filter_counts(type=self.types, session=self.sessions, label=self.labels)

    def wants_type(self, type: str) -> bool:
        return not self.types or any(type.startswith(t[:-1]) if t.endswith("*") else type == t for t in self.types)

    def wants_session(self, session: str | None) -> bool:
        return not self.sessions or session in self.sessions

    def shows(self, event: Event) -> bool:
        """The token may see it: an event without a tenant (a sandbox's) is admin's only."""
        return self.tenant is None or event.tenant == self.tenant

    @property
    def empty(self) -> bool:
        return not (self.types or self.sessions or self.labels or self.tenant)


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
        if not (f.shows(event) and f.wants_type(event.type) and f.wants_session(event.session)):
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
        if not self.follow or self.hub is None:
            async for chunk in self._own(block=self.follow):
                yield chunk
            return
        while True:
            try:
                async for chunk in self._shared():
                    yield chunk
            except Overflow:
                pass  # fell behind the shared reader: catch up at our own pace, from our last id
            async for chunk in self._own(block=False):
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

    async def _own(self, block: bool) -> AsyncIterator[bytes]:
        """Read Redis directly from our last id; without ``block``, until there is nothing more."""
        while True:
            entries = await self.bus.read(
                self.stream, self.after, block_ms=self.keepalive_ms if block else None, count=BATCH
            )
            if not entries:
                if not block:
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


class StreamLimits:
    """Open SSE streams of this process, in all and per token: a stream takes a slot before its
    200 is sent (over a cap: 429 ``too_many_streams``) and gives it back when it ends."""

    def __init__(self, per_process: int, per_token: int) -> None:
        self.per_process = per_process
        self.per_token = per_token
        self.open = 0
        self._by_token: dict[str, int] = {}

    def admit(self, token: str, frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``frames``, holding one of ``token``'s slots until it ends (or, never started, is
        collected: a client gone before the first frame must not keep its slot)."""
        if self.open >= self.per_process:
            raise ServiceError(
                429, "too_many_streams", f"this API process serves at most {self.per_process} event streams"
            )
        if self._by_token.get(token, 0) >= self.per_token:
            raise ServiceError(
                429, "too_many_streams", f"token {token!r} has {self.per_token} event streams open, the most allowed"
            )
        self.open += 1
        self._by_token[token] = self._by_token.get(token, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.open -= 1
                left = self._by_token[token] - 1
                if left:
                    self._by_token[token] = left
                else:
                    del self._by_token[token]

        async def held() -> AsyncIterator[bytes]:
            try:
                async for chunk in frames:
                    yield chunk
            finally:
                release()
                close = getattr(frames, "aclose", None)
                if close is not None:
                    await close()  # now, not at collection: its hub follower leaves at once

        stream = held()
        weakref.finalize(stream, release)
        return stream
