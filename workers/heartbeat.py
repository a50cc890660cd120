"""The sandbox's heartbeat: what it reports (``SandboxInfo``) through the sandbox registry,
and a ``sandbox.heartbeat`` event. Liveness is the alive key, set first thing in each beat."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import aiohttp
from aiodocker.exceptions import DockerError

from orchestrator import __version__
from orchestrator.config import WorkerSettings
from orchestrator.events import EventBus, make_event
from orchestrator.names import address_pool
from orchestrator.sandboxes import SandboxRegistry
from orchestrator.schemas import SandboxInfo, now_rfc3339, to_data
from orchestrator.states import SandboxStatus, SessionState
from orchestrator.store import SessionStore

from .disk import DiskGauge
from .pool import WarmPool
from .prepare import DesktopPreparation
from .runtime import DesktopError, Runtime

log = logging.getLogger("workers.heartbeat")

# The heartbeat and the health check ask the sandbox's dockerd at most this long: a daemon
# that is restarting must not hold up the heartbeat (the sandbox would look lost).
DOCKER_PROBE_TIMEOUT_S = 2.0
DOCKER_UNREACHABLE = (DesktopError, DockerError, aiohttp.ClientError, OSError, TimeoutError)


def machine_memory_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        return 0


async def sessions_by_state(store: SessionStore, sandbox_id: str) -> dict[str, int]:
    """A sandbox's sessions, counted by state (every state present, 0 when none)."""
    counts = dict.fromkeys((s.value for s in SessionState), 0)
    for record in await store.list(sandbox=sandbox_id):
        counts[record.state.value] += 1
    return counts


class Heartbeat:
    def __init__(
        self,
        settings: WorkerSettings,
        registry: SandboxRegistry,
        bus: EventBus,
        store: SessionStore,
        runtime: Runtime,
        pool: WarmPool,
        preparation: DesktopPreparation,
        status: Callable[[], SandboxStatus],
        disk: DiskGauge | None = None,
    ) -> None:
        self.settings = settings
        self.disk = disk or DiskGauge(runtime.desktops, settings.min_free_disk_mb)
        self.registry = registry
        self.bus = bus
        self.store = store
        self.runtime = runtime
        self.pool = pool
        self.preparation = preparation
        self.status = status
        # Desktops of sessions (not the pool's) last seen on the sandbox's dockerd.
        self._desktops_seen = 0
        self.access_address = ""  # the worker's direct access road, once it listens
        self._refused = False

    async def beat(self) -> SandboxInfo:
        settings = self.settings
        status = self.status()
        if status is not SandboxStatus.DRAINED:  # first, whatever else is slow: liveness is this key
            await self.registry.mark_alive(settings.sandbox_id, settings.lost_after_s)
        ready = await self.pool.pooled()
        pooled = self.pool.owned(ready)
        try:
            async with asyncio.timeout(DOCKER_PROBE_TIMEOUT_S):
                desktops = await self.runtime.desktops.list_desktops()
            self._desktops_seen = sum(1 for d in desktops if d.session not in pooled)
        except DOCKER_UNREACHABLE as e:
            # The worker is alive even while its dockerd restarts: keep beating (with the last
            # count), or the sandbox would be declared lost for a daemon restart.
            log.warning("heartbeat: the sandbox's dockerd does not answer (%s)", e)
        by_state = {k: v for k, v in (await sessions_by_state(self.store, settings.sandbox_id)).items() if v}
        info = SandboxInfo(
            id=settings.sandbox_id,
            depth=settings.depth,
            version=__version__,
            hostname=settings.hostname,
            sessions=self._desktops_seen,
            capacity=settings.max_sessions,
            load=os.getloadavg()[0],
            free_disk_bytes=await self.disk.free_bytes(),
            min_free_disk_bytes=self.disk.floor_bytes,
            privilege=self.preparation.profile.describe(),
            privilege_unsafe=self.preparation.profile.unsafe,
            privilege_confined=self.preparation.profile.unsafe and self.preparation.profile.confined,
            ts=now_rfc3339(),
            max_cpus=settings.max_cpus,
            max_memory_mb=settings.max_memory_mb,
            max_pids=settings.max_pids,
            address_pool=address_pool(settings.depth),
            pool_target=self.pool.target,
            pool_ready=len(ready),
            status=status,
            labels=settings.sandbox_labels,
            cpus=float(os.cpu_count() or 1),
            memory_mb=machine_memory_mb(),
            sessions_by_state=by_state,
            lost_after_s=settings.lost_after_s,
            access_address=self.access_address,
        )
        if not await self.registry.beat(info):
            # Retired by an operator: listed nowhere, whatever this worker says (the drain
            # watch stops its work; a restarted one idles, workers/drain.py).
            if not self._refused:
                log.warning("sandbox %s is retired: its heartbeats are refused", info.id)
                self._refused = True
            return info
        await self.bus.publish(make_event("sandbox.heartbeat", sandbox=info.id, data=to_data(info)))
        return info
