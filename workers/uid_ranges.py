"""Which uid range (slot) each userns desktop's volume holds, unique per machine.

A userns desktop's uid 0 is uid ``slot_base(slot)`` of its sandbox, and a sandbox that is not
itself in a user namespace (compose and Kubernetes as shipped) shares its uids with the
machine: two sandboxes of one machine must never hand out the same slot, or two desktops
would be the same unprivileged user of the kernel (its rlimits, keyrings and file ownership).
Slots are therefore claimed in a ledger per machine, a Redis hash keyed by the kernel's boot
id, which every container of one kernel reads the same.

The volume's label stays the record a desktop is started from; the ledger only decides which
slot a new volume gets. A claim comes before the volume exists, so a claim without a volume is
normal for a moment: the sweep releases one only after the orphan grace, and only for its own
sandbox's entries, against its own daemon's listing (positive evidence)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import redis.asyncio as aioredis

from orchestrator.keys import Keys

from .privilege import PROBE_SLOT, free_slot

log = logging.getLogger("workers.uid_ranges")

BOOT_ID = "/proc/sys/kernel/random/boot_id"


def machine_id(path: str = BOOT_ID) -> str:
    """The kernel's boot id: the same in every container of one machine (not namespaced)."""
    with open(path, encoding="ascii") as f:
        value = f.read().strip()
    if not value or not all(c.isalnum() or c == "-" for c in value):
        raise ValueError(f"unexpected boot id {value!r} in {path}")
    return value


class SlotLedger(Protocol):
    async def claim(self, session_id: str, local: Mapping[str, int]) -> int:
        """The slot for the session's new volume. ``local``: session -> slot of the volumes
        this sandbox holds (never handed out, whatever the ledger says)."""
        ...

    async def release(self, session_id: str) -> None:
        """The session's volume is gone: its slot may be given again."""
        ...


class LocalSlots:
    """No ledger (a runtime without Redis: the probe, benchmarks, unit tests): the lowest slot
    the sandbox's own volumes leave free, unique within the sandbox only."""

    async def claim(self, session_id: str, local: Mapping[str, int]) -> int:
        return free_slot(s for n, s in local.items() if n != session_id)

    async def release(self, session_id: str) -> None:
        return None


# KEYS[1] slots (slot -> "session sandbox claimed_at"), KEYS[2] owners (session -> slot).
# ARGV: session, owner value, number of slots, then slots to skip (the sandbox's own volumes',
# which a ledger that lost its data may not list). The same session claims once: a retried
# create gets its first slot back.
_CLAIM_LUA = """
local have = redis.call('HGET', KEYS[2], ARGV[1])
if have then return tonumber(have) end
local skip = {}
for i = 4, #ARGV do skip[ARGV[i]] = true end
for s = 0, tonumber(ARGV[3]) - 1 do
  local k = tostring(s)
  if not skip[k] and redis.call('HSETNX', KEYS[1], k, ARGV[2]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[1], k)
    return s
  end
end
return -1
"""

# Release only what the session holds: a slot given to another session meanwhile is kept.
_RELEASE_LUA = """
local slot = redis.call('HGET', KEYS[2], ARGV[1])
if not slot then return 0 end
local owner = redis.call('HGET', KEYS[1], slot)
if owner and string.sub(owner, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  redis.call('HDEL', KEYS[1], slot)
end
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

# The sweep's release of one entry, only while it still reads as seen (ARGV: slot, value, session).
_DROP_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[2], ARGV[3]) == ARGV[1] then redis.call('HDEL', KEYS[2], ARGV[3]) end
return 1
"""

# Record a slot a volume already holds (after Redis lost its data, or for volumes made before
# the ledger): kept when free, and a conflict reported when another session holds it.
# ARGV: the owner's tail ("sandbox claimed_at"), then session, slot pairs. Returns the
# conflicting sessions, then "+" and the sessions it added.
_ASSERT_LUA = """
local conflicts, added = {}, {}
for i = 2, #ARGV, 2 do
  local session, slot = ARGV[i], ARGV[i + 1]
  local owner = redis.call('HGET', KEYS[1], slot)
  if not owner then
    redis.call('HSET', KEYS[1], slot, session .. ' ' .. ARGV[1])
    redis.call('HSET', KEYS[2], session, slot)
    table.insert(added, session)
  elseif string.sub(owner, 1, #session + 1) ~= session .. ' ' then
    table.insert(conflicts, session)
  end
end
table.insert(conflicts, '+')
for _, session in ipairs(added) do table.insert(conflicts, session) end
return conflicts
"""


