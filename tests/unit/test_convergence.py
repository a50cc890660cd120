"""Model-based property test of recovery, on the real code: random sequences of API requests,
job runs, Docker failures, worker crashes between any two Docker calls, desktops stopped from
outside and reconciler passes drive the real ``Lifecycle`` and ``Reconciler`` (with the real
store, events and leases on a real Redis) over the in-memory Docker port of tests/fakes.py.

Whatever the sequence: each job that finishes leaves what its result says, `deleted` is
final, a volume goes only with its session's delete, and after quiescence (queued jobs and
reconciler passes until nothing changes) nothing is in progress and Docker matches the records
(no lost, duplicate or orphaned desktop or volume)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from orchestrator.errors import ServiceError
from orchestrator.locks import Busy
from orchestrator.states import IN_PROGRESS, SessionState
from tests.fakes import Crash, FakeRuntime, QueuedJob, Stack, open_stack
from workers.runtime.errors import DesktopErrorCode

S = SessionState
SESSIONS = ("model-0", "model-1")
# Failures the real runtime reports with these codes, on the calls the lifecycle makes.
FAULTS: tuple[tuple[str, DesktopErrorCode], ...] = (
    ("ensure_volume", "volume_create_failed"),
    ("create", "desktop_create_failed"),
    ("start", "desktop_start_failed"),
    ("wait_ready", "desktop_exited"),
    ("wait_ready", "dockerd_timeout"),
    ("remove", "desktop_remove_failed"),
    ("remove_volume", "volume_remove_failed"),
)
QUIESCENCE_ROUNDS = 20


@dataclass(frozen=True)
class CrashPoint:
    call: int  # counted from the start of the step
    after: bool  # after the call's effect, or before it


@dataclass(frozen=True)
class RunJob:
    crash: CrashPoint | None = None
    requeue: bool = False  # after a crash: arq runs the job again (else it is lost with the worker)


@dataclass(frozen=True)
class Request:
    verb: Literal["stop", "start", "delete"]
    session: str


@dataclass(frozen=True)
class StopFromOutside:
    session: str


@dataclass(frozen=True)
class Fault:
    method: str
    code: DesktopErrorCode


@dataclass(frozen=True)
class Reconcile:
    crash: CrashPoint | None = None


Step = RunJob | Request | StopFromOutside | Fault | Reconcile


async def settle() -> list[BaseException]:
    """Wait for the loop's other tasks (the resumes a reconciler pass started); their errors."""
    errors: list[BaseException] = []
    async with asyncio.timeout(10):
        while others := asyncio.all_tasks() - {asyncio.current_task()}:
            done, _ = await asyncio.wait(others)
            errors += [e for t in done if not t.cancelled() and (e := t.exception()) is not None]
    return errors


