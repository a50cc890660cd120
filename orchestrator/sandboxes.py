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

A drained worker deletes its alive key itself (it said goodbye: not lost, its sessions are
not failed); an unavailable one just went silent.
"""

from __future__ import annotations

import logging

import msgspec
import redis.asyncio as aioredis

from .keys import Keys
from .schemas import DrainRequest, SandboxInfo, now_rfc3339
from .states import SandboxStatus

# A sandbox's info key outlives its heartbeats by a day, so a silent sandbox is listed (as
# unavailable) rather than forgotten at once.
SANDBOX_INFO_TTL_S = 86400

log = logging.getLogger("orchestrator.sandboxes")
_decode_info = msgspec.json.Decoder(SandboxInfo).decode
_decode_drain = msgspec.json.Decoder(DrainRequest).decode


class SandboxRegistry:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self.keys = keys

    # -- the worker's side ------------------------------------------------------------------

    async def mark_alive(self, sandbox_id: str, lost_after_s: float) -> None:
        """The liveness half of a beat, set before anything slow: "unavailable" is this key's absence."""
        await self._redis.set(self.keys.sandbox_alive(sandbox_id), now_rfc3339(), px=int(lost_after_s * 1000))

    async def beat(self, info: SandboxInfo) -> None:
        """Store ``info`` (listed for a day). A drained sandbox withdraws its alive key (it left
        on purpose); any other beat clears the lost mark, so a later silence is a new outage.
        Call ``mark_alive`` first unless drained."""
        k = self.keys
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(k.sandbox(info.id), msgspec.json.encode(info), ex=SANDBOX_INFO_TTL_S)
            pipe.sadd(k.sandbox_index, info.id)
            if info.status is SandboxStatus.DRAINED:
                pipe.delete(k.sandbox_alive(info.id))
            else:
                pipe.delete(k.sandbox_lost(info.id))
            await pipe.execute()

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
        already there is kept (the first asker's ``by`` and ``stop_desktops`` win)."""
        written = await self._redis.set(self.keys.sandbox_drain(sandbox_id), msgspec.json.encode(request), nx=True)
        return bool(written)

    async def clear_drain(self, sandbox_id: str) -> None:
        await self._redis.delete(self.keys.sandbox_drain(sandbox_id))

    # -- the API's side -----------------------------------------------------------------------

    async def list(self) -> list[SandboxInfo]:
        """Every sandbox that has reported in the last day, with its status as of now:
        ``unavailable`` once its alive key has expired (no clocks are compared), ``draining``
        while a drain is asked for, and ``placed`` (what its cap counts) from the placed set."""
        k = self.keys
        ids = sorted(_text(i) for i in await self._redis.smembers(k.sandbox_index))  # type: ignore[misc]
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.get(k.sandbox(i))
                pipe.exists(k.sandbox_alive(i))
                pipe.exists(k.sandbox_drain(i))
                pipe.scard(k.placed(i))
            replies = await pipe.execute()
        out, gone = [], []
        for n, i in enumerate(ids):
            raw, alive, draining, placed = replies[4 * n : 4 * n + 4]
            if raw is None:
                gone.append(i)
                continue
            try:
                info = _decode_info(raw)
            except msgspec.DecodeError as e:  # one bad heartbeat must not hide the fleet
                log.warning("sandbox %s's heartbeat does not decode (%s): skipped", i, e)
                continue
            out.append(
                msgspec.structs.replace(
                    info, status=_status(info.status, bool(alive), bool(draining)), placed=int(placed)
                )
            )
        if gone:  # silent for a day (the info key's expiry): forgotten
            await self._redis.srem(k.sandbox_index, *gone)  # type: ignore[misc]
        return out

    async def get(self, sandbox_id: str) -> SandboxInfo | None:
        return next((s for s in await self.list() if s.id == sandbox_id), None)

    async def declare_lost(self, sandbox_id: str, last_heartbeat: str) -> bool:
        """Mark a silent sandbox lost; True for the one caller (of every API process) that did
        it first in this outage, which announces it."""
        return bool(await self._redis.set(self.keys.sandbox_lost(sandbox_id), last_heartbeat, nx=True))


def _status(reported: SandboxStatus, alive: bool, draining: bool) -> SandboxStatus:
    if reported is SandboxStatus.DRAINED:
        return reported
    if not alive:
        return SandboxStatus.UNAVAILABLE
    return SandboxStatus.DRAINING if draining else reported


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
