"""``DesktopRuntime``: the port on the sandbox's Docker Engine, one aiodocker client shared
by its parts."""

from __future__ import annotations

import aiodocker

from ..privilege import PrivilegeProfile
from .desktops import DockerDesktops
from .execs import DockerExecs
from .images import DockerImages
from .inner import DockerInnerDaemon
from .probe import DockerPrivilegeProbe


class DesktopRuntime:
    def __init__(
        self,
        *,
        docker_host: str | None,
        image: str,
        sandbox_id: str,
        depth: int,
        socket_dir: str,
        profile: PrivilegeProfile,
        registry: str | None = None,
        registry_credentials: tuple[str, str] | None = None,
        read_timeout_s: float = 60.0,
    ) -> None:
        self._docker = aiodocker.Docker(url=docker_host)
        self.desktops = DockerDesktops(
            self._docker, image=image, sandbox_id=sandbox_id, depth=depth, socket_dir=socket_dir, profile=profile
        )
        self.inner = DockerInnerDaemon(self.desktops, read_timeout_s=read_timeout_s)
        self.images = DockerImages(
            self._docker, self.inner, registry=registry, credentials=registry_credentials, read_timeout_s=read_timeout_s
        )
        self.probe = DockerPrivilegeProbe(self._docker, image=image, sandbox_id=sandbox_id)
        self.execs = DockerExecs(self._docker)

    @property
    def profile(self) -> PrivilegeProfile:
        return self.desktops.profile

    @profile.setter
    def profile(self, profile: PrivilegeProfile) -> None:
        # Decided by the worker's probe at start-up (or before the first desktop).
        self.desktops.profile = profile

    async def close(self) -> None:
        await self._docker.close()
