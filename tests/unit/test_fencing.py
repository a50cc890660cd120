"""Leases as fences, and deadlines (security review M1), through the real Lifecycle, store,
leases and reconciler on a real Redis over the in-memory Docker port: a holder that loses its
lease stops (and its late transitions are refused), and no operation outlives its deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from orchestrator.locks import LeaseLost, SessionLocks
from orchestrator.queue import Operation
from orchestrator.schemas import SessionCreate, SessionRecord
from orchestrator.states import SessionState
from tests.fakes import SANDBOX, FakeRuntime, Stack, open_stack
from workers.lifecycle import Lifecycle

SID = "s-fence"
S = SessionState


class StallingRuntime(FakeRuntime):
    """A FakeRuntime whose ``stalled`` method blocks on its first call until ``release`` is
    set (as a call to a stalled daemon would), before it does anything."""

    def __init__(self, stalled: str) -> None:
        super().__init__(sandbox_id=SANDBOX)
        self.stalled = stalled
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def _stall(self, method: str) -> None:
        if method == self.stalled and not self.entered.is_set():
            self.entered.set()
            await self.release.wait()

    async def start(self, session_id: str) -> None:
        await self._stall("start")
        await super().start(session_id)

    async def copy_into(self, session_id: str, images: list[str]) -> int:
        await self._stall("copy_into")
        return await super().copy_into(session_id, images)

    async def remove(self, session_id: str, stop_timeout: int = 20) -> bool:
        await self._stall("remove")
        return await super().remove(session_id, stop_timeout)


@pytest.fixture
async def stalled(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Stack]:
    """A stack whose runtime stalls the method the test is parametrized with (``start`` if not)."""
    runtime = StallingRuntime(getattr(request, "param", "start"))
    async with open_stack(redis_url, runtime) as stack:
        # A 1 s lease (renewed every 1/3 s), so that losing it shows within a test's patience.
        stack.lifecycle.locks = SessionLocks(stack.redis, stack.keys, 1.0, "worker-a")
        yield stack


async def run_queued(stack: Stack) -> list[str]:
    """The queued jobs, each of which must end by itself well within this bound."""
    async with asyncio.timeout(5):
        return await stack.run_queued()


def runtime_of(stack: Stack) -> StallingRuntime:
    assert isinstance(stack.runtime, StallingRuntime)
    return stack.runtime


def other_worker(stack: Stack) -> Lifecycle:
    """A second worker's lifecycle over the same Redis and Docker (as the reconciler resuming)."""
    return Lifecycle(
        stack.store,
        stack.bus,
        stack.runtime,
        SessionLocks(stack.redis, stack.keys, 5.0, "worker-b"),
        sandbox_id=SANDBOX,
        provision_timeout_s=5.0,
        ready_timeout_s=5.0,
        stop_timeout_s=1,
    )


async def current(stack: Stack) -> SessionRecord:
    found = await stack.store.get(SID)
    assert found is not None
    return found


async def first_holder_blocked(stack: Stack, operation: Operation = Operation.CREATE) -> asyncio.Task[str]:
    """Worker A runs ``operation`` until it blocks in the stalled runtime call."""
    record = await current(stack)
    task = asyncio.create_task(stack.lifecycle.run(operation, SID, record.generation))
    async with asyncio.timeout(5):
        await runtime_of(stack).entered.wait()
    return task


async def test_a_lease_another_holder_took_stops_the_first_and_the_session_converges_once(stalled: Stack) -> None:
    await stalled.create(SID)
    first = await first_holder_blocked(stalled)
    # The lease lapses (Redis unreachable past it, say) and the reconciler's resume takes it.
    await stalled.redis.delete(stalled.keys.lock(SID))
    record = await current(stalled)
    assert record.state is S.STARTING
    assert await other_worker(stalled).run(Operation.START, SID, record.generation) == "ready"

    with pytest.raises(LeaseLost) as lost:
        async with asyncio.timeout(5):  # the next renewal, a third of the 1 s lease away
            await first
    assert lost.value.code == "lease_lost"
    runtime_of(stalled).release.set()  # the stalled call answers now: nobody is left to act on it

    assert (await current(stalled)).state is S.READY
    types = await stalled.event_types(SID)
    assert types.count("session.ready") == 1
    assert "session.failed" not in types
    # One desktop, the second holder's; the first neither started nor removed anything more.
    assert list(stalled.runtime.containers) == [SID]
    assert stalled.runtime.containers[SID].running
    assert stalled.runtime.calls.count("start") == 1
    assert "remove" not in stalled.runtime.calls


