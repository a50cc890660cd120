"""Session records in Redis. Every change is a compare-and-set on the record's revision,
done in one Lua script together with the event it emits, so a record never changes
without its event and no event describes a change that did not happen."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis

from . import states
from .events import EventBus, encode_event, make_event
from .keys import Keys
from .placement import NoCapacity, NoSandbox
from .schemas import SessionError, SessionRecord, now_rfc3339
from .states import SessionState

# KEYS: record, index, firehose, session stream, session env, the sandbox's placed set.
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
  redis.call('SREM', KEYS[6], ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[3])
  redis.call('SADD', KEYS[6], ARGV[3])
  if ARGV[8] ~= '' then redis.call('SET', KEYS[5], ARGV[8]) end
end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[4])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], id, 'event', ARGV[4])
if tonumber(ARGV[7]) > 0 then redis.call('EXPIRE', KEYS[4], ARGV[7]) end
return {1, id}
"""

# Placement: choose a sandbox by the rule of orchestrator/placement.py among the candidates
# that are alive and not draining, reserve a place under its cap, and store the session's
# record with its event: one script, so concurrent creates never exceed a cap and no record
# exists without its place (or the reverse). A create a warm desktop can serve prefers
# sandboxes with one and takes it (LPOP: two creates never share one).
# KEYS: session index, firehose.
# ARGV: 1 cold session id, 2 prefer warm (1|0), 3 cold record, 4 cold event, 5 warm record,
#   6 warm event, 7 env json ('' none), 8 firehose maxlen, 9 session maxlen, 10-16 key
#   templates (session, session stream, session env, placed, pool, alive, drain), 17 N,
#   then N pairs (sandbox id, cap). Templates hold \1S\1 for the session id and \1B\1 for
#   the sandbox id: msgspec never writes a raw control byte, so no user text can match them.
# Returns {1, session id, sandbox, entry id, warm 1|0}; {0, existing record} when the cold
#   id exists; {2, 'full'|'none'}.
PLACE_LUA = """
local function fill(s, session, sandbox)
  s = string.gsub(s, '\1S\1', session)
  return (string.gsub(s, '\1B\1', sandbox))
end
local cold_id = ARGV[1]
local cur = redis.call('GET', fill(ARGV[10], cold_id, ''))
if cur then return {0, cur} end
local prefer_warm = ARGV[2] == '1'
local best, best_n, best_cap, best_warm = nil, 0, 1, false
local alive = 0
local n = tonumber(ARGV[17])
for i = 0, n - 1 do
  local id, cap = ARGV[18 + 2 * i], tonumber(ARGV[19 + 2 * i])
  if redis.call('EXISTS', fill(ARGV[15], '', id)) == 1 and redis.call('EXISTS', fill(ARGV[16], '', id)) == 0 then
    alive = alive + 1
    local placed = redis.call('SCARD', fill(ARGV[13], '', id))
    if placed < cap then
      local warm = prefer_warm and redis.call('LLEN', fill(ARGV[14], '', id)) > 0
      local wins = best == nil
      if not wins then
        if warm ~= best_warm then wins = warm
        elseif placed * best_cap ~= best_n * cap then wins = placed * best_cap < best_n * cap
        elseif placed ~= best_n then wins = placed < best_n
        else wins = id < best end
      end
      if wins then best, best_n, best_cap, best_warm = id, placed, cap, warm end
    end
  end
end
if best == nil then
  if alive > 0 then return {2, 'full'} end
  return {2, 'none'}
end
local session, record, event = cold_id, ARGV[3], ARGV[4]
if best_warm then
  session = redis.call('LPOP', fill(ARGV[14], '', best))
  record, event = ARGV[5], ARGV[6]
end
redis.call('SADD', fill(ARGV[13], '', best), session)
redis.call('SET', fill(ARGV[10], session, best), fill(record, session, best))
redis.call('SADD', KEYS[1], session)
if ARGV[7] ~= '' and not best_warm then redis.call('SET', fill(ARGV[12], session, best), ARGV[7]) end
event = fill(event, session, best)
local entry = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'event', event)
redis.call('XADD', fill(ARGV[11], session, best), 'MAXLEN', '~', ARGV[9], entry, 'event', event)
return {1, session, best, entry, best_warm and 1 or 0}
"""
SESSION_MARK = "\x01S\x01"
SANDBOX_MARK = "\x01B\x01"

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


