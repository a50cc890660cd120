"""The desktops on the sandbox's daemon: their network, each session's container (its volume
through volumes.py), the socket directory each desktop shares with the worker, and the
labelled listings the reconciler compares with Redis. Everything is found by its
deterministic name; what a desktop is made of is desktop_spec.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError
from aiodocker.utils import clean_filters

from orchestrator.names import LABEL_ROLE, LABEL_SANDBOX, desktop_name
from orchestrator.schemas import DisplaySize, Resources

from ..privilege import USERNS_ENV, PrivilegeKind, PrivilegeProfile
from ..uid_ranges import SlotLedger
from . import desktop_spec
from .desktop_spec import desktop_object, generation_of, socket_path
from .display import DISPLAY_ENV, clear_marker
from .errors import DesktopError, existed, unless_absent
from .port import Desktop, DockerObject
from .session_env import SESSION_ENV_DIR, env_archive
from .volumes import DockerVolumes

__all__ = ["DockerDesktops", "socket_path"]


class DockerDesktops:
    def __init__(
        self,
        docker: aiodocker.Docker,
        *,
        image: str,
        sandbox_id: str,
        depth: int,
        socket_dir: str,
        profile: PrivilegeProfile,
        ledger: SlotLedger | None = None,
        graphical_image: str | None = None,
    ) -> None:
        self._docker = docker
        # The session volumes; the machine's uid range ledger is theirs (``volumes.ledger``).
        self.volumes = DockerVolumes(docker, sandbox_id=sandbox_id, depth=depth, ledger=ledger)
        self.image = image
        # The graphical flavor's (docs/graphical.md); None: this worker makes minimal ones only.
        self.graphical_image = graphical_image
        self.sandbox_id = sandbox_id
        self.depth = depth  # of the sandbox; desktops run at depth + 1
        self.socket_dir = socket_dir
        self.profile = profile

    # -- network ----------------------------------------------------------------------------

    @property
    def network(self) -> str:
        return f"desktops-{self.sandbox_id}"

    async def ensure_network(self, icc: bool = False) -> None:
        """The bridge network desktops join: outbound works, but with inter-container traffic
        off, so no desktop reaches another's ports (sessions are isolated from each other)."""
        if await unless_absent(self._docker.networks.get(self.network)) is not None:
            return
        config = {
            "Name": self.network,
            "Driver": "bridge",
            "CheckDuplicate": True,
            "Options": {"com.docker.network.bridge.enable_icc": "true" if icc else "false"},
            "Labels": {LABEL_SANDBOX: self.sandbox_id, LABEL_ROLE: "desktop-network"},
        }
        try:
            await self._docker.networks.create(config)
        except DockerError as e:
            if e.status != 409:  # another worker of this sandbox made it first
                raise

    # -- the socket directory, the data root ------------------------------------------------

    def remove_socket_dir(self, session_id: str) -> None:
        shutil.rmtree(os.path.dirname(socket_path(self.socket_dir, session_id)), ignore_errors=True)

    async def data_root(self) -> str:
        info: Mapping[str, Any] = await self._docker.system.info()
        root: str = info["DockerRootDir"]
        return root

    # -- volumes (volumes.py; the profile says whether one gets a uid range) ----------------

    async def ensure_volume(self, session_id: str) -> bool:
        return await self.volumes.ensure(session_id, userns=self.profile.kind is PrivilegeKind.USERNS)

    async def userns_slot(self, session_id: str) -> int | None:
        """The slot on the session's volume (None for other profiles)."""
        if self.profile.kind is not PrivilegeKind.USERNS:
            return None
        return await self.volumes.userns_slot(session_id)

    async def volume_exists(self, session_id: str) -> bool:
        return await self.volumes.exists(session_id)

    async def remove_volume(self, session_id: str) -> bool:
        return await self.volumes.remove(session_id)

    async def remove_volume_by_name(self, name: str) -> None:
        await self.volumes.remove_by_name(name)

    # -- desktop container ------------------------------------------------------------------

    def _container(self, session_id: str) -> DockerContainer:
        return self._docker.containers.container(desktop_name(session_id))

    async def inspect(self, session_id: str) -> Desktop | None:
        info = await unless_absent(self._container(session_id).show())
        if info is None:
            return None
        state = info.get("State") or {}
        return Desktop(
            name=desktop_name(session_id),
            id=info["Id"],
            running=bool(state.get("Running")),
            generation=generation_of((info.get("Config") or {}).get("Labels") or {}),
            exit_code=state.get("ExitCode"),
        )

    def own_env(self, session_id: str, display: DisplaySize | None = None) -> dict[str, str]:
        """The orchestrator's own variables (desktop_spec.own_env), which win over a session's."""
        return desktop_spec.own_env(self.depth, session_id, display)

    def image_for(self, display: DisplaySize | None) -> str:
        """The image of a desktop with ``display`` (None: a minimal one)."""
        if display is None:
            return self.image
        if self.graphical_image is None:
            raise DesktopError("image_missing", "this worker has no graphical desktop image")
        return self.graphical_image

    async def create(
        self,
        session_id: str,
        generation: int,
        resources: Resources | None = None,
        env: dict[str, str] | None = None,
        display: DisplaySize | None = None,
    ) -> Desktop:
        desktop = await self.inspect(session_id)
        if desktop is None or desktop.generation != generation:
            if desktop is not None:
                await self.remove(session_id)
            desktop = await self._create(session_id, generation, resources, display)
        # Also into an adopted desktop: a create that died between the container and its file
        # left one without it (never started: only a bring-up starts a desktop).
        await self.deliver_env(session_id, env or {})
        return desktop

    async def _create(
        self, session_id: str, generation: int, resources: Resources | None, display: DisplaySize | None
    ) -> Desktop:
        os.makedirs(os.path.dirname(socket_path(self.socket_dir, session_id)), exist_ok=True)
        image = self.image_for(display)
        config = desktop_spec.container_config(
            session_id,
            image=image,
            network=self.network,
            socket_dir=self.socket_dir,
            labels=desktop_spec.desktop_labels(self.sandbox_id, self.depth, session_id, generation),
            variables=self.own_env(session_id, display),
            profile=self.profile,
            resources=resources,
            userns_slot=await self.userns_slot(session_id),
        )
        try:
            await self._docker.containers.create(config, name=desktop_name(session_id))
        except DockerError as e:
            if e.status == 409:  # created concurrently by a retry of this job: adopt it
                pass
            elif e.status == 404:
                raise DesktopError("image_missing", f"desktop image {image!r} is missing") from e
            else:
                raise DesktopError("desktop_create_failed", f"could not create the desktop: {e.message}") from e
        created = await self.inspect(session_id)
        if created is None:
            raise DesktopError("desktop_create_failed", "the desktop vanished right after it was created")
        return created

    async def deliver_env(self, session_id: str, env: dict[str, str]) -> None:
        """Write the session's env into the (created, not yet started) desktop as a root-only
        file (``session_env.py``), which desktop-init reads at start. Our own variables are
        left out: the container's ``Env`` has them, and they win."""
        own = self.own_env(session_id)
        # Nor the userns profile's (a session must not choose its desktop's uid range) nor the
        # flavor's (its image flavor, screen or VNC port), whatever the desktop's flavor.
        reserved = {*own, *USERNS_ENV, *DISPLAY_ENV}
        variables = {k: v for k, v in env.items() if k not in reserved}
        if not variables:
            return
        try:
            archive = env_archive(variables)
            # (aiodocker leaves put_archive unannotated.)
            await self._container(session_id).put_archive(os.path.dirname(SESSION_ENV_DIR), archive)  # type: ignore[no-untyped-call]
        except DockerError as e:
            # Docker's message names the path, never the archive's content.
            raise DesktopError("desktop_create_failed", f"could not write the session's env: {e.message}") from e

    async def start(self, session_id: str) -> None:
        # Every start (a create's, a resume's, the reconciler's restart): the display.ready a
        # previous run left must not pass for this one's (a minimal desktop has none to clear).
        clear_marker(self.socket_dir, session_id)
        # An already running desktop answers 304, which aiodocker takes for success.
        try:
            await self._container(session_id).start()
        except DockerError as e:
            if e.status == 404:
                raise DesktopError("desktop_gone", "the desktop is gone") from e
            raise DesktopError("desktop_start_failed", f"could not start the desktop: {e.message}") from e

    async def remove(self, session_id: str, stop_timeout: int = 20) -> bool:
        """Stop (gracefully, so the inner dockerd shuts down cleanly) and remove the desktop."""
        container = self._container(session_id)
        # The HTTP call may take the grace period and the kill after it.
        limit = aiohttp.ClientTimeout(total=stop_timeout + 30)
        with contextlib.suppress(DockerError, TimeoutError):  # the forced removal follows anyway
            await container.stop(t=stop_timeout, timeout=limit)
        try:
            return await existed(container.delete(force=True))
        except DockerError as e:
            if e.status == 409 and "in progress" in e.message:
                # Someone else (a reconciler, a second worker) is removing it: done when it is gone.
                return await self._wait_gone(container, stop_timeout + 30)
            raise DesktopError("desktop_remove_failed", f"could not remove the desktop: {e.message}") from e

    async def _wait_gone(self, container: DockerContainer, limit_s: float) -> bool:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            try:
                if await unless_absent(container.show()) is None:
                    return True
            except DockerError as e:
                raise DesktopError("desktop_remove_failed", f"could not remove the desktop: {e.message}") from e
            await asyncio.sleep(0.05)
        raise DesktopError("desktop_remove_failed", f"{container.id} was still being removed after {limit_s:g} s")

    async def remove_container_by_name(self, name: str) -> None:
        await existed(self._docker.containers.container(name).delete(force=True))

    async def logs(self, session_id: str, tail: int = 20) -> str:
        try:
            lines = await self._container(session_id).log(stdout=True, stderr=True, tail=tail)
        except DockerError:
            return ""
        return "".join(lines).strip()

    # -- listings for the reconciler --------------------------------------------------------

    async def list_desktops(self) -> list[DockerObject]:
        """An unlabelled container is never ours."""
        filters = clean_filters({"label": [f"{LABEL_ROLE}=desktop", f"{LABEL_SANDBOX}={self.sandbox_id}"]})
        found = await self._docker.containers.list(all=True, filters=filters)
        return [desktop_object(c) for c in found]

    async def list_volumes(self) -> list[DockerObject]:
        return await self.volumes.listing()
