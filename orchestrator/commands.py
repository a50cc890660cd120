"""The command stream: producers in any language send operations with one ``XADD`` and follow
the answers on the event stream. Consumed by the API processes through one consumer group
(``control``), so each command is handled by one of them; a command a dead process read is
claimed by another (``XAUTOCLAIM``) and handled once.

    XADD <prefix>commands * command '{"op": "create", "request_id": "r-1", "labels": {"team": "a"}}'
    XADD <prefix>commands * command '{"op": "exec", "request_id": "r-2", "session": "c-...",
                                      "cmd": ["make", "test"]}'

The same rules as the HTTP API: each op calls the service method its HTTP handler calls
(``Sessions.create|stop|start|delete``, ``ExecService.submit``), so the same checks, codes,
placement and tenancy (the stream is its tenant's: ``commands`` the default tenant's,
``commands:<tenant>`` another's). Every command is answered by ``command.accepted`` or
``command.rejected`` (``code``, ``message``) with its ``request_id``; the events that follow
from it carry it too (``events.command_request``). The same ``request_id`` twice acts once: each
action is idempotent by it (a create names its session after it unless it names one; an exec's
id derives from it), and a handled one is remembered for a day (``command-done``), so a second
is answered again, ``duplicate: true``, without acting."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from . import tracing
from .errors import ServiceError
from .events import EventBus, command_request, command_trace, make_event
from .exec_service import ExecService
from .exec_types import ExecRequest
from .keys import Keys
from .names import DEFAULT_TENANT
from .schemas import SessionCreate, SessionId, SessionRecord, Strict
from .service import Sessions

log = logging.getLogger("orchestrator.commands")

GROUP = "control"
BLOCK_MS = 5_000
# A command read by a consumer that then went silent this long is claimed by another.
CLAIM_IDLE_S = 30.0
# A command older than this when read (its entry id's time) is rejected ``overloaded``.
DEADLINE_S = 300.0
DONE_TTL_S = 86_400
# A consumer (an API process, named per host and pid) idle this long with nothing pending is
# removed from the group: restarts would otherwise leave one behind each time. Removing a live
# one is harmless: Redis makes it again at its next read.
FORGET_CONSUMER_S = 3_600.0
MAX_COMMAND_BYTES = 64 * 1024
RequestId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}(?!\n)$")]


class ExecCommand(ExecRequest, tag="exec", tag_field="op", kw_only=True):
    """``op: exec``: run a command in a ready session (the fields of the HTTP exec request)."""

    request_id: RequestId
    session: SessionId


class CreateCommand(SessionCreate, tag="create", tag_field="op", kw_only=True):
    """``op: create``: the create spec of ``POST /v1/sessions``. ``session`` (optional) is the id;
    without it, the id derives from the request id (``session_id_for``), so a retry finds the
    first. The spec's ``id`` is refused here: a command names its session in ``session``."""

    request_id: RequestId
    session: SessionId | None = None


class _SessionCommand(Strict):
    request_id: RequestId
    session: SessionId


class StopCommand(_SessionCommand, tag="stop", tag_field="op"):
    """``op: stop``: ``POST /v1/sessions/{session}/stop``."""


class StartCommand(_SessionCommand, tag="start", tag_field="op"):
    """``op: start``: ``POST /v1/sessions/{session}/start``."""


class DeleteCommand(_SessionCommand, tag="delete", tag_field="op"):
    """``op: delete``: ``DELETE /v1/sessions/{session}``."""


Command = CreateCommand | StopCommand | StartCommand | DeleteCommand | ExecCommand
OPS = ("create", "stop", "start", "delete", "exec")
_decode = msgspec.json.Decoder(Command).decode
_AT = re.compile(r"- at `\$\.([a-z_]+)|unknown field `([^`]+)`|missing required field `([^`]+)`")


def exec_id_for(tenant: str, request_id: str) -> str:
    """The exec a command makes: derived from its request id, so a retry finds the first."""
    return "x" + hashlib.sha256(f"{tenant}\0{request_id}".encode()).hexdigest()[:20]


