"""The desktops on the sandbox's daemon: their network, each session's volume and container,
the socket directory each desktop shares with the worker, and the labelled listings the
reconciler compares with Redis. Everything is found by its deterministic name."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError
from aiodocker.utils import clean_filters
from aiodocker.volumes import DockerVolume

from orchestrator.names import (
    LABEL_DEPTH,
    LABEL_GENERATION,
    LABEL_ROLE,
    LABEL_SANDBOX,
    LABEL_SESSION,
    desktop_name,
    volume_name,
)
from orchestrator.schemas import Resources

from ..privilege import LABEL_USERNS_SLOT, USERNS_ENV, PrivilegeKind, PrivilegeProfile, parse_slot
from ..uid_ranges import LocalSlots, SlotLedger
from .errors import DesktopError, existed, unless_absent
from .port import Desktop, DockerObject
from .session_env import SESSION_ENV_DIR, env_archive


def socket_path(socket_dir: str, session_id: str) -> str:
    """Where the desktop's dockerd socket appears on the worker's side."""
    return os.path.join(socket_dir, session_id, "docker.sock")


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
    ) -> None:
        self._docker = docker
        # Who hands out uid range slots: the machine's ledger in a worker, else the sandbox's own.
        self.ledger: SlotLedger = ledger or LocalSlots()
        self.image = image
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

    # -- naming -----------------------------------------------------------------------------

    def labels(self, session_id: str, generation: int | None = None) -> dict[str, str]:
        labels = {
            LABEL_SESSION: session_id,
            LABEL_SANDBOX: self.sandbox_id,
            LABEL_DEPTH: str(self.depth + 1),
            LABEL_ROLE: "desktop",
        }
        if generation is not None:
            labels[LABEL_GENERATION] = str(generation)
        return labels

    def remove_socket_dir(self, session_id: str) -> None:
        shutil.rmtree(os.path.dirname(socket_path(self.socket_dir, session_id)), ignore_errors=True)

    async def data_root(self) -> str:
        info: Mapping[str, Any] = await self._docker.system.info()
        root: str = info["DockerRootDir"]
        return root

    # -- volume -----------------------------------------------------------------------------

    async def ensure_volume(self, session_id: str) -> bool:
        if await self.volume_exists(session_id):
            return False
        if self.profile.kind is PrivilegeKind.USERNS:
            await self._create_userns_volume(session_id)
        else:
            await self._create_volume(session_id, self.labels(session_id))
        return True

    async def _create_volume(self, session_id: str, labels: dict[str, str]) -> None:
        try:
            await self._docker.volumes.create({"Name": volume_name(session_id), "Labels": labels})
        except DockerError as e:
            raise DesktopError("volume_create_failed", f"could not create the volume: {e.message}") from e

    # -- userns: one uid range per volume ---------------------------------------------------

    async def volume_slots(self) -> dict[str, int]:
        """The uid range slot of each volume of this sandbox that has one, by session."""
        filters = {"label": [f"{LABEL_SANDBOX}={self.sandbox_id}"]}
        found: dict[str, Any] = await self._docker.volumes.list(filters=filters)
        slots = {}
        for volume in found.get("Volumes") or []:
            labels = volume.get("Labels") or {}
            slot = parse_slot(labels)
            if slot is not None and labels.get(LABEL_SESSION):
                slots[labels[LABEL_SESSION]] = slot
        return slots

    async def _create_userns_volume(self, session_id: str, attempts: int = 20) -> int:
        """Create the volume with a slot from the ledger (unique per machine). The sandbox's own
        volumes are checked again after creating: a slot another of its volumes holds (a ledger
        that lost its data, two workers of a sandbox without one) makes the new volume give way
        (removed, still empty, and the claim dropped) and pick again. The first to see no rival
        keeps it, and any later one sees it: no two volumes of a sandbox keep one slot."""
        name = volume_name(session_id)
        for _ in range(attempts):
            try:
                slot = await self.ledger.claim(session_id, await self.volume_slots())
            except ValueError as e:
                raise DesktopError("volume_create_failed", str(e)) from e
            await self._create_volume(session_id, {**self.labels(session_id), LABEL_USERNS_SLOT: str(slot)})
            after = await self.volume_slots()
            mine = after.get(session_id)
            if mine is None:  # made meanwhile under another profile: Docker kept its labels
                raise DesktopError("volume_create_failed", f"volume {name} exists without a uid range slot")
            rivals = [n for n, s in after.items() if s == mine and n != session_id]
            if not rivals:
                return mine
            await self._remove_volume(name, "the volume that lost its uid range slot")
            await self.ledger.release(session_id)
            await asyncio.sleep(random.uniform(0.01, 0.1))
        raise DesktopError("volume_create_failed", f"no free uid range slot after {attempts} attempts")

    async def userns_slot(self, session_id: str) -> int | None:
        """The slot on the session's volume (None for other profiles). A volume made under
        another profile has none, and its files belong to the sandbox's root: refused."""
        if self.profile.kind is not PrivilegeKind.USERNS:
            return None
        info = await unless_absent(DockerVolume(self._docker, volume_name(session_id)).show())
        if info is None:
            raise DesktopError("volume_lost", f"the session's volume {volume_name(session_id)} is gone")
        slot = parse_slot(info.get("Labels") or {})
        if slot is None:
            raise DesktopError(
                "volume_not_userns",
                f"the volume of {session_id} was made under another privilege profile (no uid range slot)",
            )
        return slot

    async def volume_exists(self, session_id: str) -> bool:
        return await unless_absent(self._docker.volumes.get(volume_name(session_id))) is not None

    async def remove_volume(self, session_id: str) -> bool:
        removed = await self._remove_volume(volume_name(session_id), "the volume")
        # Gone (now or before): its uid range may go to another desktop of the machine.
        await self.ledger.release(session_id)
        return removed

    async def remove_volume_by_name(self, name: str) -> None:
        await self._remove_volume(name, f"volume {name}")

    async def _remove_volume(self, name: str, what: str) -> bool:
        try:
            return await existed(DockerVolume(self._docker, name).delete())
        except DockerError as e:
            raise DesktopError("volume_remove_failed", f"could not remove {what}: {e.message}") from e

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
            generation=_generation((info.get("Config") or {}).get("Labels") or {}),
            exit_code=state.get("ExitCode"),
        )

    def own_env(self, session_id: str) -> dict[str, str]:
        """The orchestrator's own variables (not secret): the container's ``Env``. They win over a
        session's variables of the same name, which are left out of the session's env file."""
        return {
            "ORCH_DEPTH": str(self.depth + 1),
            "ORCH_SESSION": session_id,
            "ORCH_EXTERNAL_SOCKET": "/run/orchestrator/docker.sock",
        }

    def desktop_config(
        self,
        session_id: str,
        generation: int,
        resources: Resources | None = None,
        userns_slot: int | None = None,
    ) -> dict[str, Any]:
        """The container's configuration. It never holds the session's env: that goes into a
        file in the container (``deliver_env``), so ``docker inspect`` shows none of it."""
        sockets = os.path.dirname(socket_path(self.socket_dir, session_id))
        host_config: dict[str, Any] = {
            "Binds": [f"{volume_name(session_id)}:/var/lib/docker", f"{sockets}:/run/orchestrator"],
            "NetworkMode": self.network,
            # Back by itself when the sandbox's dockerd restarts; a desktop that stops otherwise is
            # restarted by the reconciler (bounded) or its session fails (desktop_lost).
            "RestartPolicy": {"Name": "unless-stopped"},
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}},
            **self.profile.host_config(),
        }
        if resources is not None:
            if resources.cpus is not None:
                host_config["NanoCpus"] = int(resources.cpus * 1e9)
            if resources.memory_mb is not None:
                host_config["Memory"] = resources.memory_mb * 1024 * 1024
            if resources.pids is not None:
                host_config["PidsLimit"] = resources.pids
        variables = [f"{k}={v}" for k, v in self.own_env(session_id).items()]
        variables += self.profile.desktop_env(userns_slot)
        return {
            "Image": self.image,
            "Hostname": desktop_name(session_id)[:63],
            "Env": variables,
            "Labels": self.labels(session_id, generation),
            "HostConfig": host_config,
        }

    async def create(
        self,
        session_id: str,
        generation: int,
        resources: Resources | None = None,
        env: dict[str, str] | None = None,
    ) -> Desktop:
        desktop = await self.inspect(session_id)
        if desktop is None or desktop.generation != generation:
            if desktop is not None:
                await self.remove(session_id)
            desktop = await self._create(session_id, generation, resources)
        # Also into an adopted desktop: a create that died between the container and its file
        # left one without it (never started: only a bring-up starts a desktop).
        await self.deliver_env(session_id, env or {})
        return desktop

    async def _create(self, session_id: str, generation: int, resources: Resources | None) -> Desktop:
        os.makedirs(os.path.dirname(socket_path(self.socket_dir, session_id)), exist_ok=True)
        slot = await self.userns_slot(session_id)
        config = self.desktop_config(session_id, generation, resources, userns_slot=slot)
        try:
            await self._docker.containers.create(config, name=desktop_name(session_id))
        except DockerError as e:
            if e.status == 409:  # created concurrently by a retry of this job: adopt it
                pass
            elif e.status == 404:
                raise DesktopError("image_missing", f"desktop image {self.image!r} is missing") from e
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
        # Nor the userns profile's: a session must not choose its desktop's uid range.
        variables = {k: v for k, v in env.items() if k not in own and k not in USERNS_ENV}
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
        return [_desktop_object(c) for c in found]

    async def list_volumes(self) -> list[DockerObject]:
        filters = {"label": [f"{LABEL_SANDBOX}={self.sandbox_id}", LABEL_SESSION]}
        found: dict[str, Any] = await self._docker.volumes.list(filters=filters)
        return [_volume_object(v) for v in found.get("Volumes") or []]


def _generation(labels: dict[str, str]) -> int | None:
    raw = labels.get(LABEL_GENERATION, "")
    return int(raw) if raw.isdigit() else None


def _desktop_object(container: DockerContainer) -> DockerObject:
    # The listing's fields of the container (DockerContainer has no .get()).
    info = {key: container[key] for key in ("Labels", "Names", "State", "Created") if key in container}
    labels = info.get("Labels") or {}
    return DockerObject(
        kind="desktop",
        name=(info.get("Names") or ["/?"])[0].lstrip("/"),
        session=labels.get(LABEL_SESSION, ""),
        generation=_generation(labels),
        # Restarting: the daemon's restart policy is bringing it back (its own backoff); the
        # reconciler must not start it too, nor spend its restart budget on it.
        running=info.get("State") in ("running", "restarting"),
        created_at=float(info.get("Created") or 0),
    )


def _volume_object(volume: dict[str, Any]) -> DockerObject:
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
