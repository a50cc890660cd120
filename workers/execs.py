"""The worker's exec duty: take execs off the sandbox's exec stream (a consumer group, so each
runs on one worker), run each in its desktop, write its output to its stream as it comes, and
end its record; kill requests come on the sandbox's control stream. Execs run beside the
lifecycle jobs, never in their queue: a long command holds up nothing.

At most once: the record goes running (with a lease this worker renews) before the process
starts. An entry another worker left unacknowledged (it died) is never run again: its record
is running, and once the lease lapses it fails ``worker_lost``."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import msgspec
from redis.exceptions import RedisError

from orchestrator.events import EventBus, make_event
from orchestrator.exec_store import LEASE_MS, ExecStore, decode_job
from orchestrator.exec_types import ExecErrorInfo, ExecFailure, ExecJob, ExecRecord, ExecState, OutputStream

from .runtime.errors import DesktopError
from .runtime.execs import ExecSpec

log = logging.getLogger("workers.execs")

CLAIM_IDLE_MS = 30_000
BLOCK_MS = 5_000
# After a timeout or a kill, how long the output may still take to end before it is cut.
DRAIN_AFTER_KILL_S = 5.0


class ExecProcess(Protocol):
    pid: int | None

    def output(self) -> AsyncIterator[tuple[OutputStream, bytes]]: ...

    async def exit_code(self) -> int | None: ...

    async def kill(self) -> bool: ...

    async def close(self) -> None: ...


class Execs(Protocol):
    async def start(self, session_id: str, spec: ExecSpec) -> ExecProcess: ...


def utf8_tail(data: bytes) -> int:
    """How many trailing bytes of ``data`` are an incomplete UTF-8 sequence (0-3): held back
    so that a chunk boundary never splits a character."""
    for back in range(1, min(3, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back
            continue
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return back if need > back else 0
    return 0


@dataclass
class Capture:
    """Output kept up to the exec's cap; the rest counted, not kept."""

    cap: int
    kept: int = 0
    counts: dict[OutputStream, int] = field(default_factory=lambda: {s: 0 for s in OutputStream})
    pending: dict[OutputStream, bytes] = field(default_factory=lambda: {s: b"" for s in OutputStream})
    truncated: bool = False

    def take(self, stream: OutputStream, data: bytes) -> bytes:
        self.counts[stream] += len(data)
        room = self.cap - self.kept
        if len(data) > room:
            data, self.truncated = data[: max(room, 0)], True
        self.kept += len(data)
        data = self.pending[stream] + data
        hold = utf8_tail(data)
        self.pending[stream] = data[len(data) - hold :] if hold else b""
        return data[: len(data) - hold] if hold else data

    def rest(self) -> list[tuple[OutputStream, bytes]]:
        left = [(s, d) for s, d in self.pending.items() if d]
        self.pending = {s: b"" for s in OutputStream}
        return left


