"""The event bus: Redis Streams, one firehose and one stream per session, both capped.

An event written for a session goes to both streams with the *same* entry id (the
firehose assigns it, the session stream reuses it: every entry of a session stream is
also in the firehose, in the same order, so the id is always valid there). So an event
has one id wherever a client reads it, and resuming works across both streams.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis

from . import tracing
from .keys import Keys
from .schemas import Event, SessionRecord, now_rfc3339
from .states import SessionState

log = logging.getLogger("orchestrator.events")

# KEYS: firehose, session stream (optional), the session's record (optional: when the event
#   has a session but no tenant). ARGV: event json, firehose maxlen, session maxlen.
# The tenant is filled in from the record, in the script, so it is the record's at the moment
# the event is written (exact, and no round trip): a worker's events (desktop.started,
# dockerd.ready, desktop.health, ...) need not know it. A record without a tenant field predates
# tenancy: the default tenant's. No record, or one that does not decode: no tenant (the event is
# then shown to admin tokens only). The JSON is spliced, not re-encoded (cjson would turn an
# empty object into an array): the encoding ends with ',"tenant":null}' (schemas.Event).
PUBLISH_LUA = """
local event = ARGV[1]
if KEYS[3] then
  local raw = redis.call('GET', KEYS[3])
  if raw then
    local ok, record = pcall(cjson.decode, raw)
    local tenant = nil
    if ok and type(record) == 'table' then
      tenant = record['tenant']
      if tenant == nil then tenant = 'default' end
    end
    local tail = ',"tenant":null}'
    if type(tenant) == 'string' and string.find(tenant, '^[a-z0-9][a-z0-9%-]*$')
        and string.sub(event, -#tail) == tail then
      event = string.sub(event, 1, -#tail - 1) .. ',"tenant":"' .. tenant .. '"}'
    end
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'event', event)
if KEYS[2] then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], id, 'event', event)
end
return id
"""

_encode = msgspec.json.Encoder().encode

# The request id of the command (the command stream's, docs/jobs.md) being acted on: every event
# made meanwhile carries it in ``data.request_id``, so a producer knows what follows from its
# request. Set by the command consumer around the action, and by a worker's lifecycle job when
# the job is the one that command enqueued (``command_request_of``); like the trace id, a task
# started meanwhile inherits it.
command_request: contextvars.ContextVar[str | None] = contextvars.ContextVar("orchestrator_command", default=None)


def command_trace(tenant: str, request_id: str) -> str:
    """The trace id of a command's action: derived from its request id, so the jobs it enqueues
    carry it (``LifecycleJob.trace``) and a worker can tell them from other jobs of the session."""
    return hashlib.sha256(f"command\0{tenant}\0{request_id}".encode()).hexdigest()[:32]


def command_request_of(request_id: str | None, tenant: str, trace: str | None) -> str | None:
    """The request id a lifecycle job acts for: the record's (the command that last moved the
    session) when the job carries that command's trace; None for any other job (an HTTP
    request's, a TTL expiry's, a reconcile's), whose events must not claim the command."""
    if request_id is None or trace is None or command_trace(tenant, request_id) != trace:
        return None
    return request_id


_decode_event = msgspec.json.Decoder(Event).decode


def make_event(
    type: str,
    *,
    sandbox: str,
    session: str | None = None,
    generation: int | None = None,
    data: dict[str, Any] | None = None,
    tenant: str | None = None,
) -> Event:
    request_id = command_request.get()
    if request_id is not None and "request_id" not in (data or {}):
        data = {**(data or {}), "request_id": request_id}
    return Event(
        type=type,
        ts=now_rfc3339(),
        sandbox=sandbox,
        session=session,
        generation=generation,
        data=data or {},
        trace=tracing.current.get(),
        tenant=tenant,
    )


# An event bigger than this keeps its envelope and loses its data (which says so): streams
# are capped by entry count, so entry size must be capped too for their memory to be bounded.
MAX_EVENT_BYTES = 16 * 1024