def session_id_for(tenant: str, request_id: str) -> str:
    """The session a create command without ``session`` makes: derived from its tenant and
    request id, so a retry (or a second consumer after a crash) finds the first. Its own
    namespace: never an Idempotency-Key's id (``k-``), nor another tenant's."""
    digest = hashlib.sha256(f"command-create\0{tenant}\0{request_id}".encode()).digest()
    return "c-" + base64.b32encode(digest).decode().lower()[:24]


def _readable(raw: bytes) -> dict[str, Any]:
    """What can be read of a command that does not decode, for its rejection."""
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _decode_error(raw: bytes, error: msgspec.DecodeError) -> tuple[str, str | None]:
    """(code, field) for a command that does not decode: precise where the HTTP API is."""
    if not isinstance(error, msgspec.ValidationError):
        return "invalid_json", None
    op = _readable(raw).get("op")
    if op is not None and op not in OPS:
        return "unknown_op", "op"
    match = _AT.search(str(error))
    field = next((g for g in match.groups() if g), None) if match else None
    at = match.group(1) if match else None  # a value there that is wrong (not one missing)
    if at == "session":
        return "invalid_session_id", field  # the code a bad id in an HTTP path gets
    if at == "request_id":
        return "invalid_request_id", field
    return "invalid_request", field


@dataclass(frozen=True)
class StreamLag:
    """The consumer group's view of one command stream (XINFO GROUPS)."""

    lag: int  # entries added and not yet read by any consumer
    pending: int  # read and not yet acknowledged (being handled, or their consumer died)


