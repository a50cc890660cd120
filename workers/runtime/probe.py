"""The privilege probe: does a desktop container run here with a given profile?"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError

from orchestrator.names import LABEL_ROLE, LABEL_SANDBOX

from ..privilege import PrivilegeProfile
from .errors import DesktopError, existed

# The probe runs `true`: anything slower than this is not going to work either.
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=30)


class DockerPrivilegeProbe:
    def __init__(self, docker: aiodocker.Docker, *, image: str, sandbox_id: str) -> None:
        self._docker = docker
        self.image = image
        self.sandbox_id = sandbox_id

    async def try_profile(self, profile: PrivilegeProfile) -> str | None:
        """Run a throwaway container of the desktop image with ``profile``: None if it runs,
        else why not (runc refuses e.g. --privileged where CAP_SYS_RESOURCE is missing; the
        userns set-up fails where the kernel or the daemon does not allow it)."""
        name = f"privilege-probe-{self.sandbox_id}-{os.getpid()}"
        config: dict[str, Any] = {
            "Image": self.image,
            **profile.probe_config(),
            "Labels": {LABEL_SANDBOX: self.sandbox_id, LABEL_ROLE: "probe"},
            "HostConfig": profile.host_config(),
        }
        probe = self._docker.containers.container(name)
        try:
            await existed(probe.delete(force=True))  # one an earlier run of this pid left
            await self._docker.containers.create(config, name=name)
            await probe.start()
            result = await probe.wait(timeout=PROBE_TIMEOUT)
            status = result.get("StatusCode")
            if status == 0:
                return None
            logs = "".join(await probe.log(stdout=True, stderr=True, tail=5)).strip()
            return f"the probe exited with status {status}: {logs[-300:]}"
        except DockerError as e:
            if e.status == 404 and "image" in e.message.lower():
                # Nothing learnt about privileges: the image is not here (yet).
                raise DesktopError("image_missing", f"desktop image {self.image!r} is missing") from e
            return e.message
        except TimeoutError:
            return f"the probe did not finish within {PROBE_TIMEOUT.total:g} s"
        finally:
            with contextlib.suppress(DockerError):
                await existed(probe.delete(force=True))
