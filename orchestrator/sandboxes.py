"""The sandbox protocol: heartbeats, liveness, drain and loss, in one place.

Both sides call this and nothing else touches these keys:
- a sandbox's worker ``beat``s (info key kept a day, alive key expiring after its
  ``lost_after_s`` by Redis's clock), asks for and reads its drain request;
- the API ``list``s sandboxes with their status, asks a sandbox to drain or undrain, and its
  monitor ``declare_lost`` a silent one (once per outage).

Status, as a reader sees it (``SandboxStatus``)::

    available --drain requested--> draining --worker finished--> drained
        ^                              |                            |
        +----------- undrain ----------+---------- undrain ---------+
    any live status --alive key expired (no beat for lost_after_s)--> unavailable
    unavailable --a beat--> what the worker reports (the lost mark is cleared)
    unavailable or drained --retire (an operator)--> retired: listed nowhere, beats refused

A drained worker deletes its alive key itself (it said goodbye: not lost, its sessions are
not failed); an unavailable one just went silent. A retired one is gone for good: the
operator said it will not return (its sessions are ended by the API, orchestrator/service.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis

from .keys import Keys
from .schemas import DrainRequest, SandboxInfo, now_rfc3339
from .states import SandboxStatus

# A sandbox's info key outlives its heartbeats by a day, so a silent sandbox is listed (as
# unavailable) rather than forgotten at once.
SANDBOX_INFO_TTL_S = 86400

log = logging.getLogger("orchestrator.sandboxes")

# A beat is refused for a retired sandbox, in the same script as its writes: a worker that
# comes back after its sandbox was retired cannot list it again, whatever the interleaving.
# KEYS: retired, alive. ARGV: ts, px. Returns 1 when written, 0 when retired.
MARK_ALIVE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""
# Each beat also keeps a drain request as long as the info key (L6): one left by a sandbox
# that never returns goes with its listing a day later.
# KEYS: retired, info, index, alive, lost, drain. ARGV: info json, info ttl, id, drained ('1' or '').
BEAT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('EXPIRE', KEYS[6], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
if ARGV[4] == '1' then redis.call('DEL', KEYS[4]) else redis.call('DEL', KEYS[5]) end
return 1
"""
# Retire: refused while the sandbox beats (alive key present: available or draining);
# otherwise the marker is set and every sandbox key but the placed set goes (the placed set
# empties as the API deletes its sessions, then goes too: ``forget_placed``). Idempotent, so
# a retire interrupted half-way is finished by asking again.
# KEYS: retired, alive, info, index, drain, lost, pool, queue, graphical pool. ARGV: ts, id.
# Returns 1 when retired (now or before), 0 when the sandbox is live.
RETIRE_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9])
redis.call('SREM', KEYS[4], ARGV[2])
return 1
"""

_decode_info = msgspec.json.Decoder(SandboxInfo).decode
_decode_drain = msgspec.json.Decoder(DrainRequest).decode


class SandboxRegistry:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self.keys = keys
        self._mark_alive = redis.register_script(MARK_ALIVE_LUA)
        self._beat = redis.register_script(BEAT_LUA)
        self._retire = redis.register_script(RETIRE_LUA)

    # -- the worker's side ------------------------------------------------------------------

    async def mark_alive(self, sandbox_id: str, lost_after_s: float) -> bool:
        """The liveness half of a beat, set before anything slow: "unavailable" is this key's
        absence. False (nothing written) when the sandbox is retired."""
        k = self.keys
        reply = await self._mark_alive(
            keys=[k.sandbox_retired(sandbox_id), k.sandbox_alive(sandbox_id)],
            args=[now_rfc3339(), int(lost_after_s * 1000)],
        )
        return bool(reply)

    async def beat(self, info: SandboxInfo) -> bool:
        """Store ``info`` (listed for a day). A drained sandbox withdraws its alive key (it left
        on purpose); any other beat clears the lost mark, so a later silence is a new outage.
        Call ``mark_alive`` first unless drained. False (nothing written) when retired."""
        k, sid = self.keys, info.id
        reply = await self._beat(
            keys=[
                k.sandbox_retired(sid),
                k.sandbox(sid),
                k.sandbox_index,
                k.sandbox_alive(sid),
                k.sandbox_lost(sid),
                k.sandbox_drain(sid),
            ],
            args=[
                msgspec.json.encode(info),
                SANDBOX_INFO_TTL_S,
                sid,
                "1" if info.status is SandboxStatus.DRAINED else "",
            ],
        )
        return bool(reply)

    async def is_retired(self, sandbox_id: str) -> bool:
        return bool(await self._redis.exists(self.keys.sandbox_retired(sandbox_id)))

    async def drain_request(self, sandbox_id: str) -> DrainRequest | None:
        raw = await self._redis.get(self.keys.sandbox_drain(sandbox_id))
        if raw is None:
            return None
        try:
            return _decode_drain(raw)
        except msgspec.DecodeError:
            return DrainRequest()  # unreadable (an older or newer writer): still a drain

    # -- both sides ---------------------------------------------------------------------------

    async def request_drain(self, sandbox_id: str, request: DrainRequest) -> bool:
        """Placement skips the sandbox from now on; its worker picks the request up. A request
        already there is kept (the first asker's ``by`` and ``stop_desktops`` win). It expires
        with the info key unless a beat renews it (BEAT_LUA), so none outlives its sandbox."""
        key, value = self.keys.sandbox_drain(sandbox_id), msgspec.json.encode(request)
        written = await self._redis.set(key, value, nx=True, ex=SANDBOX_INFO_TTL_S)
        return bool(written)

    async def clear_drain(self, sandbox_id: str) -> None:
        await self._redis.delete(self.keys.sandbox_drain(sandbox_id))

    # -- the API's side -----------------------------------------------------------------------

    async def list(self) -> list[SandboxInfo]:
        """Every sandbox that has reported in the last day, with its status as of now:
        ``unavailable`` once its alive key has expired (no clocks are compared), ``draining``
        while a drain is asked for, and ``placed`` (what its cap counts) from the placed set."""
        ids = sorted(_text(i) for i in await self._redis.smembers(self.keys.sandbox_index))  # type: ignore[misc]
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for i in ids:
                self._read(pipe, i)
            replies = await pipe.execute()
        out, gone = [], []
        for n, i in enumerate(ids):
            present, info = self._info(i, replies[4 * n : 4 * n + 4])
            if not present:
                gone.append(i)
            elif info is not None:
                out.append(info)
        if gone:  # silent for a day (the info key's expiry): forgotten
            await self._redis.srem(self.keys.sandbox_index, *gone)  # type: ignore[misc]
        return out

    async def get(self, sandbox_id: str) -> SandboxInfo | None:
        """One sandbox, as ``list`` shows it (one round trip, whatever the fleet's size)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            self._read(pipe, sandbox_id)
            replies = await pipe.execute()
        return self._info(sandbox_id, replies)[1]

    def _read(self, pipe: Any, sandbox_id: str) -> None:
        k = self.keys
        pipe.get(k.sandbox(sandbox_id))
        pipe.exists(k.sandbox_alive(sandbox_id))
        pipe.exists(k.sandbox_drain(sandbox_id))
        pipe.scard(k.placed(sandbox_id))

    @staticmethod
    def _info(sandbox_id: str, replies: Sequence[Any]) -> tuple[bool, SandboxInfo | None]:
        """A sandbox from ``_read``'s four replies: whether its info is there, and the info
        (None when it does not decode: logged, as one bad heartbeat must not hide the fleet)."""
        raw, alive, draining, placed = replies
        if raw is None:
            return False, None
        try:
            info = _decode_info(raw)
        except msgspec.DecodeError as e:
            log.warning("sandbox %s's heartbeat does not decode (%s): skipped", sandbox_id, e)
            return True, None
        return True, msgspec.structs.replace(
            info, status=_status(info.status, bool(alive), bool(draining)), placed=int(placed)
        )

    async def known(self, sandbox_id: str) -> bool:
        """Whether anything of the sandbox is left: its info (a day after its last beat), its
        placed set or its retired marker."""
        k = self.keys
        found = await self._redis.exists(k.sandbox(sandbox_id), k.placed(sandbox_id), k.sandbox_retired(sandbox_id))
        return bool(found)

    async def retire(self, sandbox_id: str) -> bool:
        """Mark the sandbox retired and drop its keys (RETIRE_LUA); False while it is live."""
        k, sid = self.keys, sandbox_id
        reply = await self._retire(
            keys=[
                k.sandbox_retired(sid),
                k.sandbox_alive(sid),
                k.sandbox(sid),
                k.sandbox_index,
                k.sandbox_drain(sid),
                k.sandbox_lost(sid),
                k.pool(sid),
                k.queue(sid),
                k.pool(sid, "graphical"),
            ],
            args=[now_rfc3339(), sid],
        )
        return bool(reply)

    async def forget_placed(self, sandbox_id: str) -> None:
        """After a retire has ended its sessions: ids whose records are gone may be left."""
        await self._redis.delete(self.keys.placed(sandbox_id))

    async def declare_lost(self, sandbox_id: str, last_heartbeat: str) -> bool:
        """Mark a silent sandbox lost; True for the one caller (of every API process) that did
        it first in this outage, which announces it."""
        # Expires with the info key: a sandbox that never returns leaves nothing behind (L6).
        key = self.keys.sandbox_lost(sandbox_id)
        return bool(await self._redis.set(key, last_heartbeat, nx=True, ex=SANDBOX_INFO_TTL_S))


def _status(reported: SandboxStatus, alive: bool, draining: bool) -> SandboxStatus:
    if reported is SandboxStatus.DRAINED:
        return reported
    if not alive:
        return SandboxStatus.UNAVAILABLE
    return SandboxStatus.DRAINING if draining else reported


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
