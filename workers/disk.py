"""The sandbox's free disk, where its desktops' volumes and container layers live: its
dockerd's data root. The heartbeat reports it with the free-disk watermark
(ORCH_SANDBOX_MIN_FREE_DISK_MB), and placement skips a sandbox below the watermark
(orchestrator/placement.py); a producer's create job on this sandbox is refused the same way."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Callable

import aiohttp
from aiodocker.exceptions import DockerError

from .runtime import DesktopError, Desktops

log = logging.getLogger("workers.disk")

# Where to measure when the dockerd's data root is not on this worker's filesystem (a
# dockerd reached over TCP): the worker's own disk, what was measured before.
FALLBACK_PATH = "/"


def free_bytes_at(path: str) -> int:
    return shutil.disk_usage(path).free


class DiskGauge:
    def __init__(self, desktops: Desktops, min_free_mb: int, measure: Callable[[str], int] = free_bytes_at) -> None:
        self.desktops = desktops
        self.floor_bytes = min_free_mb * 1024 * 1024
        self._measure = measure
        self._path: str | None = None

    async def path(self) -> str:
        """The dockerd's data root, asked once; the fallback (asked again next time) while the
        daemon does not answer, or for good when that directory is not here."""
        if self._path is not None:
            return self._path
        try:
            async with asyncio.timeout(2.0):
                root = await self.desktops.data_root()
        except (DesktopError, DockerError, aiohttp.ClientError, OSError, TimeoutError, KeyError) as e:
            # The daemon restarts: the heartbeat must go on.
            log.warning("disk: the dockerd's data root is unknown (%s); measuring %s", e, FALLBACK_PATH)
            return FALLBACK_PATH
        if await asyncio.to_thread(os.path.isdir, root):
            self._path = root
        else:
            log.warning("disk: the dockerd's data root %s is not on this machine; measuring %s", root, FALLBACK_PATH)
            self._path = FALLBACK_PATH
        return self._path

    async def free_bytes(self) -> int:
        path = await self.path()
        try:
            return await asyncio.to_thread(self._measure, path)
        except OSError as e:  # the directory went away: ask the daemon again next time
            log.warning("disk: cannot measure %s (%s); measuring %s", path, e, FALLBACK_PATH)
            self._path = None
            return await asyncio.to_thread(self._measure, FALLBACK_PATH)

    async def low(self) -> str | None:
        """Why this sandbox takes no new session for its disk now (None: it may)."""
        if self.floor_bytes <= 0:
            return None
        free = await self.free_bytes()
        if free >= self.floor_bytes:
            return None
        path, floor = await self.path(), self.floor_bytes / 2**30
        return f"{free / 2**30:.1f} GiB free on {path}, below the watermark of {floor:.1f} GiB"
