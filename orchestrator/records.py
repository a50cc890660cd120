"""Making session records: the one place a create request becomes a `pending` record
(the API's creates and a producer's create job alike)."""

from __future__ import annotations

import time

import msgspec

from .config import SharedSettings
from .names import DEFAULT_TENANT, new_session_id
from .schemas import (
    SessionCreate,
    SessionRecord,
    SessionSpec,
    StoredDisplaySize,
    StoredResources,
    TtlAction,
    now_rfc3339,
)
from .states import SessionState


def new_record(
    request: SessionCreate, sandbox: str, settings: SharedSettings, tenant: str = DEFAULT_TENANT
) -> SessionRecord:
    """The `pending` record ``request`` makes on ``sandbox`` for ``tenant`` (a producer's create
    job names none: the default tenant), with the configured TTL defaults."""
    ttl = request.ttl_seconds if request.ttl_seconds is not None else settings.default_ttl_s
    default_action: TtlAction = "delete" if settings.default_ttl_action == "delete" else "stop"
    spec = SessionSpec(
        labels=request.labels,
        resources=msgspec.convert(msgspec.to_builtins(request.resources), StoredResources),
        env_keys=sorted(request.env),
        ttl_seconds=ttl or None,
        ttl_action=request.ttl_action or default_action,
        preload_images=request.preload_images,
        constraints=request.constraints,
        flavor=request.flavor,
        display=_display(request),
    )
    now = now_rfc3339()
    return SessionRecord(
        id=request.id or new_session_id(),
        state=SessionState.PENDING,
        generation=1,
        sandbox=sandbox,
        spec=spec,
        created_at=now,
        updated_at=now,
        expires_at=time.time() + ttl if ttl else None,
        tenant=tenant,
    )


def _display(request: SessionCreate) -> StoredDisplaySize | None:
    if request.flavor != "graphical":
        return None
    size = request.display
    return StoredDisplaySize() if size is None else StoredDisplaySize(width=size.width, height=size.height)