@dataclass(frozen=True)
class Placed:
    created: bool
    record: SessionRecord
    # A warm desktop was claimed: the session is born ready and needs no create job.
    warm: bool


Mutation = Callable[[SessionRecord], dict[str, Any]]


class SessionStore:
    def __init__(self, redis: aioredis.Redis, bus: EventBus) -> None:
        self._redis = redis
        self.bus = bus
        self.keys: Keys = bus.keys
        self._cas = redis.register_script(CAS_LUA)
        self._place = redis.register_script(PLACE_LUA)

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
        ok, payload = await self._write(record.id, record.sandbox, -1, record, event, env=env)
        if ok:
            return True, record
        assert payload
        return False, _decode_record(payload)

    async def place(
        self,
        record: SessionRecord,
        env: dict[str, str] | None,
        candidates: Sequence[tuple[str, int]],
        *,
        prefer_warm: bool,
    ) -> Placed:
        """Place ``record`` (its sandbox field is ignored) on the best of ``candidates``
        (sandbox id, cap) by the placement rule, atomically with storing it. With
        ``prefer_warm``, a sandbox with a warm desktop wins and the session takes that
        desktop's id, born ready. An existing record with the same id is returned as is.
        Raises NoCapacity or NoSandbox."""
        nonce_s, nonce_b = secrets.token_hex(16), secrets.token_hex(16)

        def template(r: SessionRecord, data: dict[str, Any]) -> tuple[bytes, bytes]:
            marked = msgspec.structs.replace(r, sandbox=nonce_b)
            event = self._state_event(marked, None, data)
            return tuple(  # type: ignore[return-value]
                blob.replace(nonce_s.encode(), SESSION_MARK.encode()).replace(nonce_b.encode(), SANDBOX_MARK.encode())
                for blob in (_encode(marked), event)
            )

        cold_record, cold_event = template(record, {})
        warm = msgspec.structs.replace(record, id=nonce_s, state=SessionState.READY)
        warm_record, warm_event = template(warm, {"warm": True})
        k = self.keys
        key_templates = [
            k.session(SESSION_MARK),
            k.session_events(SESSION_MARK),
            k.session_env(SESSION_MARK),
            k.placed(SANDBOX_MARK),
            k.pool(SANDBOX_MARK),
            k.sandbox_alive(SANDBOX_MARK),
            k.sandbox_drain(SANDBOX_MARK),
        ]
        args: list[Any] = [
            record.id,
            1 if prefer_warm else 0,
            cold_record,
            cold_event,
            warm_record,
            warm_event,
            _encode(env) if env else b"",
            self.bus.firehose_maxlen,
            self.bus.session_maxlen,
            *key_templates,
            len(candidates),
        ]
        for sandbox, cap in candidates:
            args += [sandbox, cap]
        reply = await self._place(keys=[k.session_index, k.firehose], args=args)
        outcome = int(reply[0])
        if outcome == 0:
            return Placed(False, _decode_record(reply[1]), warm=False)
        if outcome == 2:
            if _text(reply[1]) == "full":
                raise NoCapacity("every sandbox that could take this session is at its cap")
            raise NoSandbox("no sandbox that could take this session is available (silent or draining)")
        session, sandbox, is_warm = _text(reply[1]), _text(reply[2]), int(reply[4]) == 1
        base = warm if is_warm else record
        return Placed(True, msgspec.structs.replace(base, id=session, sandbox=sandbox), warm=is_warm)

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
            ok, _ = await self._write(session_id, current.sandbox, current.revision, body, event)
            if ok:
                return new
        raise ConcurrentUpdate(f"session {session_id!r} kept changing; gave up after 20 tries")

    async def fail(self, session_id: str, generation: int | None, code: str, message: str) -> SessionRecord:
        # Messages may quote Docker at length: the record and its event stay small.
        error = SessionError(code=code, message=message if len(message) <= 2000 else message[:1997] + "...")
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
        sandbox: str,
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
                keys.placed(sandbox),
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