def encode_event(event: Event) -> bytes:
    raw = _encode(event)
    if len(raw) > MAX_EVENT_BYTES:
        raw = _encode(msgspec.structs.replace(event, data={"truncated": True, "bytes": len(raw)}))
    return raw


def state_event(record: SessionRecord, previous: SessionState | None, data: dict[str, Any]) -> bytes:
    """``session.<state>`` of ``record`` (``data["from"]``: the state it left), encoded: what
    the store's scripts write together with the record."""
    if previous is not None:
        data = {"from": previous.value, **data}
    event = make_event(
        f"session.{record.state.value}",
        sandbox=record.sandbox,
        session=record.id,
        generation=record.generation,
        data=data,
        tenant=record.tenant,
    )
    return encode_event(event)


class EventBus:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        firehose_maxlen: int = 100_000,
        session_maxlen: int = 2_000,
    ) -> None:
        self._redis = redis
        self.keys = keys
        self.firehose_maxlen = firehose_maxlen
        self.session_maxlen = session_maxlen
        self._publish = redis.register_script(PUBLISH_LUA)

    async def publish(self, event: Event) -> str:
        keys = [self.keys.firehose]
        if event.session is not None:
            keys.append(self.keys.session_events(event.session))
            if event.tenant is None:
                keys.append(self.keys.session(event.session))  # the script fills the tenant in
        entry_id = await self._publish(keys=keys, args=[encode_event(event), self.firehose_maxlen, self.session_maxlen])
        return _text(entry_id)

    async def ping(self) -> None:
        await self._redis.ping()

    def stream_key(self, session_id: str | None) -> str:
        return self.keys.firehose if session_id is None else self.keys.session_events(session_id)

    async def last_id(self, stream: str) -> str:
        """The newest entry id of ``stream`` ("0-0" when empty): reading after it means live only."""
        entries = await self._redis.xrevrange(stream, count=1)
        return _text(entries[0][0]) if entries else "0-0"

    async def recent_tenant(self, stream: str, look_back: int = 16) -> str | None:
        """The tenant the newest of the last ``look_back`` events of ``stream`` carries, if any:
        whose a deleted session was (its ``session.deleted`` carries it)."""
        for _, event in decode_entries(await self._redis.xrevrange(stream, count=look_back), skip_bad=True):
            if event.tenant is not None:
                return event.tenant
        return None

    async def first_id(self, stream: str) -> str | None:
        entries = await self._redis.xrange(stream, count=1)
        return _text(entries[0][0]) if entries else None

    async def read(
        self, stream: str, after: str, *, block_ms: int | None = None, count: int = 500
    ) -> list[tuple[str, Event]]:
        """Events with ids strictly greater than ``after``, oldest first."""
        reply = await self._redis.xread({stream: after}, count=count, block=block_ms)
        return decode_entries(reply[0][1]) if reply else []

    async def read_tolerant(
        self, stream: str, after: str, *, block_ms: int | None = None, count: int = 500
    ) -> tuple[str, list[tuple[str, Event]]]:
        """``read`` for a shared reader, which must not stall on one bad entry: the id read up
        to (``after`` when nothing came) and the entries that decode (the others are logged)."""
        reply = await self._redis.xread({stream: after}, count=count, block=block_ms)
        if not reply or not reply[0][1]:
            return after, []
        entries = reply[0][1]
        return _text(entries[-1][0]), decode_entries(entries, skip_bad=True)

    async def history(self, stream: str) -> list[tuple[str, Event]]:
        return decode_entries(await self._redis.xrange(stream))


def decode_entries(entries: Sequence[tuple[Any, dict[Any, Any]]], *, skip_bad: bool = False) -> list[tuple[str, Event]]:
    out = []
    for entry_id, fields in entries:
        raw = fields.get(b"event", fields.get("event"))
        if raw is None:
            continue
        try:
            out.append((_text(entry_id), _decode_event(raw)))
        except msgspec.DecodeError:
            if not skip_bad:
                raise
            log.warning("skipping stream entry %s: not an event", _text(entry_id))
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
