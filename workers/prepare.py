"""What must be true before a desktop is made: the desktop image is on the sandbox's daemon
(pulled from this level's registry when missing) and a privilege profile has been chosen by
trying the candidates on that daemon (workers/privilege.py says which to try)."""

from __future__ import annotations

import asyncio
import logging
import time

from orchestrator.config import WorkerSettings

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

    async def at_start(self) -> None:
        await self.ensure_desktop_image()
        await self.choose_privilege()

    async def before_desktop(self) -> None:
        """Before each desktop (lifecycle and pool): retry what start-up could not do yet."""
        if self.refused is not None:
            raise self.refused
        await self.ensure_desktop_image()
        if not self.decided:
            await self.choose_privilege()

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
