"""Placement's Redis side: the one read it decides on, and the reservation of its choice.

The store's ``place`` loops over these: read the fleet (one transaction), choose
(placement.choose, pure), reserve (RESERVE_LUA, which re-checks the choice), and read again
when the sandbox changed in between."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import msgspec
import redis.asyncio as aioredis

from .events import EventBus, state_event
from .placement import Candidate
from .schemas import Flavor, SessionRecord
from .states import SessionState

# Placement reserves the sandbox that placement.choose picked from a read a moment ago, if
# that sandbox still qualifies: alive, not draining, under its cap and, for a warm claim,
# with that desktop still first in its pool (the pool of the record's flavor: Keys.pool).
# The re-check and the writes (the place, the record, its env and its event) are one script,
# so concurrent creates never exceed a cap, two never share a warm desktop, and no record
# exists without its place (or the reverse).
# KEYS: 1 the requested id's record, 2 the record to store (1 unless warm), 3 session index,
#   4 placed set, 5 alive, 6 drain, 7 the flavor's pool, 8 firehose, 9 the session's stream, 10 its
#   tombstone (a new record drops it), 11 its tenant's session set, 12 the requested id's
#   alias (keys.session_alias).
# ARGV: 1 session id, 2 cap, 3 the warm desktop's id ('' cold), 4 record, 5 event,
#   6 env json ('' none), 7 firehose maxlen, 8 session maxlen, 9 its env key (an argument,
#   not one of KEYS, for the API's write-only access: see store.CAS_LUA), 10 the tenant's quota
#   (0: none), 11 the record key's prefix (for an alias's record), 12 the alias's TTL in
#   seconds ('' none: the requested id is no derived one, nobody asks for it again).
# Returns {1, entry id}; {0, existing record} when the requested id exists; {3, ''} when the
#   tenant is at its quota; {2, why} when the sandbox no longer qualifies: 'gone', 'draining',
#   'full' or 'claimed' (the desktop is taken). A claimed warm desktop becomes the claimer's
#   tenant's session: the record stored here is the claimer's, with its tenant.
RESERVE_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur} end
local aliased = redis.call('GET', KEYS[12])
if aliased then
  cur = redis.call('GET', ARGV[11] .. aliased)
  if cur then return {0, cur} end
end
local quota = tonumber(ARGV[10])
if quota > 0 and redis.call('SCARD', KEYS[11]) >= quota then return {3, ''} end
if redis.call('EXISTS', KEYS[5]) == 0 then return {2, 'gone'} end
if redis.call('EXISTS', KEYS[6]) == 1 then return {2, 'draining'} end
if redis.call('SCARD', KEYS[4]) >= tonumber(ARGV[2]) then return {2, 'full'} end
if ARGV[3] ~= '' then
  if redis.call('LINDEX', KEYS[7], 0) ~= ARGV[3] then return {2, 'claimed'} end
  redis.call('LPOP', KEYS[7])
end
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('SET', KEYS[2], ARGV[4])
redis.call('DEL', KEYS[10])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[11], ARGV[1])
if ARGV[3] ~= '' and ARGV[12] ~= '' then redis.call('SET', KEYS[12], ARGV[3], 'EX', ARGV[12]) end
if ARGV[6] ~= '' then redis.call('SET', ARGV[9], ARGV[6]) end
local entry = redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[7], '*', 'event', ARGV[5])
redis.call('XADD', KEYS[9], 'MAXLEN', '~', ARGV[8], entry, 'event', ARGV[5])
return {1, entry}
"""

# How long a derived id that claimed a warm desktop leads to it (Idempotency-Keys and command
# request ids are retried within minutes; the record itself may live longer).
ALIAS_TTL_S = 86_400

# Why a reservation did not happen: the sandbox changed since the read ('gone', 'draining',
# 'full', 'claimed': RESERVE_LUA's {2, why}) or the tenant is at its quota ({3, ''}).
Refusal = Literal["gone", "draining", "full", "claimed", "quota"]

_encode = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(SessionRecord).decode


@dataclass(frozen=True)
class Placed:
    created: bool
    record: SessionRecord
    # A warm desktop was claimed: the session is born ready and needs no create job.
    warm: bool


