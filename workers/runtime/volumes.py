"""Each session's volume on the sandbox's daemon (its desktop's /var/lib/docker), found by its
deterministic name; under the userns profile, with the uid range slot it was made for."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiodocker
from aiodocker.exceptions import DockerError
from aiodocker.volumes import DockerVolume

from orchestrator.names import LABEL_SANDBOX, LABEL_SESSION, volume_name

from ..privilege import LABEL_USERNS_SLOT, parse_slot
from ..uid_ranges import LocalSlots, SlotLedger
from .desktop_spec import desktop_labels, volume_object
from .errors import DesktopError, existed, unless_absent
from .port import DockerObject


class DockerVolumes:
    def __init__(
        self, docker: aiodocker.Docker, *, sandbox_id: str, depth: int, ledger: SlotLedger | None = None
    ) -> None:
        self._docker = docker
        # Who hands out uid range slots: the machine's ledger in a worker, else the sandbox's own.
        self.ledger: SlotLedger = ledger or LocalSlots()
        self.sandbox_id = sandbox_id
        self.depth = depth  # of the sandbox

    async def ensure(self, session_id: str, *, userns: bool) -> bool:
        """Create the session's volume unless it exists (``userns``: with a uid range slot);
        True when it was created now."""
        if await self.exists(session_id):
            return False
        if userns:
            await self._create_userns(session_id)
        else:
            await self._create(session_id, desktop_labels(self.sandbox_id, self.depth, session_id))
        return True

    async def exists(self, session_id: str) -> bool:
        return await unless_absent(self._docker.volumes.get(volume_name(session_id))) is not None

    async def _create(self, session_id: str, labels: dict[str, str]) -> None:
        try:
            await self._docker.volumes.create({"Name": volume_name(session_id), "Labels": labels})
        except DockerError as e:
            raise DesktopError("volume_create_failed", f"could not create the volume: {e.message}") from e

    # -- userns: one uid range per volume ---------------------------------------------------

    async def slots(self) -> dict[str, int]:
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

    async def _create_userns(self, session_id: str, attempts: int = 20) -> int:
        """Create the volume with a slot from the ledger (unique per machine). The sandbox's own
        volumes are checked again after creating: a slot another of its volumes holds (a ledger
        that lost its data, two workers of a sandbox without one) makes the new volume give way
        (removed, still empty, and the claim dropped) and pick again. The first to see no rival
        keeps it, and any later one sees it: no two volumes of a sandbox keep one slot."""
        name = volume_name(session_id)
        labels = desktop_labels(self.sandbox_id, self.depth, session_id)
        for _ in range(attempts):
            try:
                slot = await self.ledger.claim(session_id, await self.slots())
            except ValueError as e:
                raise DesktopError("volume_create_failed", str(e)) from e
            await self._create(session_id, {**labels, LABEL_USERNS_SLOT: str(slot)})
            after = await self.slots()
            mine = after.get(session_id)
            if mine is None:  # made meanwhile under another profile: Docker kept its labels
                raise DesktopError("volume_create_failed", f"volume {name} exists without a uid range slot")
            rivals = [n for n, s in after.items() if s == mine and n != session_id]
            if not rivals:
                return mine
            await self._remove(name, "the volume that lost its uid range slot")
            await self.ledger.release(session_id)
            await asyncio.sleep(random.uniform(0.01, 0.1))
        raise DesktopError("volume_create_failed", f"no free uid range slot after {attempts} attempts")

    async def userns_slot(self, session_id: str) -> int:
        """The slot on the session's userns volume. A volume made under another profile has
        none, and its files belong to the sandbox's root: refused."""
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

    # -- removal and listing ----------------------------------------------------------------

    async def remove(self, session_id: str) -> bool:
        removed = await self._remove(volume_name(session_id), "the volume")
        # Gone (now or before): its uid range may go to another desktop of the machine.
        await self.ledger.release(session_id)
        return removed

    async def remove_by_name(self, name: str) -> None:
        await self._remove(name, f"volume {name}")

    async def _remove(self, name: str, what: str) -> bool:
        try:
            return await existed(DockerVolume(self._docker, name).delete())
        except DockerError as e:
            raise DesktopError("volume_remove_failed", f"could not remove {what}: {e.message}") from e

    async def listing(self) -> list[DockerObject]:
        """This sandbox's session volumes, found by label."""
        filters = {"label": [f"{LABEL_SANDBOX}={self.sandbox_id}", LABEL_SESSION]}
        found: dict[str, Any] = await self._docker.volumes.list(filters=filters)
        return [volume_object(v) for v in found.get("Volumes") or []]