async def test_a_transition_after_the_lease_moved_on_is_refused_and_nothing_is_undone(redis_url: str) -> None:
    runtime = StallingRuntime("start")
    async with open_stack(redis_url, runtime) as stack:
        # A lease far longer than the test: the renewer notices nothing, only the fence acts.
        stack.lifecycle.locks = SessionLocks(stack.redis, stack.keys, 60.0, "worker-a")
        await stack.create(SID)
        first = await first_holder_blocked(stack)
        lock = stack.keys.lock(SID)
        await stack.redis.set(lock, "worker-b/start:0000beef", px=60_000)  # another holder's now
        runtime.release.set()

        with pytest.raises(LeaseLost):
            async with asyncio.timeout(5):
                await first

        # The ready transition was refused; the failure policy did not run either (it would
        # have removed the desktop the other holder now owns).
        assert (await current(stack)).state is S.STARTING
        types = await stack.event_types(SID)
        assert "session.ready" not in types
        assert "session.failed" not in types
        assert SID in stack.runtime.containers
        assert await stack.redis.get(lock) == b"worker-b/start:0000beef"  # not released by A


async def test_renewals_failing_for_the_lease_stop_the_holder_without_waiting_for_redis(
    stalled: Stack, redis_url: str
) -> None:
    await stalled.create(SID)
    first = await first_holder_blocked(stalled)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        paused_at = time.monotonic()
        await admin.execute_command("CLIENT", "PAUSE", 4000, "ALL")  # every renewal now hangs
        with pytest.raises(LeaseLost, match="no renewal succeeded"):
            async with asyncio.timeout(6):
                await first
        # Stopped within the lease (1 s) and its bounded release (1 s), while Redis still sleeps.
        assert time.monotonic() - paused_at < 3.5
    finally:
        await admin.aclose()
    runtime_of(stalled).release.set()

    async with asyncio.timeout(10):  # Redis answers again; the lapsed lease is free
        while await stalled.locks.holder(SID) is not None:
            await asyncio.sleep(0.05)
    record = await current(stalled)
    assert await other_worker(stalled).run(Operation.START, SID, record.generation) == "ready"
    assert list(stalled.runtime.containers) == [SID]
    assert stalled.runtime.calls.count("start") == 1


# -- deadlines -------------------------------------------------------------------------------


@pytest.mark.parametrize("stalled", ["start", "copy_into"], indirect=True)
async def test_a_bring_up_past_its_deadline_fails_removes_the_desktop_and_keeps_the_volume(stalled: Stack) -> None:
    stalled.lifecycle.operation_timeout_s = 0.5
    await stalled.create(SID, SessionCreate(preload_images=["orchestrator/desktop:dev"]))

    started = time.monotonic()
    assert await run_queued(stalled) == ["failed: operation_timeout"]
    assert time.monotonic() - started < 3

    failed = await current(stalled)
    assert failed.state is S.FAILED
    assert failed.error is not None and failed.error.code == "operation_timeout"
    assert SID not in stalled.runtime.containers
    assert SID in stalled.runtime.volumes
    assert await stalled.locks.holder(SID) is None


@pytest.mark.parametrize("stalled", ["copy_into"], indirect=True)
async def test_a_preload_past_its_own_timeout_fails_as_preload_timeout(stalled: Stack) -> None:
    stalled.lifecycle.preload_timeout_s = 0.3
    await stalled.create(SID, SessionCreate(preload_images=["orchestrator/desktop:dev"]))

    assert await run_queued(stalled) == ["failed: preload_timeout"]
    assert SID not in stalled.runtime.containers


