"""Execs in Redis: records, the sandbox's exec stream, leases, kill requests and output.

Every change of a record is a compare-and-set on its exact JSON (one script), so a worker that
finishes an exec and a reader that finds its worker gone never both win: the first one's
version is the one kept, the other sees a changed record and reads it again. An exec that ends
(either way) gets its final record appended to its output stream (``end``), so a reader of the
output needs nothing else to know it is over."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .errors import ServiceError
from .exec_types import ExecErrorInfo, ExecFailure, ExecJob, ExecRecord, ExecState, OutputStream
from .keys import Keys

GROUP = "workers"
LEASE_MS = 10_000
CONTROL_MAXLEN = 1_000
# A queued exec no worker took is failed this long after its timeout would have ended it.
NOT_STARTED_GRACE_S = 30.0

_encode = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(ExecRecord).decode
_decode_job = msgspec.json.Decoder(ExecJob).decode

# KEYS: record, session's unended set, the sandbox's exec stream. ARGV: record, job, the
# session's limit, the record's TTL (s), the key prefix of records (to prune the set).
_SUBMIT_LUA = """
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local raw = redis.call('GET', ARGV[5] .. id)
  if not raw then
    redis.call('SREM', KEYS[2], id)
  else
    local state = cjson.decode(raw)['state']
    if state == 'exited' or state == 'failed' then redis.call('SREM', KEYS[2], id) end
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return 2 end
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[3]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
redis.call('SADD', KEYS[2], cjson.decode(ARGV[1])['id'])
redis.call('XADD', KEYS[3], '*', 'job', ARGV[2])
return 1
"""

# KEYS: record, lease, output, session's unended set. ARGV: the JSON read, the new JSON, mode
# ('start': take the lease; 'end': final, with its TTL), TTL (s), lease holder, '1' if the lease
# must be absent (a reader failing an exec whose worker is gone), lease ms, exec id.
_TRANSITION_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if ARGV[3] == 'start' then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[7])
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[4])
  redis.call('XADD', KEYS[3], '*', 'end', ARGV[2])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  redis.call('SREM', KEYS[4], ARGV[8])
  redis.call('DEL', KEYS[2])
end
return 1
"""