class CommandConsumer:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        bus: EventBus,
        execs: ExecService,
        *,
        tenants: frozenset[str],
        consumer: str,
        claim_idle_s: float = CLAIM_IDLE_S,
        deadline_s: float = DEADLINE_S,
        forget_after_s: float = FORGET_CONSUMER_S,
        fault: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.bus = bus
        self.execs = execs
        self.sessions: Sessions = execs.sessions
        self.consumer = consumer
        self.claim_idle_ms = max(1, int(claim_idle_s * 1000))
        self.deadline_ms = int(deadline_s * 1000)
        self.forget_after_ms = int(forget_after_s * 1000)
        # Test-only: awaited at "read" (before acting) and "acted" (before the outcome is
        # remembered and the entry acknowledged), where a test kills this consumer.
        self.fault = fault
        self.streams = {keys.commands(t): t for t in sorted({DEFAULT_TENANT, *tenants})}

    async def _ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def run(self) -> None:
        """Until cancelled; a failure (Redis away, its data gone) ends it, and the API's
        supervisor starts it again a second later (the groups made anew)."""
        await self._ensure_groups()
        claimed_at = 0.0
        loop = asyncio.get_running_loop()
        block_ms = min(BLOCK_MS, max(1, self.claim_idle_ms // 2))
        while True:
            if loop.time() - claimed_at > self.claim_idle_ms / 1000 / 2:
                claimed_at = loop.time()
                await self._claim_abandoned()
            reply: Any = await self.redis.xreadgroup(
                GROUP, self.consumer, dict.fromkeys(self.streams, ">"), count=50, block=block_ms
            )
            if not reply:
                continue
            now_ms = await self._now_ms()
            for raw_stream, entries in reply:
                stream = _text(raw_stream)
                for entry_id, fields in entries:
                    await self._handle(stream, _text(entry_id), fields or {}, now_ms)

    async def _now_ms(self) -> int:
        """Redis's clock: entry ids carry its time, so the deadline is immune to this host's skew."""
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def _claim_abandoned(self) -> None:
        for stream in self.streams:
            try:
                reply: Any = await self.redis.xautoclaim(
                    stream, GROUP, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=100
                )
            except Exception as e:
                log.warning("could not claim abandoned commands of %s: %s", stream, e)
                continue
            await self._forget_consumers(stream)
            claimed = [(_text(i), f) for i, f in reply[1] if f is not None]
            if claimed:
                log.warning("claimed %d abandoned commands of %s", len(claimed), stream)
            for entry_id, fields in claimed:
                # No deadline: it was read in time, and may have been acted on before its
                # consumer died; refusing it now would deny what was done.
                await self._handle(stream, entry_id, fields, None)

    async def _forget_consumers(self, stream: str) -> None:
        """Remove the group's idle consumers that hold nothing (``FORGET_CONSUMER_S``)."""
        try:
            consumers: Any = await self.redis.xinfo_consumers(stream, GROUP)
            for name in idle_consumers(consumers, self.consumer, self.forget_after_ms):
                # DELCONSUMER drops a consumer's pending entries too: only when it still holds none.
                await self.redis.xgroup_delconsumer(stream, GROUP, name)
        except ResponseError as e:
            log.warning("could not list the consumers of %s: %s", stream, e)

    async def _handle(self, stream: str, entry_id: str, fields: dict[bytes, bytes], now_ms: int | None) -> None:
        """``now_ms``: Redis's time when the entry was read, for the deadline (None: none)."""
        tenant = self.streams[stream]
        try:
            if self.fault is not None:
                await self.fault("read")
            age_ms = 0 if now_ms is None else _age_ms(entry_id, now_ms)
            await self._act(tenant, fields.get(b"command", b""), age_ms)
        except Exception:
            # Redis away mid-command: left unacknowledged, so it is claimed and handled again
            # (its action is idempotent by its request id).
            log.exception("command %s of %s failed; it will be claimed again", entry_id, stream)
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)  # acknowledged entries are removed; unacknowledged never
            await pipe.execute()

    async def _act(self, tenant: str, raw: bytes, age_ms: int) -> None:
        if len(raw) > MAX_COMMAND_BYTES:
            await self._reject(
                tenant, None, None, "command_too_large", f"a command has at most {MAX_COMMAND_BYTES} bytes"
            )
            return
        try:
            command = _decode(raw)
        except msgspec.DecodeError as e:
            code, field = _decode_error(raw, e)
            readable = _readable(raw)
            request_id, op = readable.get("request_id"), readable.get("op")
            await self._reject(
                tenant,
                request_id[:128] if isinstance(request_id, str) else None,
                op if op in OPS else None,
                code,
                str(e),
                field,
            )
            return
        op = _op(command)
        done_key = self.keys.command_done(tenant, command.request_id)
        done = await self.redis.get(done_key)
        if done is not None:
            # Handled before: answered again, saying so, and nothing is done.
            await self._answer_again(tenant, command.request_id, op, done)
            return
        if self.deadline_ms > 0 and age_ms > self.deadline_ms:
            # Producers outran the fleet: a command this stale is not acted on (docs/jobs.md).
            await self._reject(
                tenant,
                command.request_id,
                op,
                "overloaded",
                f"the command waited {age_ms / 1000:.1f} s, more than {self.deadline_ms / 1000:g} s; send it again",
            )
            return
        # What follows from this command carries its request id: the events made meanwhile
        # (command_request), and the jobs it enqueues (by their trace, command_trace).
        requested = command_request.set(command.request_id)
        traced = tracing.current.set(command_trace(tenant, command.request_id))
        try:
            answer = await self._perform(tenant, command)
        except ServiceError as e:
            session = getattr(command, "session", None)
            await self._reject(tenant, command.request_id, op, e.code, e.message, e.field, session)
            return  # not remembered: a refused command did nothing, and may be sent again
        finally:
            tracing.current.reset(traced)
            command_request.reset(requested)
        if self.fault is not None:
            await self.fault("acted")
        session, data = answer
        data = {"request_id": command.request_id, "op": op, "duplicate": False, **data}
        await self._publish("command.accepted", tenant, session, data)
        await self.redis.set(done_key, json.dumps({"session": session, "data": data}), ex=DONE_TTL_S)

    async def _perform(self, tenant: str, command: Command) -> tuple[str, dict[str, object]]:
        """The action: the service method the HTTP handler calls. (session, what to answer)."""
        rid = command.request_id
        if isinstance(command, ExecCommand):
            created, execution = await self.execs.submit(
                command.session,
                command,
                by=f"commands:{tenant}",
                tenant=tenant,
                exec_id=exec_id_for(tenant, rid),
                request_id=rid,
            )
            return execution.session, {"session": execution.session, "exec": execution.id, "new": created}
        if isinstance(command, CreateCommand):
            derived = None if command.session else session_id_for(tenant, command.request_id)
            created, record = await self.sessions.create(
                _spec_of(command), None, tenant, request_id=rid, derived_id=derived
            )
            return record.id, {**_said(record), "new": created}
        if isinstance(command, StopCommand):
            return _answered(await self.sessions.stop(command.session, tenant, request_id=rid))
        if isinstance(command, StartCommand):
            return _answered(await self.sessions.start(command.session, tenant, request_id=rid))
        return _answered(await self.sessions.delete(command.session, tenant, request_id=rid))

    async def _answer_again(self, tenant: str, request_id: str, op: str, done: bytes) -> None:
        try:
            outcome = json.loads(done)
            session, data = outcome["session"], dict(outcome["data"])
        except (ValueError, KeyError, TypeError):  # an older version's outcome: the essentials
            session, data = None, {"request_id": request_id, "op": op}
        await self._publish("command.accepted", tenant, session, {**data, "duplicate": True})

    async def _reject(
        self,
        tenant: str,
        request_id: str | None,
        op: str | None,
        code: str,
        message: str,
        field: str | None = None,
        session: str | None = None,
    ) -> None:
        data: dict[str, object] = {
            "request_id": request_id,
            "op": op,
            "code": code,
            "message": message[:500],
            "field": field,
        }
        # On the session's stream only when it is the tenant's: a guess at another's id learns nothing.
        visible = session if session and await self.sessions.store.get(session, tenant=tenant) else None
        await self._publish("command.rejected", tenant, visible, data)

    async def _publish(self, type: str, tenant: str, session: str | None, data: dict[str, object]) -> None:
        await self.bus.publish(make_event(type, sandbox="control", session=session, data=data, tenant=tenant))

    async def lag(self) -> dict[str, StreamLag]:
        """Per tenant: the command stream's backlog, as its consumer group sees it (a stream not
        made yet has none)."""
        out = {}
        for stream, tenant in self.streams.items():
            try:
                groups: Any = await self.redis.xinfo_groups(stream)
            except ResponseError:  # no such key: nothing sent yet, nothing waiting
                out[tenant] = StreamLag(lag=0, pending=0)
                continue
            group: dict[str, Any] = next((g for g in groups if _text(g.get("name", b"")) == GROUP), {})
            # lag is null when Redis cannot tell (entries deleted mid-range): count then what is there.
            lag = group.get("lag")
            if lag is None:
                lag = max(0, await self.redis.xlen(stream) - int(group.get("pending", 0)))
            out[tenant] = StreamLag(lag=int(lag), pending=int(group.get("pending", 0)))
        return out


def idle_consumers(consumers: list[dict[Any, Any]], me: str, idle_ms: int) -> list[str]:
    """From XINFO CONSUMERS: the names of the others idle at least ``idle_ms`` with nothing pending."""
    out = []
    for consumer in consumers:
        name = _text(consumer.get("name", b""))
        if name and name != me and int(consumer.get("pending", 1)) == 0 and int(consumer.get("idle", 0)) >= idle_ms:
            out.append(name)
    return out


def _op(command: Command) -> str:
    op = type(command).__struct_config__.tag
    assert isinstance(op, str)
    return op


def _spec_of(command: CreateCommand) -> SessionCreate:
    """The create request of ``command``: its spec, with the id it names (None: derived from
    its request id by the caller, which a warm desktop may serve)."""
    if command.id is not None:
        raise ServiceError(
            400, "invalid_request", "a create command names its session in `session`, not `id`", field="id"
        )
    fields = {f: getattr(command, f) for f in SessionCreate.__struct_fields__ if f != "id"}
    return SessionCreate(id=command.session, **fields)


def _said(record: SessionRecord) -> dict[str, object]:
    return {"session": record.id, "state": record.state.value, "sandbox": record.sandbox or None}


def _answered(record: SessionRecord) -> tuple[str, dict[str, object]]:
    return record.id, _said(record)


def _age_ms(entry_id: str, now_ms: int) -> int:
    """How long ago the entry was added (its id's milliseconds), by Redis's clock."""
    try:
        return max(0, now_ms - int(entry_id.partition("-")[0]))
    except ValueError:
        return 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
