"""What a desktop is made of, pure: its labels, its own variables, its container's
configuration, and how the reconciler's listings read Docker's answers back. No I/O: the
daemon's side is desktops.py (containers) and volumes.py (volumes)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from aiodocker.containers import DockerContainer

from orchestrator.names import (
    LABEL_DEPTH,
    LABEL_GENERATION,
    LABEL_ROLE,
    LABEL_SANDBOX,
    LABEL_SESSION,
    desktop_name,
    volume_name,
)
from orchestrator.schemas import DisplaySize, Resources

from ..privilege import PrivilegeProfile
from .display import display_env
from .port import DockerObject


def socket_path(socket_dir: str, session_id: str) -> str:
    """Where the desktop's dockerd socket appears on the worker's side."""
    return os.path.join(socket_dir, session_id, "docker.sock")


def desktop_labels(sandbox_id: str, depth: int, session_id: str, generation: int | None = None) -> dict[str, str]:
    """The labels of a session's desktop and volume; ``depth`` is the sandbox's (desktops
    run at depth + 1)."""
    labels = {
        LABEL_SESSION: session_id,
        LABEL_SANDBOX: sandbox_id,
        LABEL_DEPTH: str(depth + 1),
        LABEL_ROLE: "desktop",
    }
    if generation is not None:
        labels[LABEL_GENERATION] = str(generation)
    return labels


def own_env(depth: int, session_id: str, display: DisplaySize | None = None) -> dict[str, str]:
    """The orchestrator's own variables (not secret): the container's ``Env``. They win over a
    session's variables of the same name, which are left out of the session's env file.
    ``display``: a graphical desktop's screen (display.py)."""
    return {
        "ORCH_DEPTH": str(depth + 1),
        "ORCH_SESSION": session_id,
        "ORCH_EXTERNAL_SOCKET": "/run/orchestrator/docker.sock",
        **display_env(display),
    }


def container_config(
    session_id: str,
    *,
    image: str,
    network: str,
    socket_dir: str,
    labels: dict[str, str],
    variables: Mapping[str, str],
    profile: PrivilegeProfile,
    resources: Resources | None = None,
    userns_slot: int | None = None,
) -> dict[str, Any]:
    """The container's configuration. It never holds the session's env: that goes into a
    file in the container (``DockerDesktops.deliver_env``), so ``docker inspect`` shows none
    of it. ``variables``: the orchestrator's own (``own_env``)."""
    sockets = os.path.dirname(socket_path(socket_dir, session_id))
    host_config: dict[str, Any] = {
        "Binds": [f"{volume_name(session_id)}:/var/lib/docker", f"{sockets}:/run/orchestrator"],
        "NetworkMode": network,
        # Back by itself when the sandbox's dockerd restarts; a desktop that stops otherwise is
        # restarted by the reconciler (bounded) or its session fails (desktop_lost).
        "RestartPolicy": {"Name": "unless-stopped"},
        "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}},
        **profile.host_config(),
        **_limits(resources),
    }
    env = [f"{k}={v}" for k, v in variables.items()] + profile.desktop_env(userns_slot)
    return {
        "Image": image,
        "Hostname": desktop_name(session_id)[:63],
        "Env": env,
        "Labels": labels,
        "HostConfig": host_config,
    }


def _limits(resources: Resources | None) -> dict[str, int]:
    limits: dict[str, int] = {}
    if resources is None:
        return limits
    if resources.cpus is not None:
        limits["NanoCpus"] = int(resources.cpus * 1e9)
    if resources.memory_mb is not None:
        limits["Memory"] = resources.memory_mb * 1024 * 1024
    if resources.pids is not None:
        limits["PidsLimit"] = resources.pids
    return limits


def generation_of(labels: dict[str, str]) -> int | None:
    raw = labels.get(LABEL_GENERATION, "")
    return int(raw) if raw.isdigit() else None


def desktop_object(container: DockerContainer) -> DockerObject:
    # The listing's fields of the container (DockerContainer has no .get()).
    info = {key: container[key] for key in ("Labels", "Names", "State", "Created") if key in container}
    labels = info.get("Labels") or {}
    return DockerObject(
        kind="desktop",
        name=(info.get("Names") or ["/?"])[0].lstrip("/"),
        session=labels.get(LABEL_SESSION, ""),
        generation=generation_of(labels),
        # Restarting: the daemon's restart policy is bringing it back (its own backoff); the
        # reconciler must not start it too, nor spend its restart budget on it.
        running=info.get("State") in ("running", "restarting"),
        created_at=float(info.get("Created") or 0),
    )


def volume_object(volume: dict[str, Any]) -> DockerObject:
    try:
        created_at = datetime.fromisoformat((volume.get("CreatedAt") or "").replace("Z", "+00:00")).timestamp()
    except ValueError:
        created_at = 0.0
    return DockerObject(
        kind="volume",
        name=volume["Name"],
        session=(volume.get("Labels") or {}).get(LABEL_SESSION, ""),
        generation=None,
        running=False,
        created_at=created_at,
    )
