"""What must be true before a desktop is made: the desktop image is on the sandbox's daemon
(pulled from this level's registry when missing), the graphical one too before a graphical
desktop, and a privilege profile has been chosen by trying the candidates on that daemon
(workers/privilege.py says which to try)."""

from __future__ import annotations

import asyncio
import logging
import time

from orchestrator.config import WorkerSettings
from orchestrator.schemas import Flavor

from .privilege import PrivilegeProfile, candidates, read_bounding_set, read_uid_map, refusal
from .runtime import DesktopError, DesktopRuntime

log = logging.getLogger("workers.prepare")


class PrivilegeRefused(DesktopError):
    """``auto`` found no profile the worker may use on its own: it stops serving (a session
    that was bringing its desktop up fails with this code)."""

    def __init__(self, message: str) -> None:
        super().__init__("privilege_refused", message)


class DesktopPreparation:
    def __init__(self, runtime: DesktopRuntime, settings: WorkerSettings) -> None:
        self.runtime = runtime
        self.settings = settings
        # Decided for real by choose_privilege; until then, what the runtime was made with.
        self.profile = runtime.profile
        self.decided = False
        # Set once auto refused: the worker stops serving (workers/worker.py).
        self.refused: PrivilegeRefused | None = None
        self.refused_event = asyncio.Event()
        self._lock = asyncio.Lock()
        # Seen on the daemon once: not looked for again (a removal later fails the create
        # with image_missing all the same).
        self.graphical_seen = False
        self._graphical_lock = asyncio.Lock()

    async def at_start(self) -> None:
        await self.ensure_desktop_image()
        await self.choose_privilege()

    async def before_desktop(self, flavor: Flavor = "minimal") -> None:
        """Before each desktop (lifecycle and pool): retry what start-up could not do yet; a
        graphical desktop needs its image (``image_missing`` fails that session, not the worker)."""
        if self.refused is not None:
            raise self.refused
        await self.ensure_desktop_image()
        if not self.decided:
            await self.choose_privilege()
        if flavor == "graphical":
            await self.ensure_graphical_image()

    async def ensure_graphical_image(self) -> None:
        """The graphical image on the sandbox's daemon, pulled from this level's registry when
        missing, at the first graphical desktop rather than at start-up (1.9 GB that a sandbox
        serving none never needs). One pull at a time: concurrent creates wait for it."""
        if self.graphical_seen:
            return
        image, registry = self.settings.graphical_image, self.settings.registry
        async with self._graphical_lock:
            if self.graphical_seen:
                return
            if await self.runtime.images.has(image):
                self.graphical_seen = True
                return
            why = "scripts/build-images.sh --graphical builds it"
            if registry is not None:
                log.info("pulling the graphical desktop image %s from %s", image, registry)
                started = time.monotonic()
                # A failing pull (image_pull_failed) fails this session; the next one tries again.
                found = await self.runtime.images.pull(registry, image)
                if found:
                    log.info("pulled %s from %s in %.1f s", image, registry, time.monotonic() - started)
                    self.graphical_seen = True
                    return
                why = f"{registry} has none either (push it: scripts/stack.sh push)"
            raise DesktopError("image_missing", f"the graphical desktop image {image!r} is missing: {why}")

    async def choose_privilege(self) -> PrivilegeProfile:
        """Try the candidate profiles on the sandbox's daemon; the first that runs is used.
        Without the desktop image nothing can be tried: the choice waits for the first desktop."""
        async with self._lock:
            if self.refused is not None:
                raise self.refused
            try:
                profile = await self._probe()
            except PrivilegeRefused as e:
                log.error("%s", e.message)
                self.refused = e
                self.refused_event.set()
                raise
            self.profile = self.runtime.profile = profile
            if profile.unsafe and profile.confined:
                log.warning(
                    "privilege profile %s: root in a desktop is root of this sandbox's user namespace, "
                    "not of the machine",
                    profile.describe(),
                )
            elif profile.unsafe:
                log.warning(
                    "UNSAFE privilege profile: %s. Root in a desktop is root on this machine "
                    "(docs/threat-model.md); use userns unless an operator must have this one",
                    profile.describe(),
                )
            else:
                log.info("desktops get privilege profile: %s", profile.describe())
            return profile

    async def _probe(self) -> PrivilegeProfile:
        options = candidates(self.settings.privilege, *read_bounding_set(), uid_map=read_uid_map())
        self.decided = True
        if len(options) == 1 and self.settings.privilege != "auto":
            return options[0]  # named by the operator: used as named
        tried: list[tuple[PrivilegeProfile, str]] = []
        for profile in options:
            try:
                why = await self.runtime.probe.try_profile(profile)
            except DesktopError as e:
                log.warning("cannot probe privilege profiles yet (%s); will try before the first desktop", e)
                self.decided = False
                return options[0]
            if why is None:
                return profile
            log.info("privilege profile %s does not work here: %s", profile.describe(), why)
            tried.append((profile, why))
        raise PrivilegeRefused(refusal(tried))

    async def ensure_desktop_image(self) -> None:
        """Pull the desktop image from this level's registry if the daemon lacks it (a new
        sandbox's daemon starts empty). Without a registry the image must be loaded otherwise."""
        registry, image = self.settings.registry, self.settings.desktop_image
        if registry is None or await self.runtime.images.has(image):
            return
        log.info("pulling the desktop image %s from %s", image, registry)
        started = time.monotonic()
        try:
            found = await self.runtime.images.pull(registry, image)
        except DesktopError as e:
            log.warning("could not pull the desktop image: %s (will retry before the next desktop)", e)
            return
        if found:
            log.info("pulled %s from %s in %.1f s", image, registry, time.monotonic() - started)
        else:
            log.warning("%s has no %s yet (push it: make images); will retry before the next desktop", registry, image)