class RedisSlotLedger:
    def __init__(self, redis: aioredis.Redis, keys: Keys, *, sandbox_id: str, machine: str) -> None:
        self.sandbox_id = sandbox_id
        self.machine = machine
        self._slots = keys.userns_slots(machine)
        self._owners = keys.userns_owners(machine)
        self._redis = redis
        self._claim = redis.register_script(_CLAIM_LUA)
        self._release = redis.register_script(_RELEASE_LUA)
        self._assert = redis.register_script(_ASSERT_LUA)
        self._drop = redis.register_script(_DROP_LUA)
        self._conflicts_logged: set[str] = set()

    def _owner(self, session_id: str, now: float) -> str:
        return f"{session_id} {self.sandbox_id} {int(now)}"

    async def claim(self, session_id: str, local: Mapping[str, int]) -> int:
        # Never a slot the sandbox's own volumes hold, whatever the ledger says (it is only
        # written here for this session: recording the others is the sweep's, which checks).
        skip = [s for n, s in local.items() if n != session_id]
        keys = [self._slots, self._owners]
        args: list[str | int] = [session_id, self._owner(session_id, time.time()), PROBE_SLOT, *skip]
        slot = int(await self._claim(keys=keys, args=args))
        if slot < 0:
            raise ValueError(f"every uid range of machine {self.machine} is taken")
        return slot

    async def release(self, session_id: str) -> None:
        await self._release(keys=[self._slots, self._owners], args=[session_id])

    async def record(self, held: Mapping[str, int]) -> tuple[list[str], list[str]]:
        """Put the slots the sandbox's volumes hold into the ledger. Returns (the sessions whose
        slot another session of the machine holds, each logged once; the sessions added)."""
        if not held:
            return [], []
        args: list[str | int] = [f"{self.sandbox_id} {int(time.time())}"]
        for session_id, slot in held.items():
            args += [session_id, slot]
        raw = [
            c.decode() if isinstance(c, bytes) else str(c)
            for c in await self._assert(keys=[self._slots, self._owners], args=args)
        ]
        split = raw.index("+")
        conflicts, added = raw[:split], raw[split + 1 :]
        for session_id in conflicts:
            if session_id not in self._conflicts_logged:
                self._conflicts_logged.add(session_id)
                log.warning(
                    "the volume of %s holds uid range slot %s, which another session of this machine holds "
                    "(made before the ledger, or Redis lost its data): both keep it",
                    session_id,
                    held[session_id],
                )
        return conflicts, added

    async def sweep(
        self, volumes: Callable[[], Awaitable[Mapping[str, int]]], *, now: float, grace_s: float
    ) -> list[str]:
        """Record what the sandbox's volumes hold, then release this sandbox's claims that no
        volume of it explains and that are older than the grace. Returns the released ones.
        ``volumes`` lists them (session -> slot); it is read again after recording, so a volume
        deleted meanwhile (its release done before the record) leaves no entry behind."""
        held = await volumes()
        _, added = await self.record(held)
        if added:
            still = await volumes()
            for session_id in added:
                if session_id not in still:
                    await self.release(session_id)
        entries: dict[bytes | str, bytes | str] = await self._redis.hgetall(self._slots)  # type: ignore[misc]
        released = []
        for raw_slot, raw in entries.items():
            slot = raw_slot.decode() if isinstance(raw_slot, bytes) else raw_slot
            owner = raw.decode() if isinstance(raw, bytes) else raw
            parts = owner.split(" ")
            if len(parts) != 3 or parts[1] != self.sandbox_id or parts[0] in held:
                continue
            if not parts[2].isdigit() or now - int(parts[2]) < grace_s:
                continue
            if await self._drop(keys=[self._slots, self._owners], args=[slot, owner, parts[0]]):
                released.append(parts[0])
        if released:
            log.info("released the uid ranges of %d volumes this sandbox no longer has", len(released))
        return released
