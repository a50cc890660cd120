"""The port: everything the lifecycle, the reconciler, the warm pool and the worker ask of
Docker, split by what it manages. ``engine.DesktopRuntime`` implements it on aiodocker;
tests/fakes.py keeps it in memory.

Every operation is idempotent by name (creating what exists adopts it, removing what is
gone succeeds) and fails with ``DesktopError`` carrying a stable code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from orchestrator.schemas import DisplayReady, DisplaySize, DockerdReady, Resources

from ..privilege import PrivilegeProfile
from .display import DisplayMarker


@dataclass(frozen=True)
class Desktop:
    name: str
    id: str
    running: bool
    generation: int | None
    exit_code: int | None


@dataclass(frozen=True)
class DockerObject:
    """A labelled desktop or volume, as the reconciler sees it."""

    kind: Literal["desktop", "volume"]
    name: str
    session: str
    generation: int | None
    running: bool
    created_at: float  # Unix seconds


class Desktops(Protocol):
    """The sandbox's daemon: the desktops' network, each session's volume and desktop
    container (found by its deterministic name), and the directory holding its socket."""

    async def ensure_network(self, icc: bool = False) -> None: ...

    async def ensure_volume(self, session_id: str) -> bool:
        """Create the session's volume unless it exists; True when it was created now."""
        ...

    async def volume_exists(self, session_id: str) -> bool: ...

    async def remove_volume(self, session_id: str) -> bool:
        """True if it removed the volume, False if there was none."""
        ...

    async def create(
        self,
        session_id: str,
        generation: int,
        resources: Resources | None = None,
        env: dict[str, str] | None = None,
        display: DisplaySize | None = None,
    ) -> Desktop:
        """Create the desktop for ``generation``; adopt one that exists for it, replace an older one.
        ``display``: a graphical desktop's screen (the graphical image); None: a minimal one."""
        ...

    async def start(self, session_id: str) -> None:
        """Start the desktop, first removing the display.ready a previous run left."""
        ...

    async def remove(self, session_id: str, stop_timeout: int = 20) -> bool:
        """Stop (gracefully) and remove the desktop; False if there was none."""
        ...

    def remove_socket_dir(self, session_id: str) -> None: ...

    async def data_root(self) -> str:
        """The daemon's data root (``DockerRootDir``): where volumes and container layers live."""
        ...

    async def list_desktops(self) -> list[DockerObject]:
        """This sandbox's desktops, found by label."""
        ...

    async def list_volumes(self) -> list[DockerObject]:
        """This sandbox's session volumes, found by label."""
        ...

    async def remove_container_by_name(self, name: str) -> None: ...

    async def remove_volume_by_name(self, name: str) -> None: ...


class Images(Protocol):
    """Images of the sandbox's daemon, filled from this level's registry."""

    async def has(self, image: str) -> bool: ...

    async def pull(self, registry: str, image: str) -> bool:
        """Pull ``registry/image`` and tag it ``image``; False if the registry lacks it."""
        ...

    async def copy_into(self, session_id: str, images: list[str]) -> int:
        """Copy ``images`` from the sandbox's daemon into the desktop's; returns the bytes moved."""
        ...


class InnerDaemon(Protocol):
    """The desktop's own dockerd, reached through the socket it exposes to the worker."""

    async def wait_ready(self, session_id: str, started_at: float, limit_s: float) -> DockerdReady:
        """Wait until it answers ``/_ping`` (``desktop_exited`` if the desktop stops first,
        ``dockerd_timeout`` after ``limit_s`` from ``started_at``, a monotonic time)."""
        ...

    async def wait_display(self, session_id: str, started_at: float, limit_s: float) -> DisplayReady:
        """Wait until a graphical desktop's screen answers (its display.ready marker):
        ``desktop_exited`` if the desktop stops first, ``display_timeout`` after ``limit_s``
        from ``started_at``, a monotonic time."""
        ...

    async def answers(self, session_id: str) -> bool:
        """One health probe: does it answer ``/_ping``?"""
        ...

    async def display_marker(self, session_id: str) -> DisplayMarker | None:
        """One look at a graphical desktop's display.ready: None while its screen is down
        (restarting) or the marker is not start-display's."""
        ...

    async def stop_containers(self, session_id: str, timeout_s: int) -> int:
        """Stop its running containers (best effort); returns how many."""
        ...

    async def has_image(self, session_id: str, image: str) -> bool: ...


class PrivilegeProbe(Protocol):
    async def try_profile(self, profile: PrivilegeProfile) -> str | None:
        """None if a desktop runs with ``profile`` here, else why not."""
        ...


class Runtime(Protocol):
    """The whole port, as the lifecycle, the reconciler and the pool take it."""

    @property
    def desktops(self) -> Desktops: ...

    @property
    def images(self) -> Images: ...

    @property
    def inner(self) -> InnerDaemon: ...

    @property
    def probe(self) -> PrivilegeProbe: ...

    @property
    def profile(self) -> PrivilegeProfile:
        """The privilege profile desktops get (for the ``desktop.started`` event)."""
        ...
