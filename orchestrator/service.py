"""What the API does, apart from HTTP: validated requests in, records and jobs out."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import re
import time
from typing import Any

import msgspec

from . import states
from .config import ApiSettings
from .errors import ServiceError
from .events import make_event
from .names import DEFAULT_TENANT, SANDBOX_ID_RE, is_valid_session_id
from .placement import NoCapacity, NoSandbox, Unsatisfiable, eligible, low_disk, resource_problem
from .queue import JobQueue, Operation
from .records import new_record
from .sandboxes import SandboxRegistry
from .schemas import (
    DisplaySize,
    DrainRequest,
    Resources,
    SandboxInfo,
    SandboxRetired,
    SessionCreate,
    SessionRecord,
)
from .states import SandboxStatus, SessionState
from .store import QuotaExceeded, SessionNotFound, SessionStore

log = logging.getLogger("orchestrator.service")
S = SessionState


def check_session_id(session_id: str) -> None:
    if not is_valid_session_id(session_id):
        raise ServiceError(
            400,
            "invalid_session_id",
            f"session id {session_id[:80]!r} is invalid: it must match ^[a-z0-9][a-z0-9-]{{2,62}}$",
            field="id",
        )


def warm_eligible(request: SessionCreate) -> bool:
    """Whether a warm desktop can serve ``request`` (from its flavor's pool): pooled desktops
    are made ahead with the sandbox's defaults and their own pre-chosen id, so a request that
    names its id, sets env or resources, preloads images or asks for a screen of another size
    than the default is made cold. (An id derived from an Idempotency-Key or a
    command's request id is no name: a warm desktop serves it, and the id leads there.)"""
    no_limits = request.resources is None or request.resources == Resources()
    # Each flavor has its pool (workers/pool.py); graphical ones have the default screen.
    default_screen = request.display is None or request.display == DisplaySize()
    return request.id is None and not request.env and no_limits and not request.preload_images and default_screen


def _with_ids(record: SessionRecord, request_id: str | None, derived_id: str | None) -> SessionRecord:
    if derived_id is not None:
        return msgspec.structs.replace(record, id=derived_id, request_id=request_id)
    return msgspec.structs.replace(record, request_id=request_id)


def _caps(sandboxes: list[SandboxInfo]) -> str:
    return ", ".join(f"{s.id}: {s.placed}/{s.capacity}" for s in sandboxes)


IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,200}$")


def id_from_idempotency_key(key: str, tenant: str = DEFAULT_TENANT) -> str:
    """A retried create with the same Idempotency-Key names the same session: the tenant's
    own. The key is namespaced by the tenant, so two tenants' clients using the same key never
    share a session (nor learn that the other used it). The default tenant's ids are those of
    before tenancy (the key alone): a retry across the upgrade still finds its session. The
    two never collide: a key holds no NUL."""
    if not IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise ServiceError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 200 visible ASCII characters",
            field="Idempotency-Key",
        )
    material = key if tenant == DEFAULT_TENANT else f"{tenant}\0{key}"
    digest = base64.b32encode(hashlib.sha256(material.encode()).digest()).decode().lower()
    return "k-" + digest[:24]


