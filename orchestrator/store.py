"""Session records in Redis. Every change is a compare-and-set on the record's revision,
done in one Lua script together with the event it emits, so a record never changes
without its event and no event describes a change that did not happen."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis

from . import states
from .events import EventBus, encode_event, make_event
from .names import Keys
from .schemas import SessionError, SessionRecord, now_rfc3339
from .states import SessionState

# KEYS: record, index, firehose, session stream, session env.
# ARGV: expected revision (-1: must not exist), new record json ('' deletes it and its env),
#       session id, event json, firehose maxlen, session maxlen, session stream ttl after
#       deletion (0: none), env json to store with the record ('': leave as is).
# Returns {1, entry id} or {0, current record json or ''}.
CAS_LUA = """
local cur = redis.call('GET', KEYS[1])
local expected = tonumber(ARGV[1])
if expected < 0 then
  if cur then return {0, cur} end
else
  if not cur then return {0, ''} end
  if cjson.decode(cur)['revision'] ~= expected then return {0, cur} end
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1], KEYS[5])
  redis.call('SREM', KEYS[2], ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[3])
  if ARGV[8] ~= '' then redis.call('SET', KEYS[5], ARGV[8]) end
end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[4])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], id, 'event', ARGV[4])
if tonumber(ARGV[7]) > 0 then redis.call('EXPIRE', KEYS[4], ARGV[7]) end
return {1, id}
"""

# A warm claim: pop a ready desktop's session id from the pool and, in the same script, store
# the session's record (born ready) with its event. Atomic, so two creates never get the same
# desktop and no reconciler pass ever sees a claimed desktop without its record.
# KEYS: pool list, session index, firehose. ARGV: record key, session stream key, record json,
# event json (all with PLACEHOLDER where the id goes), firehose maxlen, session maxlen.
# Returns the claimed id, or false when the pool is empty.
CLAIM_LUA = """
local id = redis.call('LPOP', KEYS[1])
if not id then return false end
local function with_id(s) return (string.gsub(s, '@@session@@', id)) end
redis.call('SET', with_id(ARGV[1]), with_id(ARGV[3]))
redis.call('SADD', KEYS[2], id)
local event = with_id(ARGV[4])
local entry = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'event', event)
redis.call('XADD', with_id(ARGV[2]), 'MAXLEN', '~', ARGV[6], entry, 'event', event)
return id
"""
PLACEHOLDER = "@@session@@"

_encode = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(SessionRecord).decode
_decode_env = msgspec.json.Decoder(dict[str, str]).decode

# How long a deleted session's event stream stays readable (a dashboard may still be following).
DELETED_STREAM_TTL_S = 3600


class SessionNotFound(Exception):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} does not exist")
        self.session_id = session_id


class StaleGeneration(Exception):
    """The job was issued for an older incarnation of the session; it must not act."""

    def __init__(self, session_id: str, expected: int, actual: int) -> None:
        super().__init__(f"session {session_id!r} is at generation {actual}, not {expected}")
        self.expected = expected
        self.actual = actual


class ConcurrentUpdate(Exception):
    pass


Mutation = Callable[[SessionRecord], dict[str, Any]]


class SessionStore:
    def __init__(self, redis: aioredis.Redis, bus: EventBus) -> None:
        self._redis = redis
        self.bus = bus
        self.keys: Keys = bus.keys
        self._cas = redis.register_script(CAS_LUA)
        self._claim = redis.register_script(CLAIM_LUA)

    async def get(self, session_id: str) -> SessionRecord | None:
        raw = await self._redis.get(self.keys.session(session_id))
        return None if raw is None else _decode_record(raw)

    async def list(self) -> list[SessionRecord]:
        ids = sorted(_text(i) for i in await self._redis.smembers(self.keys.session_index))  # type: ignore[misc]
        if not ids:
            return []
        raws = await self._redis.mget([self.keys.session(i) for i in ids])
        return [_decode_record(raw) for raw in raws if raw is not None]

    async def get_env(self, session_id: str) -> dict[str, str]:
        """The desktop's environment, kept apart from the record so no listing shows it."""
        raw = await self._redis.get(self.keys.session_env(session_id))
        return {} if raw is None else _decode_env(raw)

    async def create(self, record: SessionRecord, env: dict[str, str] | None = None) -> tuple[bool, SessionRecord]:
        """Store a new record (and its env) and emit ``session.<state>``; if one exists, return it."""
        event = self._state_event(record, None, {})
        ok, payload = await self._write(record.id, -1, record, event, env=env)
        if ok:
            return True, record
        assert payload
        return False, _decode_record(payload)

    async def claim_warm(self, record: SessionRecord) -> SessionRecord | None:
        """Claim a warm desktop of ``record.sandbox`` for ``record`` (its id is ignored: the
        desktop's pre-chosen id is the session's). Returns the stored, ready record, or None
        when the pool is empty."""
        template = msgspec.structs.replace(record, id=PLACEHOLDER, state=SessionState.READY)
        event = self._state_event(template, None, {"warm": True})
        claimed = await self._claim(
            keys=[self.keys.pool(record.sandbox), self.keys.session_index, self.keys.firehose],
            args=[
                self.keys.session(PLACEHOLDER),
                self.keys.session_events(PLACEHOLDER),
                _encode(template),
                event,
                self.bus.firehose_maxlen,
                self.bus.session_maxlen,
            ],
        )
        if not claimed:
            return None
        return msgspec.structs.replace(template, id=_text(claimed))

    async def transition(
        self,
        session_id: str,
        target: SessionState,
        *,
        generation: int | None = None,
        mutate: Mutation | None = None,
        event_data: dict[str, Any] | None = None,
    ) -> SessionRecord:
        """Move a session to ``target`` if the state machine allows it from its current state.

        ``generation``: refuse (StaleGeneration) unless the record is at this generation.
        ``mutate``: further field changes, computed from the current record.
        Raises SessionNotFound, StaleGeneration or states.TransitionError; never applies
        a refused transition.
        """
        for _ in range(20):
            current = await self.get(session_id)
            if current is None:
                raise SessionNotFound(session_id)
            if generation is not None and current.generation != generation:
                raise StaleGeneration(session_id, generation, current.generation)
            states.check(current.state, target)
            changes = mutate(current) if mutate else {}
            if target is not SessionState.FAILED:
                changes.setdefault("error", None)
            new = msgspec.structs.replace(
                current, state=target, revision=current.revision + 1, updated_at=now_rfc3339(), **changes
            )
            data = dict(event_data or {})
            if new.error is not None and target is SessionState.FAILED:
                data.update(code=new.error.code, message=new.error.message)
            event = self._state_event(new, current.state, data)
            body = None if target is SessionState.DELETED else new
            ok, _ = await self._write(session_id, current.revision, body, event)
            if ok:
                return new
        raise ConcurrentUpdate(f"session {session_id!r} kept changing; gave up after 20 tries")

    async def fail(self, session_id: str, generation: int | None, code: str, message: str) -> SessionRecord:
        error = SessionError(code=code, message=message)
        return await self.transition(
            session_id, SessionState.FAILED, generation=generation, mutate=lambda _: {"error": error}
        )

    def _state_event(self, record: SessionRecord, previous: SessionState | None, data: dict[str, Any]) -> bytes:
        if previous is not None:
            data = {"from": previous.value, **data}
        event = make_event(
            f"session.{record.state.value}",
            sandbox=record.sandbox,
            session=record.id,
            generation=record.generation,
            data=data,
        )
        return encode_event(event)

    async def _write(
        self,
        session_id: str,
        expected_revision: int,
        record: SessionRecord | None,
        event: bytes,
        env: dict[str, str] | None = None,
    ) -> tuple[bool, bytes | None]:
        keys = self.keys
        reply = await self._cas(
            keys=[
                keys.session(session_id),
                keys.session_index,
                keys.firehose,
                keys.session_events(session_id),
                keys.session_env(session_id),
            ],
            args=[
                expected_revision,
                b"" if record is None else _encode(record),
                session_id,
                event,
                self.bus.firehose_maxlen,
                self.bus.session_maxlen,
                DELETED_STREAM_TTL_S if record is None else 0,
                _encode(env) if env else b"",
            ],
        )
        ok = int(reply[0]) == 1
        return ok, (reply[1] or None) if not ok else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


__all__ = [
    "ConcurrentUpdate",
    "SessionNotFound",
    "SessionStore",
    "StaleGeneration",
]
