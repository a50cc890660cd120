"""The command stream: producers in any language send operations with one ``XADD`` and follow
the answers on the event stream. Consumed by the API processes through one consumer group
(``control``), so each command is handled by one of them; a command a dead process read is
claimed by another (``XAUTOCLAIM``) and handled once.

    XADD <prefix>commands * command '{"op": "exec", "request_id": "r-1", "session": "s-...",
                                      "cmd": ["make", "test"]}'

The same rules as the HTTP API (the same checks, codes and tenancy: the stream is its
tenant's, ``commands`` the default tenant's, ``commands:<tenant>`` another's). Every command
is answered by ``command.accepted`` or ``command.rejected`` (``code``, ``message``) with its
``request_id``; the events that follow from it carry it too. The same ``request_id`` twice acts
once. Ops so far: ``exec`` (the exec request of ``POST /v1/sessions/{id}/exec``)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Annotated, Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .errors import ServiceError
from .events import EventBus, make_event
from .exec_service import ExecService
from .exec_types import ExecRequest
from .keys import Keys
from .names import DEFAULT_TENANT
from .schemas import SessionId

log = logging.getLogger("orchestrator.commands")

GROUP = "control"
BLOCK_MS = 5_000
CLAIM_IDLE_MS = 30_000
DONE_TTL_S = 86_400
MAX_COMMAND_BYTES = 64 * 1024
RequestId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}(?!\n)$")]


class ExecCommand(ExecRequest, tag="exec", tag_field="op", kw_only=True):
    """``op: exec``: run a command in a ready session (the fields of the HTTP exec request)."""

    request_id: RequestId
    session: SessionId


Command = ExecCommand
_decode = msgspec.json.Decoder(Command).decode


def exec_id_for(tenant: str, request_id: str) -> str:
    """The exec a command makes: derived from its request id, so a retry finds the first."""
    return "x" + hashlib.sha256(f"{tenant}\0{request_id}".encode()).hexdigest()[:20]


def _request_id_of(raw: bytes) -> str | None:
    """The request id of a command that does not decode, for its rejection (when readable)."""
    try:
        value = json.loads(raw).get("request_id")
    except (ValueError, AttributeError):
        return None
    return value[:128] if isinstance(value, str) else None


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
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.bus = bus
        self.execs = execs
        self.consumer = consumer
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
        while True:
            if loop.time() - claimed_at > CLAIM_IDLE_MS / 1000 / 2:
                claimed_at = loop.time()
                await self._claim_abandoned()
            reply: Any = await self.redis.xreadgroup(
                GROUP, self.consumer, dict.fromkeys(self.streams, ">"), count=50, block=BLOCK_MS
            )
            for raw_stream, entries in reply or []:
                stream = raw_stream.decode() if isinstance(raw_stream, bytes) else raw_stream
                for entry_id, fields in entries:
                    await self._handle(stream, _text(entry_id), fields or {})

    async def _claim_abandoned(self) -> None:
        for stream in self.streams:
            try:
                reply: Any = await self.redis.xautoclaim(
                    stream, GROUP, self.consumer, min_idle_time=CLAIM_IDLE_MS, start_id="0-0", count=100
                )
            except Exception as e:
                log.warning("could not claim abandoned commands of %s: %s", stream, e)
                continue
            for entry_id, fields in reply[1]:
                if fields is not None:
                    await self._handle(stream, _text(entry_id), fields)

    async def _handle(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
        tenant = self.streams[stream]
        try:
            await self._act(tenant, fields.get(b"command", b""))
        except Exception:
            # Redis away mid-command: left unacknowledged, so it is claimed and handled again
            # (its action is idempotent by its request id).
            log.exception("command %s of %s failed; it will be claimed again", entry_id, stream)
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)  # acknowledged entries are removed; unacknowledged never
            await pipe.execute()

    async def _act(self, tenant: str, raw: bytes) -> None:
        if len(raw) > MAX_COMMAND_BYTES:
            await self._reject(
                tenant, None, None, "command_too_large", f"a command has at most {MAX_COMMAND_BYTES} bytes"
            )
            return
        try:
            command = _decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            code = "invalid_json" if isinstance(e, msgspec.DecodeError) and "JSON" in str(e) else "invalid_request"
            await self._reject(tenant, _request_id_of(raw), None, code, str(e))
            return
        done_key = self.keys.command_done(tenant, command.request_id)
        if await self.redis.exists(done_key):
            return  # handled before (and answered): the same request id acts once
        try:
            created, record = await self.execs.submit(
                command.session,
                command,
                by=f"commands:{tenant}",
                tenant=tenant,
                exec_id=exec_id_for(tenant, command.request_id),
                request_id=command.request_id,
            )
        except ServiceError as e:
            await self._reject(tenant, command.request_id, command.session, e.code, e.message)
            outcome = {"accepted": False, "code": e.code}
        else:
            await self._publish(
                "command.accepted",
                tenant,
                record.session,
                {"request_id": command.request_id, "op": "exec", "exec": record.id, "new": created},
            )
            outcome = {"accepted": True, "exec": record.id}
        await self.redis.set(done_key, json.dumps(outcome), ex=DONE_TTL_S)

    async def _reject(self, tenant: str, request_id: str | None, session: str | None, code: str, message: str) -> None:
        data: dict[str, object] = {"request_id": request_id, "code": code, "message": message[:500]}
        # On the session's stream only when it is the tenant's: a guess at another's id learns nothing.
        visible = session if session and await self.execs.sessions.store.get(session, tenant=tenant) else None
        await self._publish("command.rejected", tenant, visible, data)

    async def _publish(self, type: str, tenant: str, session: str | None, data: dict[str, object]) -> None:
        await self.bus.publish(make_event(type, sandbox="control", session=session, data=data, tenant=tenant))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
