"""H3: the reconciler removes a record-less desktop or volume only on positive evidence in Redis
(a deleted session's tombstone, the warm pool's own making set); everything else is kept and
alarmed about. Real Lifecycle, store, events and leases on a real Redis, over FakeRuntime."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from orchestrator.schemas import Event
from orchestrator.states import SessionState
from tests.fakes import Stack, open_stack
from workers.pool import WarmPool
from workers.reconciler import KeepUnknown, Reconciler, RemoveDesktop, RemoveVolume
from workers.runtime import DesktopError

SIDS = [f"keep-{i}" for i in range(5)]


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[Stack]:
    async with open_stack(redis_url) as stack:
        yield stack


async def ready(stack: Stack, *sids: str) -> None:
    for sid in sids:
        await stack.create(sid)
    assert await stack.run_queued() == ["ready"] * len(sids)


async def empty_redis(stack: Stack) -> None:
    """What a lost AOF, FLUSHALL or eviction leaves of this stack's keys: nothing."""
    keys = [k async for k in stack.redis.scan_iter(match=f"{stack.keys.prefix}*", count=1000)]
    await stack.redis.delete(*keys)


async def alarms(stack: Stack) -> list[Event]:
    entries = await stack.bus.history(stack.keys.firehose)
    return [e for _, e in entries if e.type == "reconcile.unknown_objects"]


async def test_an_emptied_redis_removes_nothing_alarms_once_and_a_session_is_readopted(stack: Stack) -> None:
    await ready(stack, *SIDS)
    volumes = {sid: stack.runtime.volumes[sid] for sid in SIDS}
    await empty_redis(stack)
    reconciler = stack.reconciler()  # grace 0: anything removable would go at once

    for _ in range(3):
        actions = await reconciler.pass_once()
        assert {type(a) for a in actions} == {KeepUnknown}
    assert set(stack.runtime.containers) == set(SIDS)
    assert {sid: stack.runtime.volumes[sid] for sid in SIDS} == volumes
    assert reconciler.unknown_objects == 10
    [alarm] = await alarms(stack)  # once per object per run, not once per pass
    assert alarm.data["count"] == 10 and alarm.data["redis_looks_empty"] is True
    assert sorted(alarm.data["sessions"]) == SIDS
    assert "desktop-keep-0" in alarm.data["names"] and "docker-data-keep-0" in alarm.data["names"]

    # Re-adoption: a record under the volume's session id; the create job adopts the volume.
    await ready(stack, SIDS[0])
    assert stack.runtime.volumes[SIDS[0]] is volumes[SIDS[0]]
    assert (await stack.store.get(SIDS[0])) is not None
    await reconciler.pass_once()
    assert reconciler.unknown_objects == 8
    assert len(await alarms(stack)) == 1  # nothing new to say


async def test_a_worker_with_another_key_prefix_removes_nothing(stack: Stack, redis_url: str) -> None:
    await ready(stack, *SIDS[:2])
    async with open_stack(redis_url, runtime=stack.runtime) as foreign:  # same Docker, other prefix
        reconciler = foreign.reconciler()
        actions = await reconciler.pass_once()
        assert all(isinstance(a, KeepUnknown) and a.redis_looks_empty for a in actions) and len(actions) == 4
        [alarm] = await alarms(foreign)
        assert alarm.data["count"] == 4
    assert set(stack.runtime.containers) == set(SIDS[:2]) and set(stack.runtime.volumes) == set(SIDS[:2])
    assert await stack.reconciler().pass_once() == []  # its own worker finds all in order


async def test_a_deleted_sessions_leftovers_are_removed_on_its_tombstone(stack: Stack) -> None:
    sid, other = SIDS[0], SIDS[1]
    await ready(stack, sid, other)
    await stack.sessions.delete(sid)
    assert await stack.run_queued() == ["deleted"]
    ttl = await stack.redis.ttl(stack.keys.session_deleted(sid))
    assert 0 < ttl <= stack.store.tombstone_ttl_s
    # A leftover (a delete racing a create, a desktop made by a stale job): labelled, no record.
    await stack.runtime.ensure_volume(sid)
    await stack.runtime.create(sid, 1)

    actions = await stack.reconciler().pass_once()

    assert [(type(a), a.session) for a in actions] == [(RemoveDesktop, sid), (RemoveVolume, sid)]
    assert sid not in stack.runtime.containers and sid not in stack.runtime.volumes
    assert other in stack.runtime.containers and other in stack.runtime.volumes
    assert await alarms(stack) == []


async def test_a_new_record_under_a_deleted_id_drops_the_tombstone(stack: Stack) -> None:
    sid = SIDS[0]
    await ready(stack, sid)
    await stack.sessions.delete(sid)
    assert await stack.run_queued() == ["deleted"]
    await ready(stack, sid)
    assert not await stack.redis.exists(stack.keys.session_deleted(sid))
    # Were its record lost now, nothing would say its volume may go.
    await stack.redis.delete(stack.keys.session(sid))
    actions = await stack.reconciler().pass_once()
    assert {type(a) for a in actions} == {KeepUnknown}
    assert sid in stack.runtime.volumes


async def test_the_pools_own_half_made_desktop_is_removed(stack: Stack) -> None:
    def pool() -> WarmPool:
        return WarmPool(stack.runtime, stack.redis, stack.keys, "fake", targets={"minimal": 1}, ready_timeout_s=1)

    # A make that fails and whose cleanup fails too: its objects stay, its id in pool-making.
    stack.runtime.fail_next("wait_ready", "dockerd_timeout")
    stack.runtime.fail_next("remove", "desktop_remove_failed")
    with pytest.raises(DesktopError):
        await pool()._make_one("minimal")
    [made] = stack.runtime.containers
    assert await stack.redis.smembers(stack.keys.pool_making("fake")) == {made.encode()}  # type: ignore[misc]

    # The next run's reconciler (a fresh pool: no make of its own on that id).
    reconciler = Reconciler(stack.lifecycle, stack.queue, grace_s=0.0, pool=pool())
    actions = await reconciler.pass_once()
    assert [(type(a), a.session) for a in actions] == [(RemoveDesktop, made), (RemoveVolume, made)]
    assert not stack.runtime.containers and not stack.runtime.volumes
    assert await reconciler.pass_once() == []
    assert not await stack.redis.exists(stack.keys.pool_making("fake"))  # forgotten once gone


async def test_a_made_warm_desktop_leaves_the_making_set(stack: Stack) -> None:
    pool = WarmPool(stack.runtime, stack.redis, stack.keys, "fake", targets={"minimal": 1}, ready_timeout_s=1)
    await pool._make_one("minimal")
    assert len(await pool.pooled()) == 1
    assert not await stack.redis.exists(stack.keys.pool_making("fake"))
    await pool.shrink()
    assert not stack.runtime.containers and not stack.runtime.volumes


async def test_a_stopped_sessions_desktop_still_goes_and_its_volume_stays(stack: Stack) -> None:
    sid = SIDS[0]
    await ready(stack, sid)
    await stack.sessions.stop(sid)
    assert await stack.run_queued() == ["stopped"]
    await stack.runtime.create(sid, 1)  # left over
    actions = await stack.reconciler().pass_once()
    assert [(type(a), a.session) for a in actions] == [(RemoveDesktop, sid)]
    assert sid in stack.runtime.volumes
    assert (await stack.store.get(sid)).state is SessionState.STOPPED  # type: ignore[union-attr]
