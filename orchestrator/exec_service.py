"""Starting an exec, the same for the HTTP API and the command stream: the request's checks,
the session's (ready, the caller's tenant's), then the record and the job in one script."""

from __future__ import annotations

import base64
import time

from .config import ApiSettings
from .errors import ServiceError
from .exec_store import ExecStore
from .exec_types import (
    ExecJob,
    ExecLimits,
    ExecRecord,
    ExecRequest,
    ExecState,
    check_limits,
    exec_argv,
    exec_stdin,
    new_exec_id,
)
from .service import Sessions
from .states import SessionState


class ExecService:
    def __init__(self, store: ExecStore, sessions: Sessions, settings: ApiSettings) -> None:
        self.store = store
        self.sessions = sessions
        self.settings = settings
        self.limits = ExecLimits(
            max_timeout_s=settings.exec_max_timeout_s,
            max_output_bytes=settings.exec_max_output_bytes,
            max_stdin_bytes=settings.exec_max_stdin_bytes,
        )

    async def submit(
        self,
        session_id: str,
        request: ExecRequest,
        *,
        by: str,
        tenant: str | None,
        exec_id: str | None = None,
        request_id: str | None = None,
    ) -> tuple[bool, ExecRecord]:
        """(created, record). ``tenant``: the one whose sessions the caller sees (None: all).
        An ``exec_id`` given twice makes one exec: the second call gets the first's record."""
        argv = exec_argv(request)
        stdin = exec_stdin(request, self.limits)
        check_limits(request, self.limits)
        if exec_id is not None:
            existing = await self.store.get(exec_id)
            if existing is not None:
                return False, existing
        session = await self.sessions.get(session_id, tenant)
        if session.state is not SessionState.READY or session.sandbox is None:
            raise ServiceError(
                409, "session_not_ready", f"session {session_id} is {session.state.value}; execs run in ready sessions"
            )
        record = ExecRecord(
            id=exec_id or new_exec_id(),
            session=session_id,
            sandbox=session.sandbox,
            state=ExecState.QUEUED,
            by=by,
            tenant=session.tenant,
            request_id=request_id,
            created_at=time.time(),
            timeout_s=request.timeout_s,
            max_output_bytes=request.max_output_bytes,
        )
        job = ExecJob(
            id=record.id,
            session=session_id,
            argv=argv,
            env=dict(request.env),
            cwd=request.cwd,
            user=request.user,
            stdin_base64=base64.b64encode(stdin).decode(),
            timeout_s=request.timeout_s,
            max_output_bytes=request.max_output_bytes,
        )
        if not await self.store.submit(record, job, session.sandbox, self.settings.exec_max_per_session):
            existing = await self.store.get(record.id)
            if existing is not None:
                return False, existing
        return True, record
