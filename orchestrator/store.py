"""Session records in Redis. Every change is a compare-and-set on the record's revision,
done in one Lua script together with the event it emits, so a record never changes
without its event and no event describes a change that did not happen."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis

from . import states
from .events import EventBus, state_event
from .keys import Keys
from .locks import LeaseLost
from .placement import NoCapacity, NoSandbox, choose
from .reservation import Placed, Reservations
from .schemas import SessionError, SessionRecord, now_rfc3339
from .states import SessionState

log = logging.getLogger("orchestrator.store")

# KEYS: record, index, firehose, session stream, the sandbox's placed set, the session's
#       tombstone, its lock, its tenant's session set.
# ARGV: expected revision (-1: must not exist), new record json ('' deletes it and its env),
#       session id, event json, firehose maxlen, session maxlen, session stream ttl after
#       deletion (0: none), env json to store with the record ('': leave as is), tombstone ttl,
#       lease token, the session's env key, the tenant's quota for a new record (0: none).
# Returns {1, entry id}, {0, current record json or ''}, or {3, ''} when a new record would
# take its tenant over the quota. The tenant's set is kept like the placed set: added to on
# every write of a record (so a record written before tenancy is counted from its next change),
# removed from with the record, in the same script: concurrent creates never exceed a quota.
# The env key is an argument, not one of KEYS: Redis checks a script's declared keys as read
# and write, and the API's ACL user may only write env (SET, DEL: docs/redis.md). The project
# runs on one Redis (or Sentinel), never Cluster, so undeclared keys are fine.
# Fence (KEYS[7], ARGV[10]): a lifecycle operation's write passes the session's lock key and
# its lease token; unless the lock key still holds that token, nothing is written and the
# script returns {2, ''}. The API's writes hold no lease and pass '' (no fence).
CAS_LUA = """
if ARGV[10] ~= '' and redis.call('GET', KEYS[7]) ~= ARGV[10] then return {2, ''} end
local cur = redis.call('GET', KEYS[1])
local expected = tonumber(ARGV[1])
if expected < 0 then
  if cur then return {0, cur} end
  local quota = tonumber(ARGV[12])
  if quota > 0 and redis.call('SCARD', KEYS[8]) >= quota then return {3, ''} end
else
  if not cur then return {0, ''} end
  if cjson.decode(cur)['revision'] ~= expected then return {0, cur} end
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1], ARGV[11])
  redis.call('SREM', KEYS[2], ARGV[3])
  redis.call('SREM', KEYS[5], ARGV[3])
  redis.call('SREM', KEYS[8], ARGV[3])
  -- The tombstone: the reconciler's evidence that the session's leftovers may go (H3).
  redis.call('SET', KEYS[6], '1', 'EX', ARGV[9])
else
  if expected < 0 then redis.call('DEL', KEYS[6]) end
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[3])
  redis.call('SADD', KEYS[5], ARGV[3])
  redis.call('SADD', KEYS[8], ARGV[3])
  if ARGV[8] ~= '' then redis.call('SET', ARGV[11], ARGV[8]) end
end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[4])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], id, 'event', ARGV[4])
if tonumber(ARGV[7]) > 0 then redis.call('EXPIRE', KEYS[4], ARGV[7]) end
return {1, id}
"""

# A reservation fails only when its sandbox changed since the read (someone else took the
# last place or the desktop, or it went silent or draining): each failure is another's
# progress, so a few tries do. After half of them a create stops racing for warm desktops
# and takes the cold path, as one that finds the pools empty does.
PLACE_TRIES = 10

# A tenant's set holds an id only while that id's record exists and is the tenant's, unless
# something wrote the record without this version's scripts: an older process during a rolling
# upgrade deleting a session (its script does not know the set), an operator's DEL. Such a
# leftover would hold a place in the quota for good, so a refused create prunes the set, then
# tries once more. Each member is checked and removed in one script: no create or delete can
# come between (both change the record and the set together).
# KEYS: 1 the tenant's set, then each member's record. ARGV: 1 the tenant, then the members.
# Returns how many were removed.
PRUNE_LUA = """
local removed = 0
for i = 2, #ARGV do
  local raw = redis.call('GET', KEYS[i])
  local owner = nil
  if raw then
    local ok, record = pcall(cjson.decode, raw)
    if ok and type(record) == 'table' then owner = record['tenant'] or 'default' end
  end
  if owner ~= ARGV[1] then
    redis.call('SREM', KEYS[1], ARGV[i])
    removed = removed + 1
  end
