"""The machine's uid range ledger (workers/uid_ranges.py) on a real Redis: two sandboxes of one
machine never get one slot, a retried claim gets its slot back, a release frees only its own,
slots a volume already holds are never handed out, and the sweep releases only its sandbox's
stale claims (after the grace, never another sandbox's)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from orchestrator.keys import Keys
from tests.conftest import awaited
from workers.privilege import PROBE_SLOT
from workers.uid_ranges import LocalSlots, RedisSlotLedger, machine_id

MACHINE = "00000000-test-machine"


@pytest.fixture
async def redis_keys(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, Keys]]:
    prefix = f"uid-{uuid.uuid4().hex[:12]}:"
    redis = aioredis.Redis.from_url(redis_url)
    try:
        yield redis, Keys(prefix)
    finally:
        stale = [key async for key in redis.scan_iter(match=f"{prefix}*")]
        if stale:
            await redis.delete(*stale)
        await redis.aclose()


def listing(volumes: dict[str, int]) -> Callable[[], Awaitable[dict[str, int]]]:
    async def list_volumes() -> dict[str, int]:
        return volumes

    return list_volumes


def ledger(rk: tuple[aioredis.Redis, Keys], sandbox: str, machine: str = MACHINE) -> RedisSlotLedger:
    return RedisSlotLedger(rk[0], rk[1], sandbox_id=sandbox, machine=machine)


async def test_two_sandboxes_of_one_machine_never_share_a_slot(redis_keys: tuple[aioredis.Redis, Keys]) -> None:
    a, b = ledger(redis_keys, "sb-a"), ledger(redis_keys, "sb-b")
    # Each sandbox alone would pick slot 0 for its first volume (LocalSlots does).
    assert await LocalSlots().claim("s1", {}) == 0
    claims = await asyncio.gather(*(x.claim(f"s{i}-{x.sandbox_id}", {}) for i in range(20) for x in (a, b)))
    assert sorted(claims) == list(range(40))
    # Another machine has a ledger of its own.
    assert await ledger(redis_keys, "sb-c", machine="another-boot-id").claim("s-c", {}) == 0


async def test_a_retried_claim_gets_its_slot_back_and_release_frees_it(
    redis_keys: tuple[aioredis.Redis, Keys],
) -> None:
    a, b = ledger(redis_keys, "sb-a"), ledger(redis_keys, "sb-b")
    first = await a.claim("s1", {})
    assert await a.claim("s1", {}) == first  # the worker died after claiming: same slot
    assert await b.claim("s2", {}) != first
    await a.release("s1")
    await a.release("s1")  # idempotent
    assert await b.claim("s3", {}) == first


async def test_slots_the_sandbox_volumes_hold_are_never_handed_out(
    redis_keys: tuple[aioredis.Redis, Keys],
) -> None:
    # Redis lost its data while volumes of slots 0 and 2 exist: a new claim skips them...
    a, b = ledger(redis_keys, "sb-a"), ledger(redis_keys, "sb-b")
    assert await a.claim("new", {"old0": 0, "old2": 2}) == 1
    # ...and the sweep records them, so that another sandbox skips them too.
    assert await a.sweep(listing({"old0": 0, "old2": 2, "new": 1}), now=time.time(), grace_s=300) == []
    assert await b.claim("other", {}) == 3
    # A volume whose slot another session holds (made before the ledger): reported, both kept.
    assert await b.record({"legacy": 0}) == (["legacy"], [])
    assert await b.claim("after", {"legacy": 0}) == 4


async def test_a_volume_deleted_while_the_sweep_records_leaves_no_entry(
    redis_keys: tuple[aioredis.Redis, Keys],
) -> None:
    # The sweep's listing still shows a volume its delete removed (and released) meanwhile.
    a = ledger(redis_keys, "sb-a")
    listings = iter([{"gone": 5, "kept": 6}, {"kept": 6}])

    async def volumes() -> dict[str, int]:
        return next(listings)

    await a.sweep(volumes, now=time.time(), grace_s=300)
    redis, keys = redis_keys
    held = await awaited(redis.hgetall(keys.userns_slots(MACHINE)))
    assert sorted(v.decode().split(" ")[0] for v in held.values()) == ["kept"]


async def test_release_never_frees_a_slot_another_session_holds(redis_keys: tuple[aioredis.Redis, Keys]) -> None:
    redis, keys = redis_keys
    a = ledger(redis_keys, "sb-a")
    slot = await a.claim("s1", {})
    # The ledger says s1's slot is someone else's (a lost Redis, rebuilt by another sandbox).
    theirs = f"s9 sb-b {int(time.time())}"
    await awaited(redis.hset(keys.userns_slots(MACHINE), str(slot), theirs))
    await a.release("s1")
    assert await awaited(redis.hget(keys.userns_slots(MACHINE), str(slot))) == theirs.encode()  # type: ignore[comparison-overlap]


async def test_the_sweep_releases_only_its_own_stale_claims(redis_keys: tuple[aioredis.Redis, Keys]) -> None:
    redis, keys = redis_keys
    a, b = ledger(redis_keys, "sb-a"), ledger(redis_keys, "sb-b")
    kept = await a.claim("has-volume", {})
    orphan = await a.claim("no-volume", {})  # the worker died before making the volume
    young = await a.claim("making", {})  # being made now
    theirs = await b.claim("b-session", {})
    # Age the first three claims past the grace.
    slots = keys.userns_slots(MACHINE)
    old = int(time.time()) - 600
    for session, slot in (("has-volume", kept), ("no-volume", orphan), ("b-session", theirs)):
        sandbox = "sb-b" if session == "b-session" else "sb-a"
        await awaited(redis.hset(slots, str(slot), f"{session} {sandbox} {old}"))
    released = await a.sweep(listing({"has-volume": kept}), now=time.time(), grace_s=300)
    assert released == ["no-volume"]
    held = {k.decode(): v.decode().split(" ")[0] for k, v in (await awaited(redis.hgetall(slots))).items()}
    assert held == {str(kept): "has-volume", str(young): "making", str(theirs): "b-session"}
    # The released slot is the next one given.
    assert await b.claim("next", {}) == orphan


async def test_the_probe_slot_is_never_claimed(redis_keys: tuple[aioredis.Redis, Keys]) -> None:
    a = ledger(redis_keys, "sb-a")
    held = {f"v{i}": i for i in range(PROBE_SLOT)}
    with pytest.raises(ValueError, match="every uid range"):
        await a.claim("one-too-many", held)


def test_the_machine_id_is_the_kernels_boot_id(tmp_path: Path) -> None:
    boot = Path("/proc/sys/kernel/random/boot_id")
    assert machine_id() == boot.read_text().strip()
    bad = tmp_path / "boot_id"
    bad.write_text("../../etc\n")
    with pytest.raises(ValueError, match="unexpected boot id"):
        machine_id(str(bad))
