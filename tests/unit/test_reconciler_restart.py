"""A ready session's stopped desktop is started again by the reconciler: a failed start (the
sandbox's daemon restarting) spends one attempt of the budget and never fails the session by
itself; only a desktop that is gone, or one that keeps stopping, ends it with desktop_lost.
Real Lifecycle, store and events on a real Redis, over FakeRuntime."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from orchestrator.states import SessionState
from tests.fakes import Stack, open_stack
from workers.reconciler import MAX_RESTARTS, RestartDesktop

SID = "restart-me"


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[Stack]:
    async with open_stack(redis_url) as stack:
        await stack.create(SID)
        assert await stack.run_queued() == ["ready"]
        yield stack


async def types(stack: Stack) -> list[str]:
    return [e.type for _, e in await stack.bus.history(stack.keys.session_events(SID))]


async def test_a_failed_start_is_retried_next_pass_and_the_session_stays_ready(stack: Stack) -> None:
    reconciler = stack.reconciler()
    stack.runtime.containers[SID].running = False
    stack.runtime.fail_next("start", "desktop_start_failed", "the daemon is restarting")
    actions = await reconciler.pass_once()
    assert [type(a) for a in actions] == [RestartDesktop]
    record = await stack.store.get(SID)
    assert record is not None and record.state is SessionState.READY
    assert not stack.runtime.containers[SID].running and "desktop.restarted" not in await types(stack)

    await reconciler.pass_once()  # the daemon answers again
    assert stack.runtime.containers[SID].running
    restarted = [e for _, e in await stack.bus.history(stack.keys.session_events(SID)) if e.type == "desktop.restarted"]
    assert [e.data["attempt"] for e in restarted] == [2]  # the failed start spent attempt 1


async def test_failed_starts_spend_the_budget_then_the_session_is_lost(stack: Stack) -> None:
    reconciler = stack.reconciler()
    stack.runtime.containers[SID].running = False
    for _ in range(MAX_RESTARTS):
        stack.runtime.fail_next("start", "desktop_start_failed")
        await reconciler.pass_once()
    assert "session.failed" not in await types(stack)
    await reconciler.pass_once()
    record = await stack.store.get(SID)
    assert record is not None and record.state is SessionState.FAILED
    assert record.error is not None and record.error.code == "desktop_lost"
    assert "kept stopping" in record.error.message


async def test_a_desktop_removed_meanwhile_fails_the_session_at_once(stack: Stack) -> None:
    reconciler = stack.reconciler()
    stack.runtime.containers[SID].running = False
    stack.runtime.fail_next("start", "desktop_gone", "the desktop is gone")
    await reconciler.pass_once()
    record = await stack.store.get(SID)
    assert record is not None and record.state is SessionState.FAILED
    assert record.error is not None
    assert (record.error.code, record.error.message) == ("desktop_lost", "the desktop is gone")


async def test_a_commands_operation_the_reconciler_resumes_still_carries_its_request_id(stack: Stack) -> None:
    """A command's start whose job no worker ran yet (the reconciler got there first): the
    resumption finishes what the command asked, so a producer following its request id sees
    the session ready (this raced in CI: the producer waited for ever)."""
    await stack.sessions.stop(SID)
    assert await stack.run_queued() == ["stopped"]
    await stack.sessions.start(SID, request_id="rq-start")
    stack.queue.jobs.clear()  # the job is lost: only the reconciler's pass brings it up
    reconciler = stack.reconciler()
    await reconciler.pass_once()
    for task in list(reconciler._tasks):
        await task
    events = [e for _, e in await stack.bus.history(stack.keys.session_events(SID))]
    ready = [e for e in events if e.type == "session.ready"][-1]
    assert ready.data["request_id"] == "rq-start"
    assert "reconcile.resumed" in [e.type for e in events]