end
return removed
"""
_NO_CAPACITY = "every sandbox that could take this session is at its cap"
_NO_ROOM = "every sandbox that could take this session is at its cap or low on disk"
_NO_SANDBOX = "no sandbox that could take this session is available (silent or draining)"

_encode = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(SessionRecord).decode
_decode_env = msgspec.json.Decoder(dict[str, str]).decode

# How long a deleted session's event stream stays readable (a dashboard may still be following).
DELETED_STREAM_TTL_S = 3600


class SessionNotFound(Exception):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} does not exist")
        self.session_id = session_id


class QuotaExceeded(Exception):
    """A new session would take its tenant over ORCH_TENANT_MAX_SESSIONS."""

    def __init__(self, tenant: str, quota: int) -> None:
        super().__init__(
            f"tenant {tenant!r} holds its quota of {quota} sessions (deleted ones do not count); delete one first"
        )
        self.tenant = tenant
        self.quota = quota


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
    def __init__(self, redis: aioredis.Redis, bus: EventBus, *, tombstone_ttl_s: int = 3 * 86400) -> None:
        self._redis = redis
        self.tombstone_ttl_s = max(1, tombstone_ttl_s)
        self.bus = bus
        self.keys: Keys = bus.keys
        self._cas = redis.register_script(CAS_LUA)
        # Placement's read and reservation (reservation.py); ``place`` below loops over them.
        self.reservations = Reservations(redis, bus)
        self._prune_script = redis.register_script(PRUNE_LUA)

    async def get(self, session_id: str, *, tenant: str | None = None) -> SessionRecord | None:
        """The record; with ``tenant``, None unless it is that tenant's (as if it did not exist)."""
        raw = await self._redis.get(self.keys.session(session_id))
        record = None if raw is None else _decode_record(raw)
        return None if record is None or (tenant is not None and record.tenant != tenant) else record

    async def list(self, sandbox: str | None = None, *, tenant: str | None = None) -> list[SessionRecord]:
        """Every record (the API), or only ``sandbox``'s: a worker reads its own placed set,
        not the fleet's records; with ``tenant``, only that tenant's (from the records, not the
        tenant's set: a record written before tenancy is in no set until its next change). A
        record this version cannot decode is skipped and logged."""
        index = self.keys.session_index if sandbox is None else self.keys.placed(sandbox)
        ids = sorted(_text(i) for i in await self._redis.smembers(index))  # type: ignore[misc]
        if not ids:
            return []
        raws = await self._redis.mget([self.keys.session(i) for i in ids])
        records = [_decode_listed(i, raw) for i, raw in zip(ids, raws, strict=True) if raw is not None]
        # The placed set is the sandbox's, but a record moved on is not: keep only its own.
        return [
            r
            for r in records
            if r is not None and (sandbox is None or r.sandbox == sandbox) and (tenant is None or r.tenant == tenant)
        ]

    async def prune_tenant(self, tenant: str) -> int:
        """Drop the ids in ``tenant``'s set whose record is gone or another's (PRUNE_LUA);
        returns how many went."""
        key = self.keys.tenant_sessions(tenant)
        members = sorted(_text(m) for m in await self._redis.smembers(key))  # type: ignore[misc]
        if not members:
            return 0
        removed = await self._prune_script(
            keys=[key, *(self.keys.session(m) for m in members)], args=[tenant, *members]
        )
        if removed:
            log.warning("tenant %s: %d ids without their record left its quota count", tenant, removed)
        return int(removed)

    async def deleted(self, session_ids: Sequence[str]) -> set[str]:
        """Which of ``session_ids`` have a tombstone (deleted within ORCH_TOMBSTONE_TTL) and no record."""
        if not session_ids:
            return set()
        async with self._redis.pipeline(transaction=True) as pipe:
            for i in session_ids:
                pipe.exists(self.keys.session_deleted(i))
                pipe.exists(self.keys.session(i))
            replies = await pipe.execute()
        return {i for n, i in enumerate(session_ids) if replies[2 * n] and not replies[2 * n + 1]}

    async def existing(self, session_ids: Sequence[str]) -> set[str]:
        """Which of ``session_ids`` have a record now."""
        if not session_ids:
            return set()
        async with self._redis.pipeline(transaction=False) as pipe:
            for i in session_ids:
                pipe.exists(self.keys.session(i))
            replies = await pipe.execute()
        return {i for i, there in zip(session_ids, replies, strict=True) if there}

    async def get_env(self, session_id: str) -> dict[str, str]:
        """The desktop's environment, kept apart from the record so no listing shows it."""
        raw = await self._redis.get(self.keys.session_env(session_id))
        return {} if raw is None else _decode_env(raw)

    async def create(
        self, record: SessionRecord, env: dict[str, str] | None = None, *, quota: int = 0
    ) -> tuple[bool, SessionRecord]:
        """Store a new record (and its env) and emit ``session.<state>``; if one exists, return it.
        ``quota``: the most sessions its tenant may hold (0: no limit); raises QuotaExceeded."""
        event = state_event(record, None, {})
        ok, payload = await self._write(
            record.id, record.sandbox, record.tenant, -1, record, event, env=env, quota=quota
        )
        if ok:
            return True, record
        assert payload
        return False, _decode_record(payload)

    async def place(
        self,
        record: SessionRecord,
        env: dict[str, str] | None,
        sandboxes: Sequence[tuple[str, int]],
        *,
        prefer_warm: bool,
        quota: int = 0,
        low_disk: Collection[str] = (),
        aliased: bool = False,
    ) -> Placed:
        """Place ``record`` (its sandbox field is ignored) on the sandbox the placement rule
        chooses among ``sandboxes`` (id, cap), and store it there. With ``prefer_warm``, a
        sandbox with a warm desktop wins and the session takes that desktop's id, born ready.
        Those in ``low_disk`` (below their free-disk watermark, as their heartbeats said) are
        never chosen. An existing record with the same id is returned as is; with ``aliased``
        (the id is derived: an Idempotency-Key's, a command's), so is the warm session an
        earlier create with that id became. Raises NoCapacity, NoSandbox, or QuotaExceeded when
        the record's tenant holds ``quota`` sessions (0: no limit)."""
        why = "full"
        reservations = self.reservations
        for attempt in range(PLACE_TRIES):
            warm = prefer_warm and attempt < PLACE_TRIES // 2
            fleet = await reservations.read_fleet(
                record.id,
                record.tenant,
                sandboxes,
                warm=warm,
                flavor=record.spec.flavor,
                low_disk=low_disk,
                aliased=aliased,
            )
            if fleet.existing is not None:
                return Placed(False, fleet.existing, warm=False)
            if quota > 0 and fleet.tenant_sessions >= quota:  # said before any capacity problem
                raise QuotaExceeded(record.tenant, quota)
            if not fleet.candidates:
                raise NoSandbox(_NO_SANDBOX)
            chosen = choose(fleet.candidates, prefer_warm=warm)
            if chosen is None:
                raise NoCapacity(_NO_ROOM if any(c.low_disk for c in fleet.candidates) else _NO_CAPACITY)
            outcome = await reservations.reserve(
                record, env, chosen, fleet.warm_heads.get(chosen.id), quota, aliased=aliased
            )
            if isinstance(outcome, Placed):
                return outcome
            if outcome == "quota":
                raise QuotaExceeded(record.tenant, quota)
            why = outcome
        raise NoSandbox(_NO_SANDBOX) if why in ("gone", "draining") else NoCapacity(_NO_CAPACITY)

    async def transition(
        self,
        session_id: str,
        target: SessionState,
        *,
        generation: int | None = None,
        mutate: Mutation | None = None,
        event_data: dict[str, Any] | None = None,
        fence: str | None = None,
        tenant: str | None = None,
    ) -> SessionRecord:
        """Move a session to ``target`` if the state machine allows it from its current state.

        ``generation``: refuse (StaleGeneration) unless the record is at this generation.
        ``mutate``: further field changes, computed from the current record.
        ``fence``: a lease token; refuse (LeaseLost) unless the session's lock still holds it.
        ``tenant``: the caller's tenant (None: any); another tenant's session is SessionNotFound,
        checked on the very read the compare-and-set is made against.
        Raises SessionNotFound, StaleGeneration, LeaseLost or states.TransitionError; never
        applies a refused transition.
        """
        for _ in range(20):
            current = await self.get(session_id, tenant=tenant)
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
            event = state_event(new, current.state, data)
            body = None if target is SessionState.DELETED else new
            ok, _ = await self._write(
                session_id, current.sandbox, current.tenant, current.revision, body, event, fence=fence
            )
            if ok:
                return new
        raise ConcurrentUpdate(f"session {session_id!r} kept changing; gave up after 20 tries")

    async def fail(
        self, session_id: str, generation: int | None, code: str, message: str, *, fence: str | None = None
    ) -> SessionRecord:
        # Messages may quote Docker at length: the record and its event stay small.
        error = SessionError(code=code, message=message if len(message) <= 2000 else message[:1997] + "...")
        return await self.transition(
            session_id, SessionState.FAILED, generation=generation, mutate=lambda _: {"error": error}, fence=fence
        )

    async def _write(
        self,
        session_id: str,
        sandbox: str,
        tenant: str,
        expected_revision: int,
        record: SessionRecord | None,
        event: bytes,
        env: dict[str, str] | None = None,
        fence: str | None = None,
        quota: int = 0,
    ) -> tuple[bool, bytes | None]:
        keys = self.keys
        reply = await self._cas(
            keys=[
                keys.session(session_id),
                keys.session_index,
                keys.firehose,
                keys.session_events(session_id),
                keys.placed(sandbox),
                keys.session_deleted(session_id),
                keys.lock(session_id),
                keys.tenant_sessions(tenant),
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
                self.tombstone_ttl_s,
                fence or "",
                keys.session_env(session_id),
                quota,
            ],
        )
        if int(reply[0]) == 2:
            raise LeaseLost(session_id, "the lock holds another token (the store refused the write)")
        if int(reply[0]) == 3:
            raise QuotaExceeded(tenant, quota)
        ok = int(reply[0]) == 1
        return ok, (reply[1] or None) if not ok else None


def _decode_listed(session_id: str, raw: bytes) -> SessionRecord | None:
    """One listed record, or None (logged) when it does not decode: one bad record must not
    fail a whole listing, health pass or reconcile pass."""
    try:
        return _decode_record(raw)
    except msgspec.DecodeError as e:
        log.warning("session record %s does not decode (%s): skipped", session_id, e)
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


__all__ = [
    "ConcurrentUpdate",
    "Placed",
    "QuotaExceeded",
    "SessionNotFound",
    "SessionStore",
    "StaleGeneration",
]