@dataclass(frozen=True)
class Fleet:
    """What a placement read found: the requested id's record if it exists, and the
    sandboxes that are alive and not draining, with the first of each one's warm pool."""

    existing: SessionRecord | None
    candidates: list[Candidate]
    warm_heads: dict[str, str]
    # How many sessions the record's tenant holds (what its quota counts).
    tenant_sessions: int = 0


class Reservations:
    def __init__(self, redis: aioredis.Redis, bus: EventBus) -> None:
        self._redis = redis
        self.bus = bus
        self.keys = bus.keys
        self._script = redis.register_script(RESERVE_LUA)

    async def read_fleet(
        self,
        session_id: str,
        tenant: str,
        sandboxes: Sequence[tuple[str, int]],
        *,
        warm: bool,
        flavor: Flavor = "minimal",
        low_disk: Collection[str] = (),
        aliased: bool = False,
    ) -> Fleet:
        """What placement decides on, in one round trip. A transaction, so that it is one
        moment's view: "the id is free" and "every sandbox is full" are never from two.
        ``warm``: read the head of each sandbox's pool of ``flavor`` too.
        ``aliased``: the id is a derived one, which may have become a warm desktop's."""
        k = self.keys
        if aliased and (became := await self._redis.get(k.session_alias(session_id))) is not None:
            found = await self._redis.get(k.session(_text(became)))
            if found is not None:
                return Fleet(_decode_record(found), [], {})
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(k.session(session_id))
            pipe.scard(k.tenant_sessions(tenant))
            for sandbox, _cap in sandboxes:
                pipe.exists(k.sandbox_alive(sandbox))
                pipe.exists(k.sandbox_drain(sandbox))
                pipe.scard(k.placed(sandbox))
                if warm:
                    pipe.lindex(k.pool(sandbox, flavor), 0)
            existing, tenant_sessions, *replies = await pipe.execute()
        width = 4 if warm else 3
        candidates, heads = [], {}
        for n, (sandbox, cap) in enumerate(sandboxes):
            alive, draining, placed, *head = replies[n * width : (n + 1) * width]
            if not alive or draining:
                continue
            if head and head[0] is not None:
                heads[sandbox] = _text(head[0])
            candidates.append(Candidate(sandbox, int(placed), cap, warm=sandbox in heads, low_disk=sandbox in low_disk))
        record = None if existing is None else _decode_record(existing)
        return Fleet(record, candidates, heads, int(tenant_sessions))

    async def reserve(
        self,
        record: SessionRecord,
        env: dict[str, str] | None,
        chosen: Candidate,
        warm_id: str | None,
        quota: int,
        *,
        aliased: bool = False,
    ) -> Placed | Refusal:
        """Store ``record`` on ``chosen`` (as the warm desktop ``warm_id``, born ready, when
        given) if it still qualifies (RESERVE_LUA). Returns the placement, or why not.
        ``aliased``: ``record.id`` is a derived id: a warm claim leaves its alias."""
        if warm_id is None:
            new, data = msgspec.structs.replace(record, sandbox=chosen.id), {}
        else:
            new = msgspec.structs.replace(record, id=warm_id, sandbox=chosen.id, state=SessionState.READY)
            data = {"warm": True}
        k, sandbox, session = self.keys, chosen.id, new.id
        reply = await self._script(
            keys=[
                k.session(record.id),
                k.session(session),
                k.session_index,
                k.placed(sandbox),
                k.sandbox_alive(sandbox),
                k.sandbox_drain(sandbox),
                k.pool(sandbox, record.spec.flavor),
                k.firehose,
                k.session_events(session),
                k.session_deleted(session),
                k.tenant_sessions(new.tenant),
                k.session_alias(record.id),
            ],
            args=[
                session,
                chosen.cap,
                warm_id or "",
                _encode(new),
                state_event(new, None, data),
                _encode(env) if env and warm_id is None else b"",
                self.bus.firehose_maxlen,
                self.bus.session_maxlen,
                k.session_env(session),
                quota,
                k.session(""),
                ALIAS_TTL_S if aliased else "",
            ],
        )
        if int(reply[0]) == 3:
            return "quota"
        if int(reply[0]) == 0:
            return Placed(False, _decode_record(reply[1]), warm=False)
        if int(reply[0]) == 2:
            return cast(Refusal, _text(reply[1]))
        return Placed(True, new, warm=warm_id is not None)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