class Sessions:
    """What the API does with sessions (and the sandboxes they are placed on), apart from HTTP."""

    def __init__(self, store: SessionStore, queue: JobQueue, sandboxes: SandboxRegistry, settings: ApiSettings) -> None:
        self.store = store
        self.queue = queue
        self.registry = sandboxes
        self.settings = settings
        self.capacity_refusals = 0

    async def sandboxes(self) -> list[SandboxInfo]:
        return await self.registry.list()

    async def create(
        self,
        request: SessionCreate,
        idempotency_key: str | None = None,
        tenant: str = DEFAULT_TENANT,
        request_id: str | None = None,
        derived_id: str | None = None,
    ) -> tuple[bool, SessionRecord]:
        """Returns (created, record): ``tenant``'s new session. The same id (or Idempotency-Key)
        with the same spec returns the existing session instead of making another. Raises
        ServiceError 429 ``quota_exceeded`` when the tenant holds ORCH_TENANT_MAX_SESSIONS.
        ``request_id``: the command's that asks (commands.py), kept on a new record.
        ``derived_id``: the id a retry of this create names too (a command's), when the request
        names none. A derived id (or an Idempotency-Key's) may be served by a warm desktop: the
        session then has the desktop's id, and the derived id leads to it (keys.session_alias)."""
        if request.id is None and idempotency_key is not None:
            derived_id = id_from_idempotency_key(idempotency_key, tenant)
        if request.id is not None:
            derived_id = None
        try:
            return await self._create(request, tenant, request_id, derived_id)
        except QuotaExceeded as e:
            # At the quota: unless the count held leftovers (store.PRUNE_LUA), that is the answer.
            if not await self.store.prune_tenant(tenant):
                raise ServiceError(429, "quota_exceeded", str(e)) from None
        try:
            return await self._create(request, tenant, request_id, derived_id)
        except QuotaExceeded as e:
            raise ServiceError(429, "quota_exceeded", str(e)) from None

    async def _create(
        self, request: SessionCreate, tenant: str, request_id: str | None, derived_id: str | None
    ) -> tuple[bool, SessionRecord]:
        quota = self.settings.tenant_max_sessions
        known = await self.sandboxes()
        default = self.settings.default_sandbox
        fallback = (
            default is not None
            and not any(s.status is SandboxStatus.AVAILABLE for s in known)
            and request.sandbox in (None, default)
            and not request.constraints
        )
        if fallback and default is not None and await self.registry.is_retired(default):
            fallback = False  # retired: it will never take these jobs (placement refuses below)
        if fallback:
            # Nothing has reported yet (say, make up's worker starts after the API): the
            # configured default's queue holds the job until that worker comes up. No cap is
            # known, so none is applied.
            assert default is not None
            problem = resource_problem(
                request.resources, self.settings.max_cpus, self.settings.max_memory_mb, self.settings.max_pids
            )
            if problem:
                raise ServiceError(422, "resources_exceed_sandbox", problem[1], field=problem[0])
            record = _with_ids(new_record(request, default, self.settings, tenant), request_id, derived_id)
            created, stored = await self.store.create(record, request.env, quota=quota)
            return await self._after_create(request, tenant, created, stored, warm=False)
        try:
            candidates = eligible(known, request.sandbox, request.constraints)
        except Unsatisfiable as e:
            code = "unknown_sandbox" if e.field == "sandbox" else "unsatisfiable_constraints"
            raise ServiceError(422, code, str(e), field=e.field) from None
        except NoSandbox as e:
            raise ServiceError(503, "no_sandbox", str(e)) from None
        problems = [resource_problem(request.resources, s.max_cpus, s.max_memory_mb, s.max_pids) for s in candidates]
        fitting = [s for s, p in zip(candidates, problems, strict=True) if p is None]
        if not fitting:
            field, message = next(p for p in problems if p is not None)
            raise ServiceError(422, "resources_exceed_sandbox", message, field=field)
        # Below its free-disk watermark, a sandbox is as good as full: placement skips it, and a
        # refusal has the same code, its message saying which are low and by how much.
        low = {s.id: why for s in fitting if (why := low_disk(s)) is not None}
        low_note = f"; low on disk: {'; '.join(low.values())}" if low else ""
        record = _with_ids(new_record(request, "", self.settings, tenant), request_id, derived_id)
        try:
            placed = await self.store.place(
                record,
                request.env,
                [(s.id, s.capacity) for s in fitting],
                prefer_warm=warm_eligible(request),
                aliased=derived_id is not None,
                quota=quota,
                low_disk=low.keys(),
            )
        except NoCapacity as e:
            self.capacity_refusals += 1
            raise ServiceError(503, "no_capacity", f"{e} ({_caps(fitting)}{low_note})") from None
        except NoSandbox as e:
            raise ServiceError(503, "no_sandbox", str(e)) from None
        return await self._after_create(request, tenant, placed.created, placed.record, warm=placed.warm)

    async def _after_create(
        self, request: SessionCreate, tenant: str, created: bool, stored: SessionRecord, *, warm: bool
    ) -> tuple[bool, SessionRecord]:
        if not created:
            if stored.tenant != tenant:
                # Session ids are one namespace (they name desktops and volumes), so a client's
                # chosen id that another tenant holds cannot be made: 409, saying only that the
                # id is taken (never whose, its spec or its state), and nothing is enqueued.
                # (Idempotency-Key ids are per tenant and never land here.)
                raise ServiceError(409, "session_exists", f"session id {stored.id!r} is taken; choose another", "id")
            expected = new_record(request, stored.sandbox, self.settings).spec
            if stored.spec != expected or (request.sandbox is not None and stored.sandbox != request.sandbox):
                raise ServiceError(
                    409, "session_exists", f"session {stored.id!r} exists with a different spec", field="id"
                )
            if stored.state is S.PENDING:  # the earlier create may have died before enqueueing
                await self._enqueue(Operation.CREATE, stored)
            return False, stored
        if not warm:
            await self._enqueue(Operation.CREATE, stored)
        return True, stored

    async def sandbox(self, sandbox_id: str) -> SandboxInfo:
        if not SANDBOX_ID_RE.fullmatch(sandbox_id):
            raise ServiceError(400, "invalid_sandbox_id", f"sandbox id {sandbox_id[:80]!r} is invalid", field="id")
        info = await self.registry.get(sandbox_id)
        if info is not None:
            return info
        raise ServiceError(404, "sandbox_not_found", f"sandbox {sandbox_id!r} is unknown")

    async def drain(self, sandbox_id: str, stop_desktops: bool) -> SandboxInfo:
        """Ask a sandbox to drain: placement skips it at once (the key); its worker, within a
        second, finishes its jobs, optionally stops its desktops, says ``sandbox.drained`` and
        exits. It stays drained (idle if restarted) until undrained."""
        info = await self.sandbox(sandbox_id)
        await self.registry.request_drain(info.id, DrainRequest(by="api", stop_desktops=stop_desktops))
        return await self.sandbox(info.id)

    async def undrain(self, sandbox_id: str) -> SandboxInfo:
        info = await self.sandbox(sandbox_id)
        await self.registry.clear_drain(info.id)
        return await self.sandbox(info.id)

    async def retire(self, sandbox_id: str) -> SandboxRetired:
        """For a sandbox that will never return (say, ``make up`` gave it a new id): refused
        (409 ``sandbox_live``) while it beats. Its keys go, later heartbeats are refused, and
        each of its sessions is deleted (``reason: sandbox_retired``, ``volume_removed: false``):
        its desktop and volume lived there, so nothing can recover it. Deleted, not failed: a
        requested delete must complete (it never turns into a failure), and a failed session
        would hold its place and be listed forever. Asking again finishes an interrupted one."""
        if not SANDBOX_ID_RE.fullmatch(sandbox_id):
            raise ServiceError(400, "invalid_sandbox_id", f"sandbox id {sandbox_id[:80]!r} is invalid", field="id")
        mine = [r for r in await self.store.list() if r.sandbox == sandbox_id]
        if not mine and not await self.registry.known(sandbox_id):
            raise ServiceError(404, "sandbox_not_found", f"sandbox {sandbox_id!r} is unknown")
        if not await self.registry.retire(sandbox_id):
            raise ServiceError(
                409, "sandbox_live", f"sandbox {sandbox_id!r} is live: drain it (or wait until it is unavailable) first"
            )
        ended = [r.id for r in mine if await self._end_retired(r)]
        await self.registry.forget_placed(sandbox_id)
        log.warning("sandbox %s retired: %d sessions deleted (volumes left on it)", sandbox_id, len(ended))
        event = make_event("sandbox.retired", sandbox=sandbox_id, data={"sessions": len(ended)})
        await self.store.bus.publish(event)
        return SandboxRetired(id=sandbox_id, sessions=ended)

    async def _end_retired(self, record: SessionRecord) -> bool:
        """deleting (unless it is) then deleted, each with its event; False if it went meanwhile."""
        why = {"reason": "sandbox_retired"}
        try:
            if record.state is not S.DELETING:
                with contextlib.suppress(states.TransitionError):  # a delete got there first
                    await self.store.transition(record.id, S.DELETING, event_data=why)
            await self.store.transition(record.id, S.DELETED, event_data={**why, "volume_removed": False})
        except SessionNotFound:
            return False
        return True

    # ``tenant`` below: the caller's visible tenant, None for every tenant (admin). Another
    # tenant's session is 404 ``session_not_found`` with the very answer an unknown id gets,
    # so no reply tells a tenant that an id exists elsewhere.

    async def get(self, session_id: str, tenant: str | None = None) -> SessionRecord:
        check_session_id(session_id)
        record = await self.store.get(session_id, tenant=tenant)
        if record is None:
            raise ServiceError(404, "session_not_found", f"session {session_id!r} does not exist")
        return record

    async def list(
        self, state: SessionState | None, labels: dict[str, str], tenant: str | None = None
    ) -> list[SessionRecord]:
        return [
            r
            for r in await self.store.list(tenant=tenant)
            if (state is None or r.state is state) and all(r.spec.labels.get(k) == v for k, v in labels.items())
        ]

    # ``request_id``: the command's that asks (commands.py; None for HTTP), kept on the record
    # it moves, so the jobs it enqueues tell their events (events.command_request_of).

    async def stop(self, session_id: str, tenant: str | None = None, request_id: str | None = None) -> SessionRecord:
        record = await self.get(session_id, tenant)
        if record.state is S.STOPPED:  # already where the caller wants it
            return record
        if record.state is not S.STOPPING:
            record = await self._transition(record, S.STOPPING, "stop", tenant, request_id=request_id)
        await self._enqueue(Operation.STOP, record)
        return record

    async def start(self, session_id: str, tenant: str | None = None, request_id: str | None = None) -> SessionRecord:
        record = await self.get(session_id, tenant)
        if record.state in (S.STARTING, S.READY):
            return record
        # A (re)start is a new incarnation: late jobs of the old one must not touch it.
        record = await self._transition(
            record, S.STARTING, "start", tenant, bump_generation=True, request_id=request_id
        )
        await self._enqueue(Operation.START, record)
        return record

    async def delete(self, session_id: str, tenant: str | None = None, request_id: str | None = None) -> SessionRecord:
        record = await self.get(session_id, tenant)
        if record.state is not S.DELETING:
            record = await self._transition(record, S.DELETING, "delete", tenant, request_id=request_id)
        await self._enqueue(Operation.DELETE, record)
        return record

    async def _transition(
        self,
        record: SessionRecord,
        target: SessionState,
        verb: str,
        tenant: str | None,
        bump_generation: bool = False,
        request_id: str | None = None,
    ) -> SessionRecord:
        def changes(r: SessionRecord) -> dict[str, Any]:
            # The asker's request id, or none (an HTTP request): never an earlier command's.
            out: dict[str, Any] = {"request_id": request_id}
            if bump_generation:
                ttl = r.spec.ttl_seconds
                out.update(generation=r.generation + 1, expires_at=time.time() + ttl if ttl else None)
            return out

        try:
            # The tenant again: the id may have been deleted and made anew by another since the read.
            return await self.store.transition(record.id, target, mutate=changes, tenant=tenant)
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
            # The exception (hosts, Redis errors) stays in the log; the caller learns what failed.
            raise ServiceError(
                503, "queue_unavailable", f"could not enqueue {operation.verb} (the record is kept; retry)"
            ) from e