class Model:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.runtime = stack.runtime
        self.reconciler = stack.reconciler()
        self.deleted: set[str] = set()

    async def apply(self, step: Step) -> None:
        match step:
            case RunJob():
                await self.run_job(step)
            case Request(verb, session):
                service = self.stack.sessions
                # Refused (409 in this state, 404 once deleted) as the API refuses it.
                with contextlib.suppress(ServiceError):
                    await {"stop": service.stop, "start": service.start, "delete": service.delete}[verb](session)
            case StopFromOutside(session):
                if (desktop := self.runtime.containers.get(session)) is not None:
                    desktop.running = False
            case Fault(method, code):
                self.runtime.fail_next(method, code)
            case Reconcile(crash):
                await self.reconcile(crash)

    def arm(self, crash: CrashPoint | None) -> None:
        self.runtime.crashed = False
        if crash is not None:
            self.runtime.crash_at(crash.call, after=crash.after)

    async def run_job(self, step: RunJob) -> None:
        if not self.stack.queue.jobs:
            return
        job = self.stack.queue.jobs.pop(0)
        faults = self.runtime.pending_faults()
        self.arm(step.crash)
        try:
            result = await self.stack.run(job)
        except Busy:
            self.stack.queue.jobs.append(job)  # arq defers it
            return
        except Crash as e:
            note(f"  {job} -> {e!r}")
            await self.worker_died()
            if step.requeue:
                self.stack.queue.jobs.insert(0, job)
            return
        finally:
            self.runtime.disarm()
        note(f"  {job} -> {result}")
        await self.check_result(job, result, fired=faults - self.runtime.pending_faults())

    async def reconcile(self, crash: CrashPoint | None) -> None:
        self.arm(crash)
        try:
            await self.reconciler.pass_once()
            errors = await settle()
        except Crash:
            await self.worker_died()
            return
        finally:
            self.runtime.disarm()
        if self.runtime.crashed:  # in a resume the pass started
            assert all(isinstance(e, Crash) for e in errors), errors
            await self.worker_died()
        else:
            assert not errors, errors

    async def worker_died(self) -> None:
        # Everything the worker was doing stops; its leases lapse; a new reconciler starts afresh.
        await self.reconciler.close()
        await settle()
        await self.stack.redis.delete(*(self.stack.keys.lock(s) for s in SESSIONS))
        self.reconciler = self.stack.reconciler()

    async def quiesce(self) -> None:
        note("quiescence")
        for _ in range(QUIESCENCE_ROUNDS):
            while self.stack.queue.jobs:
                await self.run_job(RunJob())
            actions = await self.reconciler.pass_once()
            assert not await settle()
            if not actions and not self.stack.queue.jobs:
                return
        raise AssertionError(f"still correcting after {QUIESCENCE_ROUNDS} reconciler passes: {actions}")

    # -- what must hold ---------------------------------------------------------------------

    async def check_result(self, job: QueuedJob, result: str, fired: set[str]) -> None:
        """A job that finished left what its result says."""
        sid, record = job.session, await self.stack.store.get(job.session)
        desktop, runtime = self.runtime.containers.get(sid), self.runtime
        if result == "ready":
            assert record is not None and record.state is S.READY, record
            assert desktop is not None and desktop.running and desktop.generation == record.generation, desktop
            assert ours(runtime, sid), f"{sid} is ready on a volume the lifecycle did not make"
        elif result == "stopped":
            assert record is not None and record.state is S.STOPPED, record
            assert desktop is None, desktop
        elif result == "deleted":
            assert record is None, record
            assert desktop is None and sid not in runtime.volumes, (desktop, runtime.volumes)
        elif result.startswith("failed: "):
            code = result.removeprefix("failed: ")
            assert code != "internal_error", result
            assert record is not None and record.state is S.FAILED, record
            assert record.error is not None and record.error.code == code, record.error
            if "remove" not in fired:  # else the reconciler removes it, after its grace
                assert desktop is None, desktop
        elif result.startswith("retry later: "):
            assert record is not None and record.state is S.DELETING, record
        else:
            assert result == "skipped" or result.startswith(("nothing to do", "superseded")), result

    async def check_always(self) -> None:
        for sid in SESSIONS:
            record = await self.stack.store.get(sid)
            if sid in self.deleted:
                assert record is None, f"{sid} came back after it was deleted: {record}"
            if record is None:
                self.deleted.add(sid)
            elif record.state is not S.DELETING:
                assert not self.runtime.removed_volumes[sid], f"the volume of {record.state} {sid} was removed"

    async def check_settled(self) -> None:
        assert not await self.stack.locks.held(list(SESSIONS)), "a lease is still held"
        for sid in SESSIONS:
            record = await self.stack.store.get(sid)
            event(f"settled {'deleted' if record is None else record.state}")  # --hypothesis-show-statistics
            desktop, has_volume = self.runtime.containers.get(sid), sid in self.runtime.volumes
            if record is None:
                assert desktop is None and not has_volume, (sid, desktop, has_volume)
                continue
            assert record.state not in IN_PROGRESS, record
            if record.state is S.READY:
                assert desktop is not None and desktop.running and desktop.generation == record.generation, desktop
                assert ours(self.runtime, sid), f"{sid} is ready on a volume the lifecycle did not make"
            elif record.state is S.STOPPED:
                assert desktop is None, desktop
                assert not self.runtime.removed_volumes[sid]
            elif record.state is S.FAILED:
                assert desktop is None, desktop


def ours(runtime: FakeRuntime, session_id: str) -> bool:
    """The session's volume exists and carries our labels: made by ensure_volume, not by Docker
    when the desktop bound a missing one (the reconciler's listings find only labelled ones)."""
    volume = runtime.volumes.get(session_id)
    return volume is not None and volume.labelled


async def run_example(redis_url: str, steps: Sequence[Step]) -> None:
    async with open_stack(redis_url) as stack:
        model = Model(stack)
        for sid in SESSIONS:
            await stack.create(sid)
        for step in steps:
            note(repr(step))  # hypothesis prints these for the failing case
            await model.apply(step)
            await model.check_always()
        await model.quiesce()
        await model.check_always()
        await model.check_settled()
        await model.reconciler.close()


crash_points = st.builds(CrashPoint, call=st.integers(0, 9), after=st.booleans())
sessions = st.sampled_from(SESSIONS)
# Mostly plain job runs, so that sequences get deep (ready, stopped, restarted) between faults.
steps = st.one_of(
    *[st.just(RunJob())] * 6,
    st.builds(RunJob, crash=crash_points, requeue=st.booleans()),
    st.builds(Request, verb=st.sampled_from(("stop", "start", "delete")), session=sessions),
    st.builds(Request, verb=st.sampled_from(("stop", "start")), session=sessions),
    st.builds(StopFromOutside, session=sessions),
    st.sampled_from(FAULTS).map(lambda f: Fault(*f)),
    st.builds(Reconcile, crash=st.none() | crash_points),
)


@settings(max_examples=300, deadline=None)
@given(script=st.lists(steps, max_size=40))
def test_any_sequence_of_requests_failures_and_crashes_converges(redis_url: str, script: list[Step]) -> None:
    asyncio.run(run_example(redis_url, script))