@pytest.mark.parametrize("stalled", ["remove"], indirect=True)
async def test_a_stop_past_its_deadline_fails_and_the_session_can_still_be_deleted(stalled: Stack) -> None:
    await stalled.create(SID)
    assert await run_queued(stalled) == ["ready"]
    stalled.lifecycle.operation_timeout_s = 0.5
    await stalled.sessions.stop(SID)

    assert await run_queued(stalled) == ["failed: operation_timeout"]
    failed = await current(stalled)
    assert failed.state is S.FAILED
    assert failed.error is not None and failed.error.code == "operation_timeout"
    assert await stalled.locks.holder(SID) is None

    await stalled.sessions.delete(SID)
    assert await run_queued(stalled) == ["deleted"]
    assert await stalled.store.get(SID) is None
    assert not stalled.runtime.containers
    assert not stalled.runtime.volumes


@pytest.mark.parametrize("stalled", ["remove"], indirect=True)
async def test_a_delete_past_its_deadline_stays_deleting_and_a_retry_completes_it(stalled: Stack) -> None:
    await stalled.create(SID)
    assert await run_queued(stalled) == ["ready"]
    stalled.lifecycle.operation_timeout_s = 0.5
    await stalled.sessions.delete(SID)

    assert await run_queued(stalled) == ["retry later: operation_timeout"]
    assert (await current(stalled)).state is S.DELETING
    assert await stalled.locks.holder(SID) is None

    await stalled.reconciler().pass_once()  # resumes the delete (the stall fired once)
    async with asyncio.timeout(5):
        while await stalled.store.get(SID) is not None:
            await asyncio.sleep(0.01)
    assert not stalled.runtime.containers


async def test_a_resume_by_the_reconciler_has_the_deadline_too(stalled: Stack) -> None:
    await stalled.create(SID)
    stalled.lifecycle.operation_timeout_s = 0.5
    reconciler = stalled.reconciler()
    await reconciler.pass_once()  # pending: it enqueues the create again (the queue is fake)
    stalled.queue.jobs.clear()
    record = await stalled.store.transition(SID, S.CREATING)  # as a worker that died left it
    assert record.state is S.CREATING

    await reconciler.pass_once()
    async with asyncio.timeout(5):
        while (await current(stalled)).state is S.CREATING or (await current(stalled)).state is S.STARTING:
            await asyncio.sleep(0.01)
    failed = await current(stalled)
    assert failed.error is not None and failed.error.code == "operation_timeout"
    assert SID not in stalled.runtime.containers
    await reconciler.close()


# -- the fence in the store's CAS script ---------------------------------------------------------


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[Stack]:
    async with open_stack(redis_url) as stack:
        yield stack


async def test_a_fenced_transition_is_written_while_the_lock_holds_its_token(stack: Stack) -> None:
    await stack.create(SID)
    await stack.redis.set(stack.keys.lock(SID), "worker-a/create:1")

    moved = await stack.store.transition(SID, S.CREATING, fence="worker-a/create:1")

    assert (await current(stack)) == moved
    assert (await stack.event_types(SID))[-1] == "session.creating"


@pytest.mark.parametrize("lock", [None, "worker-b/create:2"], ids=["lapsed", "taken"])
async def test_a_fenced_transition_is_refused_once_the_lock_moved_on(stack: Stack, lock: str | None) -> None:
    await stack.create(SID)
    if lock is not None:
        await stack.redis.set(stack.keys.lock(SID), lock)
    before = await current(stack)
    events = await stack.event_types(SID)

    with pytest.raises(LeaseLost) as refused:
        await stack.store.transition(SID, S.CREATING, fence="worker-a/create:1")
    with pytest.raises(LeaseLost):
        await stack.store.fail(SID, before.generation, "internal_error", "late", fence="worker-a/create:1")

    assert refused.value.code == "lease_lost"
    assert await current(stack) == before  # nothing written
    assert await stack.event_types(SID) == events  # and no event


async def test_an_unfenced_transition_ignores_the_lock_as_the_apis_do(stack: Stack) -> None:
    await stack.create(SID)
    await stack.redis.set(stack.keys.lock(SID), "worker-b/create:2")

    assert (await stack.store.transition(SID, S.DELETING)).state is S.DELETING
