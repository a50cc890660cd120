"""Following execs' output streams in the API: one shared reader per process, SSE frames, and
the collected output of a ``wait: true`` exec.

The shared reader holds one Redis connection whatever the number of followers: one ``XREAD
BLOCK`` over every followed exec's stream, each from the oldest position its followers need,
and over this process's wake-up stream. A follower of a stream not yet read adds to the
wake-up stream, which ends the read in flight (its connection kept: cancelling a blocked read
would cost a reconnection), and the read is made again with the new stream, so a new exec's
output is seen at once; nothing is polled while nothing is printed, and no one following
costs nothing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from .exec_store import ExecStore, decode_record
from .exec_types import ExecRecord, ExecResult, OutputStream
from .hub import frame
from .keys import Keys
from .sse import entry_key

log = logging.getLogger("orchestrator.exec_output")

Entry = tuple[str, dict[bytes, bytes]]
ROUND_MS = 5_000
BATCH = 500
WAKE_TTL_MS = 3_600_000  # a dead process's wake-up stream goes within the hour


class _Follower:
    def __init__(self, after: str) -> None:
        self.after = after
        self.entries: asyncio.Queue[list[Entry]] = asyncio.Queue()


class ExecOutputHub:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._followers: dict[str, set[_Follower]] = defaultdict(set)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[Any] | None = None
        self._reading: frozenset[str] = frozenset()
        # Under exec-output:* (the API's ACL pattern), never an exec's id (those have no '-').
        self._wake_key = keys.exec_output(f"wake-{uuid.uuid4().hex[:16]}")
        self._woken_after = "0-0"

    @contextlib.asynccontextmanager
    async def follow(self, exec_id: str, after: str) -> AsyncIterator[_Follower]:
        follower = _Follower(after)
        self._followers[exec_id].add(follower)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._read())
        elif exec_id not in self._reading and self._inflight is not None and not self._inflight.done():
            await self._interrupt()  # read again, with this stream
        try:
            yield follower
        finally:
            self._followers[exec_id].discard(follower)
            if not self._followers[exec_id]:
                del self._followers[exec_id]

    async def _interrupt(self) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": "1"}, maxlen=16, approximate=False)
                pipe.pexpire(self._wake_key, WAKE_TTL_MS)
                await pipe.execute()
        except Exception as e:  # the read in flight ends by itself within ROUND_MS
            log.warning("exec output reader: could not wake it (%s)", e)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self._redis.delete(self._wake_key)

    async def _read(self) -> None:
        while True:
            if not self._followers:
                self._wake.clear()
                await self._wake.wait()
                continue
            positions: dict[Any, Any] = {
                self._keys.exec_output(exec_id): min((f.after for f in followers), key=entry_key)
                for exec_id, followers in self._followers.items()
            }
            positions[self._wake_key] = self._woken_after
            self._reading = frozenset(self._followers)
            self._inflight = asyncio.ensure_future(self._redis.xread(positions, count=BATCH, block=ROUND_MS))
            try:
                reply: Any = await self._inflight
            except Exception as e:
                log.warning("exec output reader: %s; retrying", e)
                await asyncio.sleep(0.5)
                continue
            for raw_key, entries in reply or []:
                key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
                if key == self._wake_key:  # a new stream to read: the read ended for it
                    last = entries[-1][0]
                    self._woken_after = last.decode() if isinstance(last, bytes) else last
                    continue
                exec_id = key.rsplit(":", 1)[-1]
                decoded = [(i.decode() if isinstance(i, bytes) else i, fields) for i, fields in entries]
                for follower in list(self._followers.get(exec_id, ())):
                    mine = [e for e in decoded if entry_key(e[0]) > entry_key(follower.after)]
                    if mine:
                        follower.after = mine[-1][0]
                        follower.entries.put_nowait(mine)


def chunk_frame(entry_id: str, fields: dict[bytes, bytes]) -> bytes:
    """``event: stdout|stderr``, data ``{"data": text}``, or ``{"base64": ...}`` for bytes that
    are not UTF-8 (the worker never splits a character across chunks)."""
    stream = fields.get(b"s", b"stdout").decode()
    data = fields.get(b"d", b"")
    try:
        body = json.dumps({"data": data.decode()})
    except UnicodeDecodeError:
        body = json.dumps({"base64": base64.b64encode(data).decode()})
    return frame(entry_id, stream, body.encode())


async def output_frames(
    store: ExecStore, hub: ExecOutputHub, exec_id: str, after: str, keepalive_s: float
) -> AsyncIterator[bytes]:
    """The exec's output from ``after`` as SSE frames, live, ending with ``event: exit`` (the
    final record). While nothing comes, a keep-alive comment, and a look at whether its worker
    is gone (then it ends ``worker_lost``)."""
    async with hub.follow(exec_id, after) as follower:
        while True:
            try:
                batch = await asyncio.wait_for(follower.entries.get(), keepalive_s)
            except TimeoutError:
                record = await store.settle(exec_id)
                if record is None:
                    return  # expired meanwhile
                yield b": keep-alive\n\n"
                continue
            for entry_id, fields in batch:
                if b"end" in fields:
                    yield frame(entry_id, "exit", fields[b"end"])
                    return
                yield chunk_frame(entry_id, fields)


async def collect(store: ExecStore, hub: ExecOutputHub, record: ExecRecord, check_s: float = 2.0) -> ExecResult:
    """Wait for the exec's end and return its output with its final record."""
    out: dict[OutputStream, list[bytes]] = {s: [] for s in OutputStream}
    async with hub.follow(record.id, "0-0") as follower:
        while True:
            try:
                batch = await asyncio.wait_for(follower.entries.get(), check_s)
            except TimeoutError:
                await store.settle(record.id)
                continue
            for _, fields in batch:
                if b"end" in fields:
                    final = decode_record(fields[b"end"])
                    return ExecResult(
                        id=final.id,
                        session=final.session,
                        state=final.state,
                        exit_code=final.exit_code,
                        timed_out=final.timed_out,
                        killed=final.killed,
                        truncated=final.truncated,
                        duration_ms=final.duration_ms,
                        stdout=b"".join(out[OutputStream.STDOUT]).decode(errors="replace"),
                        stderr=b"".join(out[OutputStream.STDERR]).decode(errors="replace"),
                        error=final.error,
                    )
                stream = OutputStream(fields.get(b"s", b"stdout").decode())
                out[stream].append(fields.get(b"d", b""))