class ExecRunner:
    def __init__(
        self,
        store: ExecStore,
        bus: EventBus,
        execs: Execs,
        *,
        sandbox_id: str,
        worker_id: str,
        max_running: int,
    ) -> None:
        self.store = store
        self.bus = bus
        self.execs = execs
        self.sandbox_id = sandbox_id
        self.worker_id = worker_id
        self.max_running = max_running
        self._running: dict[str, asyncio.Event] = {}  # exec id -> its kill request
        self._freed = asyncio.Event()

    def running(self) -> int:
        return len(self._running)

    async def run(self) -> None:
        """The duty: runs until cancelled (the worker's shutdown), with the running execs.
        Redis away (or emptied: its group gone) is waited out, never the end of the worker."""
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._renew_leases)
            tasks.start_soon(self._follow_kills)
            tasks.start_soon(self._claim_abandoned)
            grouped = False
            while True:
                free = self.max_running - len(self._running)
                if free <= 0:
                    self._freed.clear()
                    await self._freed.wait()
                    continue
                try:
                    if not grouped:
                        await self.store.ensure_group(self.sandbox_id)
                        grouped = True
                    jobs = await self.store.next_jobs(self.sandbox_id, self.worker_id, min(free, 50), BLOCK_MS)
                except (RedisError, OSError) as e:
                    grouped = grouped and "NOGROUP" not in str(e)
                    log.warning("could not read the exec stream (%s); retrying", e)
                    await anyio.sleep(1)
                    continue
                for entry_id, raw in jobs:
                    self._running[f"entry:{entry_id}"] = asyncio.Event()  # its slot, until known
                    tasks.start_soon(self._handle, entry_id, raw)

    async def _handle(self, entry_id: str, raw: bytes) -> None:
        slot = f"entry:{entry_id}"
        try:
            try:
                job = decode_job(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                log.error("exec entry %s of sandbox %s is malformed (%s): dropped", entry_id, self.sandbox_id, e)
                return
            record = await self.store.start(job.id, self.worker_id, time.time())
            if record is None:  # killed before its start, late, or another worker's
                await self.store.settle(job.id)
                return
            self._running[job.id] = self._running.pop(slot)
            slot = job.id
            await self._run(job, record, self._running[job.id])
        except Exception:
            log.exception("exec entry %s failed; its record ends when its lease lapses", entry_id)
        finally:
            self._running.pop(slot, None)
            self._freed.set()
            try:
                await self.store.done_with(self.sandbox_id, entry_id)
            except Exception:
                log.exception("could not acknowledge exec entry %s", entry_id)

    async def _run(self, job: ExecJob, record: ExecRecord, kill_requested: asyncio.Event) -> None:
        # Published while the process starts (not before): it only has to precede exec.exited.
        started_event = asyncio.ensure_future(self._event("exec.started", record, {"exec": record.id, "by": record.by}))
        spec = ExecSpec(
            argv=job.argv, env=job.env, cwd=job.cwd, user=job.user, stdin=base64.b64decode(job.stdin_base64)
        )
        started = time.monotonic()
        capture = Capture(job.max_output_bytes)
        timed_out = killed = False
        exit_code: int | None = None
        error: ExecErrorInfo | None = None
        try:
            process = await self.execs.start(job.session, spec)
        except DesktopError as e:
            code = ExecFailure.SESSION_NOT_READY if e.code == "desktop_gone" else ExecFailure.EXEC_FAILED
            error = ExecErrorInfo(code=code.value, message=e.message)
        else:
            try:
                timed_out, killed = await self._pump(process, job, capture, kill_requested)
                exit_code = await process.exit_code()
            finally:
                await process.close()
        await self.store.append(job.id, capture.rest())
        await started_event
        final = msgspec.structs.replace(
            record,
            state=ExecState.FAILED if error else ExecState.EXITED,
            ended_at=time.time(),
            exit_code=exit_code,
            timed_out=timed_out,
            killed=killed,
            truncated=capture.truncated,
            stdout_bytes=capture.counts[OutputStream.STDOUT],
            stderr_bytes=capture.counts[OutputStream.STDERR],
            duration_ms=int((time.monotonic() - started) * 1000),
            error=error,
        )
        if not await self.store.finish(final):
            log.warning("exec %s was ended by someone else meanwhile (its lease lapsed?)", job.id)
            return
        await self._event(
            "exec.exited",
            final,
            {
                "exec": final.id,
                "by": final.by,
                "state": final.state.value,
                "exit_code": final.exit_code,
                "duration_ms": final.duration_ms,
                "stdout_bytes": final.stdout_bytes,
                "stderr_bytes": final.stderr_bytes,
                "truncated": final.truncated,
                "timed_out": final.timed_out,
                "killed": final.killed,
                **({"code": error.code} if error else {}),
            },
        )

    async def _pump(
        self, process: ExecProcess, job: ExecJob, capture: Capture, kill_requested: asyncio.Event
    ) -> tuple[bool, bool]:
        """Copy the output to its stream until it ends, the timeout, or a kill request; then
        kill the tree and take what it still prints (bounded). Returns (timed_out, killed)."""
        queue: asyncio.Queue[tuple[OutputStream, bytes] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for chunk in process.output():
                    queue.put_nowait(chunk)
            finally:
                queue.put_nowait(None)

        async def write() -> None:
            # Whatever has arrived goes in one round trip: batches under load, at once when idle.
            while True:
                item = await queue.get()
                batch: list[tuple[OutputStream, bytes]] = []
                while item is not None:
                    kept = capture.take(*item)
                    if kept:
                        batch.append((item[0], kept))
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                await self.store.append(job.id, batch)
                if item is None:
                    return

        reader = asyncio.ensure_future(read())
        writer = asyncio.ensure_future(write())
        killer = asyncio.ensure_future(kill_requested.wait())
        timed_out = killed = False
        try:
            done, _ = await asyncio.wait({writer, killer}, timeout=job.timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if writer not in done:
                timed_out, killed = killer not in done, killer in done
                await process.kill()
                ended, _ = await asyncio.wait({writer}, timeout=DRAIN_AFTER_KILL_S)
                if writer not in ended:  # something still holds the output open: cut it
                    reader.cancel()
            await writer
        except asyncio.CancelledError:
            # The worker is shutting down: the command must not outlive its record.
            await asyncio.shield(process.kill())
            raise
        finally:
            for task in (reader, writer, killer):
                task.cancel()
        return timed_out, killed

    async def _event(self, type: str, record: ExecRecord, data: dict[str, object]) -> None:
        if record.request_id is not None:  # a command's: its producer follows it by this
            data = {**data, "request_id": record.request_id}
        try:
            await self.bus.publish(
                make_event(type, sandbox=self.sandbox_id, session=record.session, data=data, tenant=record.tenant)
            )
        except Exception:
            log.exception("could not publish %s for exec %s", type, record.id)

    # -- background --------------------------------------------------------------------------

    async def _renew_leases(self) -> None:
        while True:
            await anyio.sleep(LEASE_MS / 1000 / 4)
            ids = [i for i in self._running if not i.startswith("entry:")]
            try:
                await self.store.renew(ids, self.worker_id)
            except Exception as e:
                log.warning("could not renew exec leases (%s); retrying", e)

    async def _follow_kills(self) -> None:
        after: str | None = None
        while True:
            try:
                if after is None:
                    after = await self.store.control_position(self.sandbox_id)
                after, ids = await self.store.kill_requests(self.sandbox_id, after, BLOCK_MS)
            except Exception as e:
                log.warning("could not read kill requests (%s); retrying", e)
                await anyio.sleep(1)
                continue
            for exec_id in ids:
                requested = self._running.get(exec_id)
                if requested is not None:
                    requested.set()

    async def _claim_abandoned(self) -> None:
        """Entries a dead worker of this sandbox held: never run again, ended once their lease lapses."""
        while True:
            try:
                for entry_id, raw in await self.store.claim_abandoned(self.sandbox_id, self.worker_id, CLAIM_IDLE_MS):
                    await self._settle_abandoned(entry_id, raw)
            except Exception as e:
                log.warning("could not claim abandoned exec entries (%s); retrying", e)
            await anyio.sleep(CLAIM_IDLE_MS / 1000 / 2)

    async def _settle_abandoned(self, entry_id: str, raw: bytes) -> None:
        try:
            job = decode_job(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            await self.store.done_with(self.sandbox_id, entry_id)
            return
        record = await self.store.settle(job.id)
        if record is None or record.state.final:
            await self.store.done_with(self.sandbox_id, entry_id)
        elif record.state is ExecState.QUEUED:
            # Read by a consumer that died before starting it: it never ran, so it may run here.
            self._running[f"entry:{entry_id}"] = asyncio.Event()
            await self._handle(entry_id, raw)
        # Running with its lease still held: its worker is alive after all; look again later.
