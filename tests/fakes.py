"""In-memory fakes of the worker's Docker port (``workers.runtime.port.Runtime``) and of its
job queue, and ``open_stack``: the real lifecycle, reconciler, store, events, leases and the
API's service over them, on a real Redis. Lets tests drive the real code in milliseconds and
break it at any call: ``fail_next`` makes a call fail with a code, ``crash_at`` kills the job
at a chosen call (before or after its effect) the way a SIGKILL would."""

from __future__ import annotations

import contextlib
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import msgspec
import redis.asyncio as aioredis

from orchestrator.config import Settings
from orchestrator.events import EventBus
from orchestrator.keys import Keys
from orchestrator.locks import SessionLocks
from orchestrator.names import address_pool, desktop_name, volume_name
from orchestrator.queue import JobQueue, Operation
from orchestrator.records import new_record
from orchestrator.sandboxes import SandboxRegistry
from orchestrator.schemas import (
    DisplayReady,
    DisplaySize,
    DockerdReady,
    Event,
    Resources,
    SessionCreate,
    SessionRecord,
)
from orchestrator.service import Sessions
from orchestrator.store import SessionStore
from workers.lifecycle import Lifecycle
from workers.privilege import PrivilegeKind, PrivilegeProfile
from workers.reconciler import Reconciler
from workers.runtime import (
    Desktop,
    DesktopError,
    DesktopRuntime,
    Desktops,
    DockerObject,
    Images,
    InnerDaemon,
    PrivilegeProbe,
)
from workers.runtime.display import DisplayMarker
from workers.runtime.errors import DesktopErrorCode

DESKTOP_IMAGE = "orchestrator/desktop:dev"
GRAPHICAL_IMAGE = "orchestrator/desktop-graphical:dev"


class Crash(BaseException):
    """The worker dies here. A BaseException, so no ``except Exception`` in the code under
    test catches it: it unwinds the job as far as the test that armed it."""


@dataclass
class FakeDesktop:
    generation: int
    running: bool = False
    created_at: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: secrets.token_hex(32))
    # A graphical desktop's screen (None: a minimal desktop).
    display: DisplaySize | None = None
    # Starts since it was made: a fake display.ready says how often its screen came up.
    starts: int = 0
    # The screen's server: up (what a look at display.ready finds) and restarted how often.
    display_up: bool = True
    display_restarts: int = 0


@dataclass
class FakeVolume:
    created_at: float = field(default_factory=time.time)
    # Docker makes a missing volume a container binds, without our labels (no listing finds it).
    labelled: bool = True
    images: set[str] = field(default_factory=set)  # the desktop's own images live on its volume


