"""The lifecycle's failure paths, through the real Lifecycle, store, events and leases on a
real Redis, over the in-memory Docker port: what state and error each failure leaves, which
events say so, and what is left of the desktop and the volume."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from orchestrator.queue import Operation
from orchestrator.schemas import SessionCreate, SessionRecord
from orchestrator.states import SessionState
from tests.fakes import QueuedJob, Stack, open_stack
from workers.reconciler import RemoveDesktop
from workers.runtime.errors import DesktopErrorCode

SID = "s-lifecycle"
CREATED = ["session.pending", "session.creating", "volume.created", "session.starting", "desktop.started"]
READY = [*CREATED, "dockerd.ready", "session.ready"]


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[Stack]:
    async with open_stack(redis_url) as stack:
        yield stack


async def record(stack: Stack) -> SessionRecord:
    found = await stack.store.get(SID)
    assert found is not None
    return found


async def assert_failed(stack: Stack, code: str) -> None:
    failed = await record(stack)
    assert failed.state is SessionState.FAILED
    assert failed.error is not None
    assert failed.error.code == code
    last = (await stack.events(SID))[-1]
    assert last.type == "session.failed"
    assert last.data["code"] == code


async def ready_session(stack: Stack) -> SessionRecord:
    await stack.create(SID)
    assert await stack.run_queued() == ["ready"]
    return await record(stack)


async def test_a_create_reaches_ready_with_every_step_announced(stack: Stack) -> None:
    ready = await ready_session(stack)

    assert ready.state is SessionState.READY
    events = await stack.events(SID)
    assert [e.type for e in events] == READY
    dockerd = next(e for e in events if e.type == "dockerd.ready")
    assert (dockerd.data["depth"], dockerd.data["address_pool"]) == (2, "10.214.0.0/16")
    assert stack.runtime.containers[SID].running
    assert stack.runtime.containers[SID].generation == ready.generation
    assert SID in stack.runtime.volumes


@pytest.mark.parametrize(
    ("method", "code", "events"),
    [
        ("ensure_volume", "volume_create_failed", ["session.pending", "session.creating"]),
        (
            "start",
            "desktop_start_failed",
            ["session.pending", "session.creating", "volume.created", "session.starting"],
        ),
        ("wait_ready", "desktop_exited", CREATED),
        ("wait_ready", "dockerd_timeout", CREATED),
    ],
)
async def test_a_create_that_fails_removes_the_desktop_and_keeps_the_volume(
    stack: Stack, method: str, code: DesktopErrorCode, events: list[str]
) -> None:
    await stack.create(SID)
    stack.runtime.fail_next(method, code)

    assert await stack.run_queued() == [f"failed: {code}"]

    await assert_failed(stack, code)
    assert await stack.event_types(SID) == [*events, "session.failed"]
    assert SID not in stack.runtime.containers
    # The volume stays with the session until it is deleted (if it was made at all).
    assert (SID in stack.runtime.volumes) is (method != "ensure_volume")
    assert not stack.runtime.removed_volumes


async def test_a_missing_desktop_image_fails_the_create_as_image_missing(stack: Stack) -> None:
    stack.runtime.images_present.clear()
    await stack.create(SID)

    assert await stack.run_queued() == ["failed: image_missing"]

    await assert_failed(stack, "image_missing")
    assert await stack.event_types(SID) == ["session.pending", "session.creating", "volume.created", "session.failed"]
    assert SID not in stack.runtime.containers
    assert SID in stack.runtime.volumes


async def test_a_preload_of_an_image_nowhere_to_be_found_fails_after_dockerd_is_ready(stack: Stack) -> None:
    await stack.create(SID, SessionCreate(preload_images=["orchestrator/none:missing"]))

    assert await stack.run_queued() == ["failed: image_missing"]

    await assert_failed(stack, "image_missing")
    assert await stack.event_types(SID) == [*CREATED, "dockerd.ready", "session.failed"]
    assert SID not in stack.runtime.containers
    assert SID in stack.runtime.volumes


async def test_a_resume_whose_volume_is_gone_fails_as_volume_lost_and_makes_no_new_one(stack: Stack) -> None:
    await ready_session(stack)
    await stack.sessions.stop(SID)
    assert await stack.run_queued() == ["stopped"]
    del stack.runtime.volumes[SID]  # lost outside the orchestrator

    restarted = await stack.sessions.start(SID)
    assert await stack.run_queued() == ["failed: volume_lost"]

    await assert_failed(stack, "volume_lost")
    assert (await record(stack)).generation == restarted.generation == 2
    assert (await stack.event_types(SID))[len(READY) :] == [
        "session.stopping",
        "session.stopped",
        "session.starting",
        "session.failed",
    ]
    assert SID not in stack.runtime.containers
    assert SID not in stack.runtime.volumes


async def test_a_stop_whose_desktop_cannot_be_removed_fails_and_the_reconciler_removes_it(stack: Stack) -> None:
    await ready_session(stack)
    await stack.sessions.stop(SID)
    stack.runtime.fail_next("remove", "desktop_remove_failed")

    assert await stack.run_queued() == ["failed: desktop_remove_failed"]

    await assert_failed(stack, "desktop_remove_failed")
    assert (await stack.event_types(SID))[len(READY) :] == ["session.stopping", "session.failed"]
    assert SID in stack.runtime.containers
    actions = await stack.reconciler().pass_once()
    assert [(type(a), a.session) for a in actions] == [(RemoveDesktop, SID)]
    assert SID not in stack.runtime.containers
    assert SID in stack.runtime.volumes


@pytest.mark.parametrize(
    ("method", "code", "desktop_left"),
    [("remove", "desktop_remove_failed", True), ("remove_volume", "volume_remove_failed", False)],
)
async def test_a_delete_whose_step_fails_stays_deleting_until_a_retry_finishes_it(
    stack: Stack, method: str, code: DesktopErrorCode, desktop_left: bool
) -> None:
    ready = await ready_session(stack)
    await stack.sessions.delete(SID)
    stack.runtime.fail_next(method, code)

    assert await stack.run_queued() == [f"retry later: {code}"]

    # A delete never turns into a failure: it stays asked for, and nothing says otherwise.
    assert (await record(stack)).state is SessionState.DELETING
    assert (await stack.event_types(SID))[len(READY) :] == ["session.deleting"]
    assert (SID in stack.runtime.containers) is desktop_left
    assert SID in stack.runtime.volumes

    assert await stack.run(QueuedJob(Operation.DELETE, SID, ready.generation)) == "deleted"
    assert await stack.store.get(SID) is None
    assert (await stack.event_types(SID))[-1] == "session.deleted"
    assert SID not in stack.runtime.containers
    assert SID not in stack.runtime.volumes