# Renew the leases this worker holds (KEYS), only where it still holds them (ARGV[1]).
_RENEW_LUA = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2]); n = n + 1 end
end
return n
"""


class Conflict(Exception):
    """The record changed under a compare-and-set: read it again."""


class ExecStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, *, keep_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.keep_s = keep_s
        self._submit = redis.register_script(_SUBMIT_LUA)
        self._transition = redis.register_script(_TRANSITION_LUA)
        self._renew = redis.register_script(_RENEW_LUA)

    # -- the API's side ---------------------------------------------------------------------

    async def submit(self, record: ExecRecord, job: ExecJob, sandbox: str, per_session: int) -> bool:
        """Record and queue the exec; False if an exec of that id exists (a command's retry)."""
        keys = [self.keys.exec(record.id), self.keys.session_execs(record.session), self.keys.exec_jobs(sandbox)]
        ttl = int(record.timeout_s + NOT_STARTED_GRACE_S + self.keep_s) + 1
        args: list[bytes | str | int] = [_encode(record), _encode(job), per_session, ttl, self.keys.exec("")]
        outcome = await self._submit(keys=keys, args=args)
        if outcome == 2:
            return False
        if not outcome:
            raise ServiceError(
                429,
                "too_many_execs",
                f"session {record.session} runs {per_session} execs already (ORCH_EXEC_MAX_PER_SESSION)",
            )
        return True

    async def get(self, exec_id: str) -> ExecRecord | None:
        raw = await self.redis.get(self.keys.exec(exec_id))
        return None if raw is None else _decode_record(raw)

    async def request_kill(self, record: ExecRecord) -> None:
        await self.redis.xadd(
            self.keys.exec_control(record.sandbox), {"kill": record.id}, maxlen=CONTROL_MAXLEN, approximate=True
        )

    async def read_output(
        self, exec_id: str, after: str, *, block_ms: int | None, count: int = 200
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        reply: Any = await self.redis.xread({self.keys.exec_output(exec_id): after}, count=count, block=block_ms)
        if not reply:
            return []
        return [(_text(entry_id), fields) for entry_id, fields in reply[0][1]]

    async def output_exists(self, exec_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.exec_output(exec_id)))

    # -- transitions (a compare-and-set on the record's JSON) -------------------------------

    async def _set(
        self,
        old: ExecRecord,
        old_raw: bytes,
        new: ExecRecord,
        *,
        start: bool = False,
        holder: str = "",
        require_no_lease: bool = False,
    ) -> bool:
        keys = [
            self.keys.exec(old.id),
            self.keys.exec_lease(old.id),
            self.keys.exec_output(old.id),
            self.keys.session_execs(old.session),
        ]
        args = [
            old_raw,
            _encode(new),
            "start" if start else "end",
            self.keep_s,
            holder,
            "1" if require_no_lease else "0",
            LEASE_MS,
            old.id,
        ]
        return bool(await self._transition(keys=keys, args=args))

    async def _read(self, exec_id: str) -> tuple[ExecRecord, bytes] | None:
        raw = await self.redis.get(self.keys.exec(exec_id))
        return None if raw is None else (_decode_record(raw), raw)

    async def start(self, exec_id: str, worker: str, now: float) -> ExecRecord | None:
        """Queued → running, with the lease (None if it is not queued: killed, failed, or
        another worker's); a queued exec past its deadline fails ``not_started`` instead."""
        for _ in range(10):
            found = await self._read(exec_id)
            if found is None or found[0].state is not ExecState.QUEUED:
                return None
            record, raw = found
            if now > record.created_at + record.timeout_s:
                await self.fail_if(record.id, (ExecState.QUEUED,), ExecFailure.NOT_STARTED, _late(record), now)
                return None
            running = msgspec.structs.replace(record, state=ExecState.RUNNING, started_at=now, worker=worker)
            if await self._set(record, raw, running, start=True, holder=worker):
                return running
        raise Conflict(exec_id)

    async def finish(self, final: ExecRecord) -> bool:
        """Running → exited or failed by its worker; False if someone ended it first."""
        for _ in range(10):
            found = await self._read(final.id)
            if found is None or found[0].state is not ExecState.RUNNING or found[0].worker != final.worker:
                return False
            if await self._set(found[0], found[1], final):
                return True
        raise Conflict(final.id)

    async def fail_if(
        self,
        exec_id: str,
        states: Sequence[ExecState],
        code: ExecFailure,
        message: str,
        now: float,
        *,
        require_no_lease: bool = False,
    ) -> ExecRecord | None:
        """Fail the exec if it is in one of ``states`` (and, when asked, its lease is gone);
        returns the failed record, or None when it was in another state."""
        for _ in range(10):
            found = await self._read(exec_id)
            if found is None or found[0].state not in states:
                return None
            record, raw = found
            failed = msgspec.structs.replace(
                record,
                state=ExecState.FAILED,
                ended_at=now,
                duration_ms=None if record.started_at is None else int((now - record.started_at) * 1000),
                error=ExecErrorInfo(code=code.value, message=message),
            )
            if await self._set(record, raw, failed, require_no_lease=require_no_lease):
                return failed
            if require_no_lease and await self.redis.exists(self.keys.exec_lease(exec_id)):
                return None  # its worker holds it after all
        raise Conflict(exec_id)

    async def settle(self, exec_id: str, now: float | None = None) -> ExecRecord | None:
        """A reader's check: an exec whose worker is gone (running, no lease) fails
        ``worker_lost``; one no worker took in time fails ``not_started``. The current record."""
        now = time.time() if now is None else now
        record = await self.get(exec_id)
        if record is None or record.state.final:
            return record
        if record.state is ExecState.RUNNING:
            lost = await self.fail_if(
                exec_id,
                (ExecState.RUNNING,),
                ExecFailure.WORKER_LOST,
                f"the worker running it ({record.worker}) stopped holding it; its end is unknown",
                now,
                require_no_lease=True,
            )
            return lost or await self.get(exec_id)
        if now > record.created_at + record.timeout_s + NOT_STARTED_GRACE_S:
            late = await self.fail_if(exec_id, (ExecState.QUEUED,), ExecFailure.NOT_STARTED, _late(record), now)
            return late or await self.get(exec_id)
        return record

    # -- the worker's side ------------------------------------------------------------------

    async def ensure_group(self, sandbox: str) -> None:
        try:
            await self.redis.xgroup_create(self.keys.exec_jobs(sandbox), GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def next_jobs(self, sandbox: str, consumer: str, count: int, block_ms: int) -> list[tuple[str, bytes]]:
        reply: Any = await self.redis.xreadgroup(
            GROUP, consumer, {self.keys.exec_jobs(sandbox): ">"}, count=count, block=block_ms
        )
        return _jobs(reply[0][1] if reply else [])

    async def claim_abandoned(self, sandbox: str, consumer: str, idle_ms: int) -> list[tuple[str, bytes]]:
        """Entries another consumer of the sandbox read and never acknowledged (it died)."""
        reply: Any = await self.redis.xautoclaim(
            self.keys.exec_jobs(sandbox), GROUP, consumer, min_idle_time=idle_ms, start_id="0-0", count=100
        )
        return _jobs(reply[1])

    async def done_with(self, sandbox: str, entry_id: str) -> None:
        """Acknowledged and deleted: the entry holds the exec's env and stdin."""
        stream = self.keys.exec_jobs(sandbox)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    async def append(self, exec_id: str, chunks: Sequence[tuple[OutputStream, bytes]]) -> None:
        if not chunks:
            return
        key = self.keys.exec_output(exec_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, data in chunks:
                pipe.xadd(key, {"s": stream.value, "d": data})
            await pipe.execute()

    async def renew(self, exec_ids: Sequence[str], holder: str) -> int:
        if not exec_ids:
            return 0
        keys = [self.keys.exec_lease(i) for i in exec_ids]
        return int(await self._renew(keys=keys, args=[holder, LEASE_MS]))

    async def control_position(self, sandbox: str) -> str:
        """The id of the newest kill request (where a new reader starts)."""
        last: Any = await self.redis.xrevrange(self.keys.exec_control(sandbox), count=1)
        return _text(last[0][0]) if last else "0-0"

    async def kill_requests(self, sandbox: str, after: str, block_ms: int) -> tuple[str, list[str]]:
        """Kill requests after ``after`` (``$``: from now); the last id read and the exec ids."""
        reply: Any = await self.redis.xread({self.keys.exec_control(sandbox): after}, block=block_ms, count=100)
        if not reply:
            return after, []
        entries = reply[0][1]
        return _text(entries[-1][0]), [_text(fields.get(b"kill", b"")) for _, fields in entries]


def decode_job(raw: bytes) -> ExecJob:
    return _decode_job(raw)


def decode_record(raw: bytes) -> ExecRecord:
    return _decode_record(raw)


def _late(record: ExecRecord) -> str:
    return f"no worker of sandbox {record.sandbox} started it within its timeout ({record.timeout_s:g} s)"


def _jobs(entries: Any) -> list[tuple[str, bytes]]:
    return [(_text(entry_id), fields.get(b"job", b"")) for entry_id, fields in entries or [] if fields is not None]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
