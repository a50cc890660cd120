"""Placement on a real Redis server: SessionStore.place chooses by the rule of
orchestrator/placement.py on what Redis holds, and its reservation keeps every cap."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from orchestrator.config import Settings
from orchestrator.events import EventBus
from orchestrator.keys import Keys
from orchestrator.placement import Candidate, NoCapacity, NoSandbox, choose
from orchestrator.records import new_record
from orchestrator.schemas import SessionCreate
from orchestrator.states import SessionState as S
from orchestrator.store import SessionStore
from tests.conftest import awaited


async def fleet(redis: aioredis.Redis, keys: Keys, boxes: list[tuple[str, int, int, bool, bool, int]]) -> None:
    """(id, placed, cap, alive, draining, warm desktops) per sandbox, written as the worker and
    earlier placements would have left them."""
    for box, placed, _cap, alive, draining, warm in boxes:
        await redis.delete(keys.placed(box), keys.sandbox_alive(box), keys.sandbox_drain(box), keys.pool(box))
        if placed:
            await awaited(redis.sadd(keys.placed(box), *(f"{box}-s{i}" for i in range(placed))))
        if alive:
            await redis.set(keys.sandbox_alive(box), "x", px=60_000)
        if draining:
            await redis.set(keys.sandbox_drain(box), '{"by":"api"}')
        if warm:
            await awaited(redis.rpush(keys.pool(box), *(f"w-{box}-{i}" for i in range(warm))))


async def test_placement_chooses_by_the_rule_on_what_redis_holds(redis: aioredis.Redis, settings: Settings) -> None:
    keys = Keys(settings.key_prefix)
    store = SessionStore(redis, EventBus(redis, keys))
    rng = random.Random(8)
    for round_ in range(150):
        boxes = [
            (
                f"b{i}",
                rng.randint(0, 6),
                rng.randint(1, 6),
                rng.random() < 0.8,
                rng.random() < 0.15,
                rng.choice([0, 0, 1]),
            )
            for i in range(rng.randint(1, 5))
        ]
        await fleet(redis, keys, boxes)
        prefer_warm = rng.random() < 0.5
        low = {b[0] for b in boxes if rng.random() < 0.2}  # below their free-disk watermark
        pure = choose(
            [
                Candidate(b, placed, cap, warm=warm > 0, low_disk=b in low)
                for b, placed, cap, alive, draining, warm in boxes
                if alive and not draining
            ],
            prefer_warm,
        )
        record = new_record(SessionCreate(id=f"r{round_}"), "", settings)
        try:
            placed = await store.place(
                record, None, [(b[0], b[2]) for b in boxes], prefer_warm=prefer_warm, low_disk=low
            )
        except (NoCapacity, NoSandbox) as e:
            assert pure is None, f"round {round_}: placement refused ({e}) but the rule picks {pure}"
            usable = [b for b in boxes if b[3] and not b[4]]
            assert isinstance(e, NoCapacity) == bool(usable), f"round {round_}: wrong refusal {e!r}"
            if any(b[0] in low for b in usable):
                assert "low on disk" in str(e)
            continue
        assert placed.record.sandbox not in low, f"round {round_}: placed on {placed.record.sandbox}, low on disk"
        assert pure is not None, f"round {round_}: placement chose {placed.record.sandbox}, the rule refuses"
        assert placed.record.sandbox == pure.id, f"round {round_}: {boxes}, warm={prefer_warm}"
        assert placed.warm == (prefer_warm and pure.warm)
        if placed.warm:
            assert placed.record.id == f"w-{pure.id}-0" and placed.record.state.value == "ready"
        assert await awaited(redis.sismember(keys.placed(pure.id), placed.record.id))
        stored = await store.get(placed.record.id)
        assert stored == placed.record


async def test_concurrent_placements_never_exceed_a_cap(redis: aioredis.Redis, settings: Settings) -> None:
    """120 creates at once on caps 10/20/30: exactly 60 placed, each sandbox exactly full,
    60 refused for capacity, and no record without its place (or the reverse)."""
    keys = Keys(settings.key_prefix)
    store = SessionStore(redis, EventBus(redis, keys))
    caps = {"x": 10, "y": 20, "z": 30}
    await fleet(redis, keys, [(b, 0, cap, True, False, 0) for b, cap in caps.items()])

    async def one(i: int) -> str | None:
        record = new_record(SessionCreate(id=f"c{i:03d}"), "", settings)
        try:
            return (await store.place(record, None, list(caps.items()), prefer_warm=False)).record.sandbox
        except NoCapacity:
            return None

    results = await asyncio.gather(*(one(i) for i in range(120)))
    assert results.count(None) == 60
    for box, cap in caps.items():
        assert results.count(box) == cap
        members = {m.decode() for m in await awaited(redis.smembers(keys.placed(box)))}
        assert len(members) == cap
        assert all([(await store.get(m)) is not None for m in members])
    assert len(await store.list()) == 60


async def test_a_deleted_session_frees_its_place(redis: aioredis.Redis, settings: Settings) -> None:
    keys = Keys(settings.key_prefix)
    store = SessionStore(redis, EventBus(redis, keys))
    await fleet(redis, keys, [("solo", 0, 1, True, False, 0)])
    first = await store.place(new_record(SessionCreate(id="one"), "", settings), None, [("solo", 1)], prefer_warm=False)
    with pytest.raises(NoCapacity):
        await store.place(new_record(SessionCreate(id="two"), "", settings), None, [("solo", 1)], prefer_warm=False)
    # The same id again is the same session, whatever the capacity.
    again = await store.place(new_record(SessionCreate(id="one"), "", settings), None, [("solo", 1)], prefer_warm=False)
    assert not again.created and again.record == first.record
    await store.transition("one", S.DELETING)
    await store.transition("one", S.DELETED)
    assert not await awaited(redis.scard(keys.placed("solo")))
    placed = await store.place(
        new_record(SessionCreate(id="two"), "", settings), None, [("solo", 1)], prefer_warm=False
    )
    assert placed.created and placed.record.sandbox == "solo"


async def test_concurrent_warm_creates_never_share_a_desktop(redis: aioredis.Redis, settings: Settings) -> None:
    """8 creates at once on a sandbox with 3 warm desktops: each desktop goes to exactly one
    of them, born ready; the other 5 are placed cold."""
    keys = Keys(settings.key_prefix)
    store = SessionStore(redis, EventBus(redis, keys))
    await fleet(redis, keys, [("w", 0, 50, True, False, 3)])

    async def one(i: int) -> tuple[str, bool]:
        placed = await store.place(new_record(SessionCreate(), "", settings), None, [("w", 50)], prefer_warm=True)
        return placed.record.id, placed.warm

    results = await asyncio.gather(*(one(i) for i in range(8)))
    assert sorted(sid for sid, warm in results if warm) == ["w-w-0", "w-w-1", "w-w-2"]
    assert [warm for _, warm in results].count(False) == 5
    assert not await awaited(redis.llen(keys.pool("w")))
    assert await awaited(redis.scard(keys.placed("w"))) == 8
    for sid, warm in results:
        stored = await store.get(sid)
        assert stored is not None and stored.sandbox == "w"
        assert stored.state is (S.READY if warm else S.PENDING)


async def test_a_derived_id_served_warm_leads_its_retries_to_the_same_session(
    redis: aioredis.Redis, settings: Settings
) -> None:
    """An Idempotency-Key's (or a command's) id is no name: a warm desktop serves it, and the
    same id again, even 6 at once, finds that session instead of making another."""
    keys = Keys(settings.key_prefix)
    store = SessionStore(redis, EventBus(redis, keys))
    await fleet(redis, keys, [("w", 0, 50, True, False, 3)])
    derived = "k-derived-from-a-key"

    async def one() -> tuple[bool, str, bool]:
        record = msgspec.structs.replace(new_record(SessionCreate(), "", settings), id=derived)
        placed = await store.place(record, None, [("w", 50)], prefer_warm=True, aliased=True)
        return placed.created, placed.record.id, placed.warm

    results = await asyncio.gather(*(one() for _ in range(6)))
    assert sorted(results) == [(False, "w-w-0", False)] * 5 + [(True, "w-w-0", True)]
    assert await store.get(derived) is None  # no second record under the derived id
    assert await redis.get(keys.session_alias(derived)) == b"w-w-0"
    assert 0 < await redis.ttl(keys.session_alias(derived)) <= 86_400
    assert await awaited(redis.llen(keys.pool("w"))) == 2 and await awaited(redis.scard(keys.placed("w"))) == 1
    # Without `aliased` (a plain server id), nothing is aliased: a claim leaves no key.
    plain = await store.place(new_record(SessionCreate(), "", settings), None, [("w", 50)], prefer_warm=True)
    assert plain.warm and not await redis.exists(keys.session_alias(plain.record.id))


async def test_a_sandbox_that_changes_after_the_read_is_not_used(redis: aioredis.Redis, settings: Settings) -> None:
    """The reservation re-checks the chosen sandbox: one that went silent or draining since
    the read is passed over for the next best."""
    keys = Keys(settings.key_prefix)
    store = SessionStore(redis, EventBus(redis, keys))
    await fleet(redis, keys, [("a", 0, 5, True, False, 0), ("b", 3, 5, True, False, 0)])
    read = store.reservations.read_fleet

    async def then_a_goes_away(*args: Any, **kwargs: Any) -> Any:
        fleet = await read(*args, **kwargs)
        await redis.delete(keys.sandbox_alive("a"))  # between the read and the reservation
        return fleet

    store.reservations.read_fleet = then_a_goes_away  # type: ignore[method-assign]
    placed = await store.place(
        new_record(SessionCreate(id="late"), "", settings), None, [("a", 5), ("b", 5)], prefer_warm=False
    )
    assert placed.record.sandbox == "b"
    assert not await awaited(redis.scard(keys.placed("a")))
