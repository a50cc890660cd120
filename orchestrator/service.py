"""What the API does, apart from HTTP: validated requests in, records and jobs out."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from typing import Any

import msgspec
import redis.asyncio as aioredis

from . import states
from .config import Settings
from .names import Keys, is_valid_session_id, new_session_id
from .placement import NoSandbox, choose_sandbox, resource_problem
from .queue import JobQueue, Operation
from .schemas import Resources, SandboxInfo, SessionCreate, SessionRecord, SessionSpec, TtlAction, now_rfc3339
from .states import SessionState
from .store import SessionNotFound, SessionStore

log = logging.getLogger("orchestrator.service")
S = SessionState

_decode_sandbox = msgspec.json.Decoder(SandboxInfo).decode


class ServiceError(Exception):
    """A refusal with an HTTP status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


def check_session_id(session_id: str) -> None:
    if not is_valid_session_id(session_id):
        raise ServiceError(
            400,
            "invalid_session_id",
            f"session id {session_id[:80]!r} is invalid: it must match ^[a-z0-9][a-z0-9-]{{2,62}}$",
            field="id",
        )


def new_record(request: SessionCreate, sandbox: str, settings: Settings) -> SessionRecord:
    """The `pending` record a create request makes (the API's, or a job's from another producer)."""
    ttl = request.ttl_seconds if request.ttl_seconds is not None else settings.default_ttl_s
    default_action: TtlAction = "delete" if settings.default_ttl_action == "delete" else "stop"
    spec = SessionSpec(
        labels=request.labels,
        resources=request.resources,
        env_keys=sorted(request.env),
        ttl_seconds=ttl or None,
        ttl_action=request.ttl_action or default_action,
        preload_images=request.preload_images,
    )
    now = now_rfc3339()
    return SessionRecord(
        id=request.id or new_session_id(),
        state=S.PENDING,
        generation=1,
        sandbox=sandbox,
        spec=spec,
        created_at=now,
        updated_at=now,
        expires_at=time.time() + ttl if ttl else None,
    )


def warm_eligible(request: SessionCreate) -> bool:
    """Whether a warm desktop can serve ``request``: pooled desktops are made ahead with the
    sandbox's defaults and their own pre-chosen id, so a request that names its id (or derives
    it from an Idempotency-Key), sets env or resources, or preloads images is made cold."""
    no_limits = request.resources is None or request.resources == Resources()
    return request.id is None and not request.env and no_limits and not request.preload_images


IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,200}$")


def id_from_idempotency_key(key: str) -> str:
    """A retried create with the same Idempotency-Key names the same session."""
    if not IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise ServiceError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 200 visible ASCII characters",
            field="Idempotency-Key",
        )
    digest = base64.b32encode(hashlib.sha256(key.encode()).digest()).decode().lower()
    return "k-" + digest[:24]