class FakeRuntime:
    """The sandbox's daemon in dicts, keyed by session id. One object plays every part of
    the port (``desktops``, ``images``, ``inner`` and ``probe`` return it). ``calls`` lists
    every call by method name, in order; crash indices count in that list."""

    def __init__(
        self,
        *,
        sandbox_id: str = "fake",
        depth: int = 1,
        image: str = DESKTOP_IMAGE,
        graphical_image: str = GRAPHICAL_IMAGE,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.depth = depth
        self.image = image
        self.graphical_image = graphical_image
        self._profile = PrivilegeProfile(PrivilegeKind.PRIVILEGED, "fake")
        self.data_root_dir = "/"
        self.containers: dict[str, FakeDesktop] = {}
        self.volumes: dict[str, FakeVolume] = {}
        self.removed_volumes: Counter[str] = Counter()
        self.images_present: set[str] = {image, graphical_image}
        self.registry_images: set[str] = set()
        self.registry: str | None = None
        self.calls: list[str] = []
        self.crashed = False
        self._faults: dict[str, DesktopError] = {}
        self._crash: tuple[int, bool] | None = None

    # -- the port's parts ---------------------------------------------------------------

    @property
    def desktops(self) -> Desktops:
        return self

    @property
    def images(self) -> Images:
        return self

    @property
    def inner(self) -> InnerDaemon:
        return self

    @property
    def probe(self) -> PrivilegeProbe:
        return self

    @property
    def profile(self) -> PrivilegeProfile:
        return self._profile

    # -- fault injection ----------------------------------------------------------------

    def fail_next(self, method: str, code: DesktopErrorCode, message: str = "injected fault") -> None:
        """The next call of ``method`` raises DesktopError(code) and does nothing."""
        if not callable(getattr(self, method, None)):
            raise ValueError(f"the port has no method {method!r}")
        self._faults[method] = DesktopError(code, message)

    def crash_at(self, call: int, *, after: bool = False) -> None:
        """Raise Crash at the ``call``-th call from now (0: the next one), before it does
        anything or, with ``after``, once it is done. Fires once."""
        self._crash = (len(self.calls) + call, after)

    def disarm(self) -> None:
        self._crash = None

    def pending_faults(self) -> set[str]:
        return set(self._faults)

    @contextlib.contextmanager
    def _call(self, method: str) -> Iterator[None]:
        index = len(self.calls)
        self.calls.append(method)
        self._maybe_crash(index, after=False)
        fault = self._faults.pop(method, None)
        if fault is not None:
            raise fault
        yield
        self._maybe_crash(index, after=True)

    def _maybe_crash(self, index: int, *, after: bool) -> None:
        if self._crash == (index, after):
            self._crash = None
            self.crashed = True
            raise Crash(f"crashed {'after' if after else 'before'} call {index} ({self.calls[index]})")

    # -- desktops -----------------------------------------------------------------------

    async def ensure_network(self, icc: bool = False) -> None:
        with self._call("ensure_network"):
            pass

    async def ensure_volume(self, session_id: str) -> bool:
        with self._call("ensure_volume"):
            if session_id in self.volumes:
                return False
            self.volumes[session_id] = FakeVolume()
            return True

    async def volume_exists(self, session_id: str) -> bool:
        with self._call("volume_exists"):
            return session_id in self.volumes

    async def remove_volume(self, session_id: str) -> bool:
        with self._call("remove_volume"):
            return self._remove_volume(session_id)

    async def remove_volume_by_name(self, name: str) -> None:
        with self._call("remove_volume_by_name"):
            session_id = self._session_of(name, volume_name)
            if session_id is not None:
                self._remove_volume(session_id)

    def _remove_volume(self, session_id: str) -> bool:
        if session_id not in self.volumes:
            return False
        if session_id in self.containers:  # as Docker refuses: a container binds it
            raise DesktopError("volume_remove_failed", f"volume {volume_name(session_id)} is in use")
        del self.volumes[session_id]
        self.removed_volumes[session_id] += 1
        return True

    async def create(
        self,
        session_id: str,
        generation: int,
        resources: Resources | None = None,
        env: dict[str, str] | None = None,
        display: DisplaySize | None = None,
    ) -> Desktop:
        with self._call("create"):
            existing = self.containers.get(session_id)
            if existing is None or existing.generation != generation:
                self.containers.pop(session_id, None)
                image = self.image if display is None else self.graphical_image
                if image not in self.images_present:
                    raise DesktopError("image_missing", f"desktop image {image!r} is missing")
                self.volumes.setdefault(session_id, FakeVolume(labelled=False))
                self.containers[session_id] = FakeDesktop(generation, display=display)
            return self._desktop(session_id)

    def _desktop(self, session_id: str) -> Desktop:
        d = self.containers[session_id]
        return Desktop(desktop_name(session_id), d.id, d.running, d.generation, None if d.running else 0)

    async def start(self, session_id: str) -> None:
        with self._call("start"):
            if session_id not in self.containers:
                raise DesktopError("desktop_gone", f"no such container: {desktop_name(session_id)}")
            self.containers[session_id].running = True
            self.containers[session_id].starts += 1

    async def remove(self, session_id: str, stop_timeout: int = 20) -> bool:
        with self._call("remove"):
            return self.containers.pop(session_id, None) is not None

    def remove_socket_dir(self, session_id: str) -> None:
        with self._call("remove_socket_dir"):
            pass

    async def data_root(self) -> str:
        with self._call("data_root"):
            return self.data_root_dir

    async def list_desktops(self) -> list[DockerObject]:
        with self._call("list_desktops"):
            return [
                DockerObject("desktop", desktop_name(s), s, d.generation, d.running, d.created_at)
                for s, d in self.containers.items()
            ]

    async def list_volumes(self) -> list[DockerObject]:
        with self._call("list_volumes"):
            return [
                DockerObject("volume", volume_name(s), s, None, False, v.created_at)
                for s, v in self.volumes.items()
                if v.labelled
            ]

    async def remove_container_by_name(self, name: str) -> None:
        with self._call("remove_container_by_name"):
            session_id = self._session_of(name, desktop_name)
            if session_id in self.containers:
                del self.containers[session_id]

    def _session_of(self, name: str, naming: Callable[[str], str]) -> str | None:
        return next((s for s in {*self.containers, *self.volumes} if naming(s) == name), None)

    # -- images -------------------------------------------------------------------------

    async def has(self, image: str) -> bool:
        with self._call("has"):
            return image in self.images_present

    async def pull(self, registry: str, image: str) -> bool:
        with self._call("pull"):
            return self._pull(image)

    def _pull(self, image: str) -> bool:
        if image in self.registry_images:
            self.images_present.add(image)
        return image in self.images_present

    async def copy_into(self, session_id: str, images: list[str]) -> int:
        with self._call("copy_into"):
            missing = [i for i in images if not self._pull(i)]
            if missing:
                raise DesktopError("image_missing", f"image {missing[0]!r} is neither in the sandbox's daemon")
            if not self._running(session_id):
                raise DesktopError("preload_failed", "the desktop's dockerd does not answer")
            self.volumes[session_id].images.update(images)
            return 1024 * len(images)

    # -- the desktop's own dockerd ------------------------------------------------------

    def _running(self, session_id: str) -> bool:
        desktop = self.containers.get(session_id)
        return desktop is not None and desktop.running

    async def wait_ready(self, session_id: str, started_at: float, limit_s: float) -> DockerdReady:
        with self._call("wait_ready"):
            if not self._running(session_id):
                raise DesktopError("desktop_exited", "the desktop exited before its dockerd was ready")
            depth = self.depth + 1
            return DockerdReady(
                duration_ms=1,
                storage_driver="overlay2",
                backing_filesystem="extfs",
                server_version="fake",
                depth=depth,
                address_pool=address_pool(depth),
            )

    async def wait_display(self, session_id: str, started_at: float, limit_s: float) -> DisplayReady:
        with self._call("wait_display"):
            desktop = self.containers.get(session_id)
            if desktop is None or not desktop.running:
                raise DesktopError("desktop_exited", "the desktop exited before its display was ready")
            if desktop.display is None:  # a minimal desktop's start-display never writes one
                raise DesktopError("display_timeout", "the desktop's display was not ready (a minimal desktop)")
            return DisplayReady(
                duration_ms=2,
                width=desktop.display.width,
                height=desktop.display.height,
                depth=24,
                since_init_ms=1,
                start_ms=1,
                restarts=0,
            )

    async def answers(self, session_id: str) -> bool:
        with self._call("answers"):
            return self._running(session_id)

    async def display_marker(self, session_id: str) -> DisplayMarker | None:
        with self._call("display_marker"):
            desktop = self.containers.get(session_id)
            if desktop is None or not desktop.running or desktop.display is None or not desktop.display_up:
                return None
            size = desktop.display
            return DisplayMarker(
                display=":0", width=size.width, height=size.height, depth=24, restarts=desktop.display_restarts
            )

    async def stop_containers(self, session_id: str, timeout_s: int) -> int:
        with self._call("stop_containers"):
            return 0

    async def has_image(self, session_id: str, image: str) -> bool:
        with self._call("has_image"):
            volume = self.volumes.get(session_id)
            return volume is not None and image in volume.images

    # -- privilege probe ----------------------------------------------------------------

    async def try_profile(self, profile: PrivilegeProfile) -> str | None:
        with self._call("try_profile"):
            return None


@dataclass(frozen=True)
class QueuedJob:
    operation: Operation
    session: str
    generation: int


class FakeQueue(JobQueue):
    """arq's queue in a list: a job id (operation, session, generation) is queued once."""

    def __init__(self) -> None:  # no arq connection: nothing is sent anywhere
        self.jobs: list[QueuedJob] = []

    async def enqueue(self, operation: Operation, sandbox: str, session: str, generation: int) -> bool:
        job = QueuedJob(operation, session, generation)
        if job in self.jobs:
            return False
        self.jobs.append(job)
        return True


# -- the real code over the fakes -------------------------------------------------------------

SANDBOX = "fake"


@dataclass
class Stack:
    redis: aioredis.Redis
    keys: Keys
    bus: EventBus
    store: SessionStore
    locks: SessionLocks
    runtime: FakeRuntime
    queue: FakeQueue
    lifecycle: Lifecycle
    # The API's service: stop/start/delete as the API performs them (transition + enqueue).
    sessions: Sessions
    settings: Settings

    def reconciler(self) -> Reconciler:
        # No grace: whatever the records do not explain is removed at once.
        return Reconciler(self.lifecycle, self.queue, grace_s=0.0)

    async def create(self, session_id: str, request: SessionCreate | None = None) -> SessionRecord:
        """A stored ``pending`` record with its create job queued, as a producer makes it."""
        request = msgspec.structs.replace(request or SessionCreate(), id=session_id)
        record = new_record(request, SANDBOX, self.settings)
        await self.store.create(record)
        await self.queue.enqueue(Operation.CREATE, SANDBOX, session_id, record.generation)
        return record

    async def run(self, job: QueuedJob) -> str:
        """What the worker's arq function does with a job."""
        return await self.lifecycle.run(job.operation, job.session, job.generation)

    async def run_queued(self) -> list[str]:
        """Run every queued job, oldest first."""
        results = []
        while self.queue.jobs:
            results.append(await self.run(self.queue.jobs.pop(0)))
        return results

    async def events(self, session_id: str) -> list[Event]:
        return [event for _, event in await self.bus.history(self.keys.session_events(session_id))]

    async def event_types(self, session_id: str) -> list[str]:
        return [event.type for event in await self.events(session_id)]


@contextlib.asynccontextmanager
async def open_stack(redis_url: str, runtime: FakeRuntime | None = None) -> AsyncIterator[Stack]:
    """The stack under a fresh key prefix, removed afterwards."""
    prefix = f"fake-{uuid.uuid4().hex[:12]}:"
    redis = aioredis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    bus = EventBus(redis, keys)
    store = SessionStore(redis, bus)
    locks = SessionLocks(redis, keys, 5.0, "fake-worker")
    runtime = runtime or FakeRuntime(sandbox_id=SANDBOX)
    queue = FakeQueue()
    settings = Settings(key_prefix=prefix, sandbox_id=SANDBOX)
    lifecycle = Lifecycle(
        store,
        bus,
        runtime,
        locks,
        sandbox_id=SANDBOX,
        provision_timeout_s=5.0,
        ready_timeout_s=5.0,
        stop_timeout_s=1,
    )
    sessions = Sessions(store, queue, SandboxRegistry(redis, keys), settings)
    try:
        yield Stack(redis, keys, bus, store, locks, runtime, queue, lifecycle, sessions, settings)
    finally:
        stale = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
        if stale:
            await redis.delete(*stale)
        await redis.aclose()


@contextlib.asynccontextmanager
async def offline_runtime(profile: PrivilegeProfile) -> AsyncIterator[DesktopRuntime]:
    """A real DesktopRuntime that never reaches a daemon: for tests that replace the parts it
    asks (its probe, its images) and check the logic around them."""
    made = DesktopRuntime(
        docker_host="unix:///nonexistent/docker.sock",
        image="orchestrator/desktop:dev",
        sandbox_id="t",
        depth=1,
        socket_dir="/nonexistent",
        profile=profile,
    )
    try:
        yield made
    finally:
        await made.close()
