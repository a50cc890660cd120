"""The Docker steps of a bring-up (create and start), each under its deadline: the volume
and the desktop, then its start, its dockerd and (graphical desktops) its screen, then the
images it asked for. Their order,
the transitions between them and the error policy are the lifecycle's (lifecycle.py)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import anyio

from orchestrator.names import volume_name
from orchestrator.schemas import DesktopStarted, DockerdReady, ImagesLoaded, SessionRecord, VolumeCreated, to_data
from orchestrator.states import SessionState

from .runtime import Desktop, DesktopError, Runtime
from .runtime.display import display_of

S = SessionState
# Publishes an event of the session (type, data); Lifecycle._event.
Publish = Callable[[SessionRecord, str, dict[str, Any]], Awaitable[None]]


class Phases:
    """Where a bring-up's time went, in ms, for the ``session.ready`` event: ``queue`` (from
    the request to the job's start), then each step (``display`` on graphical desktops only:
    from dockerd.ready to display.ready), and ``total`` from the request."""

    def __init__(self, requested_at: str) -> None:
        self._requested = _epoch(requested_at)
        self._last = time.time()
        self._ms: dict[str, int] = {"queue": max(0, round((self._last - self._requested) * 1000))}

    def mark(self, name: str) -> None:
        now = time.time()
        self._ms[name] = round((now - self._last) * 1000)
        self._last = now

    def result(self) -> dict[str, int]:
        return {**self._ms, "total": max(0, round((self._last - self._requested) * 1000))}


def _epoch(rfc3339: str) -> float:
    try:
        return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


class BringUpSteps:
    def __init__(self, runtime: Runtime, event: Publish, fault: Callable[[str], None]) -> None:
        self.runtime = runtime
        self._event = event
        # The test-only fault hook (ORCH_FAULT_KILL_AT): lifecycle.FAULT_POINTS.
        self._fault = fault

    async def provision(self, record: SessionRecord, env: dict[str, str], phases: Phases, timeout_s: float) -> Desktop:
        """The volume (made on create, required on a resume) and the desktop container, both
        under the provisioning deadline."""
        session_id = record.id
        try:
            with anyio.fail_after(timeout_s):
                if record.state is S.CREATING:
                    if await self.runtime.desktops.ensure_volume(session_id):
                        await self._event(
                            record, "volume.created", to_data(VolumeCreated(name=volume_name(session_id)))
                        )
                    self._fault("create:after_volume")
                elif not await self.runtime.desktops.volume_exists(session_id):
                    # A resume must find the volume: a new empty one would silently lose the data.
                    raise DesktopError("volume_lost", f"the session's volume {volume_name(session_id)} is gone")
                phases.mark("volume")
                desktop = await self.runtime.desktops.create(
                    session_id, record.generation, record.spec.resources, env, display_of(record.spec)
                )
                self._fault("create:after_container")
                phases.mark("create")
                return desktop
        except TimeoutError:
            raise DesktopError(
                "provision_timeout",
                f"making the volume and the desktop took longer than {timeout_s:g} s",
            ) from None

    async def start_and_wait(
        self, record: SessionRecord, desktop: Desktop, phases: Phases, timeout_s: float
    ) -> DockerdReady:
        """Start the desktop and wait for its dockerd (``desktop.started``, ``dockerd.ready``),
        then for a graphical desktop's screen (``display.ready``), all under one deadline."""
        started_at = time.monotonic()
        await self.runtime.desktops.start(record.id)
        self._fault("create:after_start")
        profile = self.runtime.profile
        started = DesktopStarted(
            container=desktop.name,
            id=desktop.id[:12],
            privilege=profile.kind.value,
            unsafe=profile.unsafe,
            confined=profile.unsafe and profile.confined,
        )
        await self._event(record, "desktop.started", to_data(started))
        phases.mark("start")
        ready = await self.runtime.inner.wait_ready(record.id, started_at, timeout_s)
        phases.mark("dockerd")
        self._fault("create:before_ready_event")
        await self._event(record, "dockerd.ready", to_data(ready))
        if display_of(record.spec) is not None:
            screen = await self.runtime.inner.wait_display(record.id, started_at, timeout_s)
            phases.mark("display")
            await self._event(record, "display.ready", to_data(screen))
        return ready

    async def preload(self, record: SessionRecord, timeout_s: float) -> None:
        """Copy the requested images from the sandbox's daemon into the desktop's (a resumed
        desktop keeps them on its volume: only missing ones move)."""
        started = time.monotonic()
        loaded: list[str] = []
        moved = 0
        with anyio.move_on_after(timeout_s) as deadline:
            loaded = [i for i in record.spec.preload_images if not await self.runtime.inner.has_image(record.id, i)]
            moved = await self.runtime.images.copy_into(record.id, loaded) if loaded else 0
        if deadline.cancelled_caught:
            raise DesktopError("preload_timeout", f"copying the images took longer than {timeout_s:g} s")
        data = ImagesLoaded(images=loaded, bytes=moved, seconds=round(time.monotonic() - started, 3))
        await self._event(record, "images.loaded", to_data(data))