class Sessions:
    def __init__(
        self, store: SessionStore, queue: JobQueue, redis: aioredis.Redis, keys: Keys, settings: Settings
    ) -> None:
        self.store = store
        self.queue = queue
        self._redis = redis
        self.keys = keys
        self.settings = settings

    async def sandboxes(self) -> list[SandboxInfo]:
        ids = sorted(i.decode() for i in await self._redis.smembers(self.keys.sandbox_index))  # type: ignore[misc]
        if not ids:
            return []
        raws = await self._redis.mget([self.keys.sandbox(i) for i in ids])
        return [_decode_sandbox(raw) for raw in raws if raw is not None]

    async def create(self, request: SessionCreate, idempotency_key: str | None = None) -> tuple[bool, SessionRecord]:
        """Returns (created, record). The same id (or Idempotency-Key) with the same spec
        returns the existing session instead of making another."""
        if request.id is None and idempotency_key is not None:
            request = msgspec.structs.replace(request, id=id_from_idempotency_key(idempotency_key))
        live = await self.sandboxes()
        try:
            sandbox = choose_sandbox(live, request.sandbox, self.settings.default_sandbox)
        except NoSandbox as e:
            raise ServiceError(503, "no_sandbox", str(e)) from None
        # Check limits against the chosen sandbox's own maximums when it has reported them.
        info = next((s for s in live if s.id == sandbox), None)
        problem = resource_problem(
            request.resources,
            info.max_cpus if info else self.settings.max_cpus,
            info.max_memory_mb if info else self.settings.max_memory_mb,
            info.max_pids if info else self.settings.max_pids,
        )
        if problem:
            raise ServiceError(422, "resources_exceed_sandbox", problem[1], field=problem[0])
        record = new_record(request, sandbox, self.settings)
        if warm_eligible(request):
            warm = await self.store.claim_warm(record)
            if warm is not None:
                return True, warm
        created, stored = await self.store.create(record, request.env)
        if not created:
            if stored.spec != record.spec or (request.sandbox is not None and stored.sandbox != request.sandbox):
                raise ServiceError(
                    409, "session_exists", f"session {stored.id!r} exists with a different spec", field="id"
                )
            if stored.state is S.PENDING:  # the earlier create may have died before enqueueing
                await self._enqueue(Operation.CREATE, stored)
            return False, stored
        await self._enqueue(Operation.CREATE, record)
        return True, record

    async def get(self, session_id: str) -> SessionRecord:
        check_session_id(session_id)
        record = await self.store.get(session_id)
        if record is None:
            raise ServiceError(404, "session_not_found", f"session {session_id!r} does not exist")
        return record

    async def list(self, state: SessionState | None, labels: dict[str, str]) -> list[SessionRecord]:
        return [
            r
            for r in await self.store.list()
            if (state is None or r.state is state) and all(r.spec.labels.get(k) == v for k, v in labels.items())
        ]

    async def stop(self, session_id: str) -> SessionRecord:
        record = await self.get(session_id)
        if record.state is S.STOPPED:  # already where the caller wants it
            return record
        if record.state is not S.STOPPING:
            record = await self._transition(record, S.STOPPING, "stop")
        await self._enqueue(Operation.STOP, record)
        return record

    async def start(self, session_id: str) -> SessionRecord:
        record = await self.get(session_id)
        if record.state in (S.STARTING, S.READY):
            return record
        # A (re)start is a new incarnation: late jobs of the old one must not touch it.
        record = await self._transition(record, S.STARTING, "start", bump_generation=True)
        await self._enqueue(Operation.START, record)
        return record

    async def delete(self, session_id: str) -> SessionRecord:
        record = await self.get(session_id)
        if record.state is not S.DELETING:
            record = await self._transition(record, S.DELETING, "delete")
        await self._enqueue(Operation.DELETE, record)
        return record

    async def _transition(
        self, record: SessionRecord, target: SessionState, verb: str, bump_generation: bool = False
    ) -> SessionRecord:
        def restart(r: SessionRecord) -> dict[str, Any]:
            ttl = r.spec.ttl_seconds
            return {"generation": r.generation + 1, "expires_at": time.time() + ttl if ttl else None}

        try:
            return await self.store.transition(record.id, target, mutate=restart if bump_generation else None)
        except states.TransitionError as e:
            raise ServiceError(
                409, "invalid_state", f"cannot {verb} session {record.id!r} while it is {e.current.value}"
            ) from None
        except SessionNotFound:
            raise ServiceError(404, "session_not_found", f"session {record.id!r} does not exist") from None

    async def _enqueue(self, operation: Operation, record: SessionRecord) -> None:
        try:
            await self.queue.enqueue(operation, record.sandbox, record.id, record.generation)
        except Exception as e:
            # The record says what should happen; the reconciler re-enqueues from it.
            log.exception("enqueueing %s for %s failed", operation.value, record.id)
            raise ServiceError(503, "queue_unavailable", f"could not enqueue {operation.value}: {e}") from e
