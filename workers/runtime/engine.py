"""``DesktopRuntime``: the port on the sandbox's Docker Engine, one aiodocker client shared
by its parts."""

from __future__ import annotations

import os

import aiodocker
import aiohttp

from ..privilege import PrivilegeProfile
from .desktops import DockerDesktops
from .execs import DockerExecs
from .files import DesktopFiles
from .images import DockerImages
from .inner import DockerInnerDaemon
from .netns import DesktopPorts
from .probe import DockerPrivilegeProbe
from .screen import DesktopScreen
from .terminals import DockerTerminals


class DesktopRuntime:
    def __init__(
        self,
        *,
        docker_host: str | None,
        image: str,
        graphical_image: str | None = None,
        sandbox_id: str,
        depth: int,
        socket_dir: str,
        profile: PrivilegeProfile,
        registry: str | None = None,
        registry_credentials: tuple[str, str] | None = None,
        read_timeout_s: float = 60.0,
        exec_connections: int = 128,
    ) -> None:
        self._docker = aiodocker.Docker(url=docker_host)
        # Execs hold a connection each for as long as they run: a pool of their own, so that
        # a hundred long commands never keep a lifecycle job from reaching the daemon.
        self._exec_docker = _docker_with_pool(docker_host, exec_connections)
        self.desktops = DockerDesktops(
            self._docker,
            image=image,
            graphical_image=graphical_image,
            sandbox_id=sandbox_id,
            depth=depth,
            socket_dir=socket_dir,
            profile=profile,
        )
        self.inner = DockerInnerDaemon(self.desktops, read_timeout_s=read_timeout_s)
        self.images = DockerImages(
            self._docker, self.inner, registry=registry, credentials=registry_credentials, read_timeout_s=read_timeout_s
        )
        self.probe = DockerPrivilegeProbe(self._docker, image=image, sandbox_id=sandbox_id)
        self.execs = DockerExecs(self._exec_docker)
        # Terminals, files and ports hold a connection as long as they last too.
        self.terminals = DockerTerminals(self._exec_docker)
        self.files = DesktopFiles(self._exec_docker)
        self.ports = DesktopPorts(self._docker)
        self.screen = DesktopScreen(self._exec_docker)

    @property
    def profile(self) -> PrivilegeProfile:
        return self.desktops.profile

    @profile.setter
    def profile(self, profile: PrivilegeProfile) -> None:
        # Decided by the worker's probe at start-up (or before the first desktop).
        self.desktops.profile = profile

    async def close(self) -> None:
        await self._docker.close()
        await self._exec_docker.close()
        if self._exec_docker.connector is not None:  # ours, not aiodocker's, when we made it
            await self._exec_docker.connector.close()


def _docker_with_pool(docker_host: str | None, connections: int) -> aiodocker.Docker:
    host = docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if host.startswith("unix://"):
        connector = aiohttp.UnixConnector(path=host.removeprefix("unix://"), limit=connections)
        return aiodocker.Docker(url="unix://localhost", connector=connector)
    return aiodocker.Docker(url=host)  # tcp: aiodocker's own connector (its limit, 100)
