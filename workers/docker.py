"""Everything the worker does to Docker goes through here (aiodocker).

Objects are found by their deterministic names, so every call is safe to repeat: creating
what exists adopts it, removing what is gone succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError

from orchestrator.names import (
    LABEL_DEPTH,
    LABEL_GENERATION,
    LABEL_ROLE,
    LABEL_SANDBOX,
    LABEL_SESSION,
    address_pool,
    desktop_name,
    volume_name,
)
from orchestrator.schemas import Resources

from .privilege import PrivilegeProfile

log = logging.getLogger("workers.docker")


# The stable codes a DesktopError carries; a session's error.code is one of these, or
# desktop_lost / internal_error (README "Deadlines and failures").
DesktopErrorCode = Literal[
    "desktop_create_failed",
    "desktop_exited",
    "desktop_remove_failed",
    "desktop_start_failed",
    "dockerd_timeout",
    "image_missing",
    "image_pull_failed",
    "preload_failed",
    "provision_timeout",
    "resources_exceed_sandbox",
    "volume_create_failed",
    "volume_lost",
    "volume_remove_failed",
]


class DesktopError(Exception):
    """A failure with a stable code, recorded on the session as its error."""

    def __init__(self, code: DesktopErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Desktop:
    name: str
    id: str
    running: bool
    generation: int | None
    exit_code: int | None


@dataclass(frozen=True)
class DockerObject:
    """A labelled desktop or volume, as the reconciler sees it."""

    kind: str  # desktop | volume
    name: str
    session: str
    generation: int | None
    running: bool
    created_at: float  # Unix seconds


@dataclass(frozen=True)
class DockerdInfo:
    duration_ms: int
    storage_driver: str
    backing_filesystem: str
    server_version: str


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
    ) -> None:
        self._docker = aiodocker.Docker(url=docker_host)
        # This level's registry: images missing from the sandbox's daemon are pulled from it.
        self.registry = registry
        self.image = image
        self.sandbox_id = sandbox_id
        self.depth = depth  # of the sandbox; desktops run at depth + 1
        self.socket_dir = socket_dir
        self.profile = profile

    async def close(self) -> None:
        await self._docker.close()

    @property
    def network(self) -> str:
        return f"desktops-{self.sandbox_id}"

    async def ensure_network(self, icc: bool = False) -> None:
        """The bridge network desktops join: outbound works, but with inter-container traffic
        off, so no desktop reaches another's ports (sessions are isolated from each other)."""
        try:
            await self._docker._query_json(f"networks/{self.network}")
            return
        except DockerError as e:
            if e.status != 404:
                raise
        body = {
            "Name": self.network,
            "Driver": "bridge",
            "CheckDuplicate": True,
            "Options": {"com.docker.network.bridge.enable_icc": "true" if icc else "false"},
            "Labels": {LABEL_SANDBOX: self.sandbox_id, LABEL_ROLE: "desktop-network"},
        }
        try:
            await self._docker._query_json("networks/create", "POST", data=json.dumps(body))
        except DockerError as e:
            if e.status != 409:  # another worker of this sandbox made it first
                raise

    async def network_bridge(self) -> str:
        """The Linux bridge of the desktops' network (where the firewall rules attach)."""
        info = await self._docker._query_json(f"networks/{self.network}")
        name: str = info.get("Options", {}).get("com.docker.network.bridge.name") or f"br-{info['Id'][:12]}"
        return name

    async def _request(self, method: str, path: str, **kwargs: Any) -> None:
        async with self._docker._query(path, method, **kwargs):
            pass

    # -- naming ---------------------------------------------------------------------------

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

    def socket_path(self, session_id: str) -> str:
        return os.path.join(self.socket_dir, session_id, "docker.sock")

    # -- volume ---------------------------------------------------------------------------

    async def ensure_volume(self, session_id: str) -> bool:
        """Create the session's volume unless it exists; True when it was created now."""
        if await self.volume_exists(session_id):
            return False
        body = {"Name": volume_name(session_id), "Labels": self.labels(session_id)}
        try:
            await self._docker._query_json("volumes/create", "POST", data=json.dumps(body))
        except DockerError as e:
            raise DesktopError("volume_create_failed", f"could not create the volume: {e.message}") from e
        return True

    async def remove_volume(self, session_id: str) -> bool:
        try:
            await self._request("DELETE", f"volumes/{volume_name(session_id)}")
        except DockerError as e:
            if e.status == 404:
                return False
            raise DesktopError("volume_remove_failed", f"could not remove the volume: {e.message}") from e
        return True

    async def volume_exists(self, session_id: str) -> bool:
        try:
            await self._docker._query_json(f"volumes/{volume_name(session_id)}")
        except DockerError as e:
            if e.status == 404:
                return False
            raise
        return True

    # -- desktop container ----------------------------------------------------------------

    async def inspect_desktop(self, session_id: str) -> Desktop | None:
        try:
            info = await self._docker._query_json(f"containers/{desktop_name(session_id)}/json")
        except DockerError as e:
            if e.status == 404:
                return None
            raise
        state = info.get("State") or {}
        raw_generation = (info.get("Config") or {}).get("Labels", {}).get(LABEL_GENERATION)
        return Desktop(
            name=desktop_name(session_id),
            id=info["Id"],
            running=bool(state.get("Running")),
            generation=int(raw_generation) if raw_generation and raw_generation.isdigit() else None,
            exit_code=state.get("ExitCode"),
        )

    def desktop_config(
        self,
        session_id: str,
        generation: int,
        resources: Resources | None = None,
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        sockets = os.path.dirname(self.socket_path(session_id))
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
        # The session's own variables first: ours come last and win.
        variables = [f"{k}={v}" for k, v in sorted((env or {}).items())]
        variables += [
            f"ORCH_DEPTH={self.depth + 1}",
            f"ORCH_SESSION={session_id}",
            "ORCH_EXTERNAL_SOCKET=/run/orchestrator/docker.sock",
        ]
        return {
            "Image": self.image,
            "Hostname": desktop_name(session_id)[:63],
            "Env": variables,
            "Labels": self.labels(session_id, generation),
            "HostConfig": host_config,
        }

    async def create_desktop(
        self,
        session_id: str,
        generation: int,
        resources: Resources | None = None,
        env: dict[str, str] | None = None,
    ) -> Desktop:
        """Create the desktop for ``generation``; adopt one that exists for it, replace an older one."""
        existing = await self.inspect_desktop(session_id)
        if existing is not None and existing.generation == generation:
            return existing
        if existing is not None:
            await self.remove_desktop(session_id)
        os.makedirs(os.path.dirname(self.socket_path(session_id)), exist_ok=True)
        try:
            await self._docker._query_json(
                "containers/create",
                "POST",
                params={"name": desktop_name(session_id)},
                data=json.dumps(self.desktop_config(session_id, generation, resources, env)),
            )
        except DockerError as e:
            if e.status == 409:  # created concurrently by a retry of this job: adopt it
                pass
            elif e.status == 404:
                raise DesktopError("image_missing", f"desktop image {self.image!r} is missing") from e
            else:
                raise DesktopError("desktop_create_failed", f"could not create the desktop: {e.message}") from e
        created = await self.inspect_desktop(session_id)
        if created is None:
            raise DesktopError("desktop_create_failed", "the desktop vanished right after it was created")
        return created

    async def start_desktop(self, session_id: str) -> None:
        try:
            await self._request("POST", f"containers/{desktop_name(session_id)}/start")
        except DockerError as e:
            if e.status == 304:  # already running
                return
            raise DesktopError("desktop_start_failed", f"could not start the desktop: {e.message}") from e

    async def remove_desktop(self, session_id: str, stop_timeout: int = 20) -> bool:
        """Stop (gracefully, so the inner dockerd shuts down cleanly) and remove the desktop."""
        name = desktop_name(session_id)
        try:
            with contextlib.suppress(DockerError):
                await self._request(
                    "POST", f"containers/{name}/stop", params={"t": stop_timeout}, timeout=stop_timeout + 30
                )
            await self._request("DELETE", f"containers/{name}", params={"force": "true"})
        except DockerError as e:
            if e.status == 404:
                return False
            if e.status == 409 and "in progress" in e.message:
                # Someone else (a reconciler, a second worker) is removing it: done when it is gone.
                return await self._wait_gone(name, stop_timeout + 30)
            raise DesktopError("desktop_remove_failed", f"could not remove the desktop: {e.message}") from e
        return True

    async def _wait_gone(self, name: str, limit_s: float) -> bool:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            try:
                await self._docker._query_json(f"containers/{name}/json")
            except DockerError as e:
                if e.status == 404:
                    return True
                raise DesktopError("desktop_remove_failed", f"could not remove the desktop: {e.message}") from e
            await asyncio.sleep(0.05)
        raise DesktopError("desktop_remove_failed", f"{name} was still being removed after {limit_s:g} s")

    def remove_socket_dir(self, session_id: str) -> None:
        shutil.rmtree(os.path.dirname(self.socket_path(session_id)), ignore_errors=True)

    async def desktop_logs(self, session_id: str, tail: int = 20) -> str:
        try:
            container = self._docker.containers.container(desktop_name(session_id))
            lines = await container.log(stdout=True, stderr=True, tail=tail)
        except DockerError:
            return ""
        return "".join(lines).strip()

    # -- the desktop's own dockerd -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def inner_docker(self, session_id: str) -> AsyncIterator[aiodocker.Docker]:
        """A client of the desktop's dockerd, through the socket it exposes to us."""
        client = aiodocker.Docker(url=f"unix://{self.socket_path(session_id)}")
        try:
            yield client
        finally:
            await client.close()

    async def stop_inner_containers(self, session_id: str, timeout_s: int) -> int:
        """``docker stop`` every running container of the desktop's own dockerd, all at once,
        so they get their stop signal and grace before the desktop goes. Best effort: a
        desktop whose dockerd does not answer is stopped as it is. Returns how many stopped."""
        try:
            async with self.inner_docker(session_id) as inner, asyncio.timeout(timeout_s + 15):
                running = await inner.containers.list()
                await asyncio.gather(*(c.stop(t=timeout_s) for c in running), return_exceptions=True)
                return len(running)
        except (DockerError, aiohttp.ClientError, OSError, TimeoutError) as e:
            log.info("could not stop the inner containers of %s first: %s", session_id, e)
            return 0

    async def dockerd_answers(self, session_id: str) -> bool:
        """One health probe: does the desktop's own dockerd answer ``/_ping`` (2 s at most)?"""
        connector = aiohttp.UnixConnector(path=self.socket_path(session_id))
        async with aiohttp.ClientSession(connector=connector) as http:
            return await _ping(http)

    async def wait_dockerd(self, session_id: str, started_at: float, limit_s: float) -> DockerdInfo:
        """Wait until the desktop's dockerd answers ``/_ping``, then read what it reports.

        Fails fast (``desktop_exited``) when the desktop stops, e.g. because start-dockerd
        refused to run; fails with ``dockerd_timeout`` after ``limit_s`` seconds.
        """
        path = self.socket_path(session_id)
        deadline = started_at + limit_s
        connector = aiohttp.UnixConnector(path=path)
        async with aiohttp.ClientSession(connector=connector) as http:
            next_check = time.monotonic() + 0.5
            while True:
                if await _ping(http):
                    duration_ms = int((time.monotonic() - started_at) * 1000)
                    break
                now = time.monotonic()
                if now >= deadline:
                    raise DesktopError(
                        "dockerd_timeout",
                        f"the desktop's dockerd did not answer within {limit_s:g} s",
                    )
                if now >= next_check:
                    next_check = now + 0.5
                    desktop = await self.inspect_desktop(session_id)
                    if desktop is None or not desktop.running:
                        logs = await self.desktop_logs(session_id)
                        code = "?" if desktop is None else desktop.exit_code
                        raise DesktopError(
                            "desktop_exited",
                            f"the desktop exited (status {code}) before its dockerd was ready: {logs[-500:]}",
                        )
                await asyncio.sleep(0.02)
        async with self.inner_docker(session_id) as inner:
            info = await inner.system.info()
        driver_status = dict(info.get("DriverStatus") or [])
        return DockerdInfo(
            duration_ms=duration_ms,
            storage_driver=info.get("Driver", ""),
            backing_filesystem=driver_status.get("Backing Filesystem", ""),
            server_version=info.get("ServerVersion", ""),
        )

    async def probe_profile(self, profile: PrivilegeProfile) -> str | None:
        """Run a throwaway container of the desktop image with ``profile``: None if it runs,
        else why not (runc refuses e.g. --privileged where CAP_SYS_RESOURCE is missing)."""
        name = f"privilege-probe-{self.sandbox_id}-{os.getpid()}"
        config = {
            "Image": self.image,
            "Entrypoint": ["true"],
            "Cmd": [],
            "Labels": {LABEL_SANDBOX: self.sandbox_id, LABEL_ROLE: "probe"},
            "HostConfig": profile.host_config(),
        }
        try:
            await self._remove_container(name)
            await self._docker._query_json("containers/create", "POST", params={"name": name}, data=json.dumps(config))
            await self._request("POST", f"containers/{name}/start")
            result = await self._docker._query_json(f"containers/{name}/wait", "POST", timeout=30)
            status = result.get("StatusCode")
            return None if status == 0 else f"the probe exited with status {status}"
        except DockerError as e:
            if e.status == 404 and "image" in e.message.lower():
                # Nothing learnt about privileges: the image is not here (yet).
                raise DesktopError("image_missing", f"desktop image {self.image!r} is missing") from e
            return e.message
        finally:
            with contextlib.suppress(DockerError):
                await self._remove_container(name)

    async def _remove_container(self, name: str) -> None:
        try:
            await self._request("DELETE", f"containers/{name}", params={"force": "true"})
        except DockerError as e:
            if e.status != 404:
                raise

    async def has_image(self, image: str) -> bool:
        try:
            await self._docker._query_json(f"images/{image}/json")
        except DockerError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def ensure_image(self, image: str) -> bool:
        """True if the sandbox's daemon has ``image``, pulling it from the registry if needed."""
        if await self.has_image(image):
            return True
        return self.registry is not None and await self.pull_from_registry(self.registry, image)

    async def pull_from_registry(self, registry: str, image: str) -> bool:
        """Pull ``image`` from this level's registry (``registry/image``) and tag it under its
        own name, which is what desktops are created from. False if the registry lacks it."""
        remote = f"{registry}/{image}"
        repository, tag = split_reference(remote)
        try:
            # The pull answers 200 and reports failure inside its progress stream.
            async with self._docker._query(
                "images/create", "POST", params={"fromImage": repository, "tag": tag}, timeout=None
            ) as response:
                body = await response.read()
        except DockerError as e:
            if e.status == 404:
                return False
            raise DesktopError("image_pull_failed", f"pulling {remote}: {e.message}") from e
        for line in body.splitlines():
            error = json.loads(line).get("error") if line.strip() else None
            if error:
                if "not found" in error or "manifest unknown" in error:
                    return False
                raise DesktopError("image_pull_failed", f"pulling {remote}: {error}")
        own_repository, own_tag = split_reference(image)
        await self._request("POST", f"images/{remote}/tag", params={"repo": own_repository, "tag": own_tag})
        return True

    def desktop_address_pool(self) -> str:
        return address_pool(self.depth + 1)

    async def inner_has_image(self, session_id: str, image: str) -> bool:
        async with self.inner_docker(session_id) as inner:
            try:
                await inner._query_json(f"images/{image}/json")
            except DockerError as e:
                if e.status == 404:
                    return False
                raise
        return True

    async def load_images(self, session_id: str, images: list[str]) -> int:
        """Copy ``images`` from the sandbox's daemon (pulled from the registry if missing
        there) into the desktop's, in one archive so shared layers move once. Returns bytes."""
        for image in images:
            if not await self.ensure_image(image):
                where = f"the sandbox's daemon nor {self.registry}" if self.registry else "the sandbox's daemon"
                raise DesktopError("image_missing", f"image {image!r} is neither in {where}")
        moved = 0

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal moved
            query = urllib.parse.urlencode([("names", image) for image in images])
            async with self._docker._query(f"images/get?{query}", timeout=None) as tar:
                async for chunk in tar.content.iter_chunked(1 << 20):
                    moved += len(chunk)
                    yield chunk

        try:
            async with self.inner_docker(session_id) as inner:
                await inner.images.import_image(chunks())
        except DockerError as e:
            code: DesktopErrorCode = "image_missing" if e.status == 404 else "preload_failed"
            raise DesktopError(code, f"could not copy {', '.join(images)} into the desktop: {e.message}") from e
        return moved

    async def list_desktops(self) -> list[DockerObject]:
        """This sandbox's desktops, found by label (an unlabelled container is never ours)."""
        filters = json.dumps({"label": [f"{LABEL_ROLE}=desktop", f"{LABEL_SANDBOX}={self.sandbox_id}"]})
        found = await self._docker._query_json("containers/json", params={"all": "true", "filters": filters})
        out = []
        for c in found:
            labels = c.get("Labels") or {}
            raw_generation = labels.get(LABEL_GENERATION, "")
            out.append(
                DockerObject(
                    kind="desktop",
                    name=(c.get("Names") or ["/?"])[0].lstrip("/"),
                    session=labels.get(LABEL_SESSION, ""),
                    generation=int(raw_generation) if raw_generation.isdigit() else None,
                    running=c.get("State") == "running",
                    created_at=float(c.get("Created") or 0),
                )
            )
        return out

    async def list_volumes(self) -> list[DockerObject]:
        filters = json.dumps({"label": [f"{LABEL_SANDBOX}={self.sandbox_id}", LABEL_SESSION]})
        found = await self._docker._query_json("volumes", params={"filters": filters})
        out = []
        for v in found.get("Volumes") or []:
            created = v.get("CreatedAt") or ""
            try:
                created_at = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
            except ValueError:
                created_at = 0.0
            out.append(
                DockerObject(
                    kind="volume",
                    name=v["Name"],
                    session=(v.get("Labels") or {}).get(LABEL_SESSION, ""),
                    generation=None,
                    running=False,
                    created_at=created_at,
                )
            )
        return out

    async def remove_container_by_name(self, name: str) -> None:
        await self._remove_container(name)

    async def remove_volume_by_name(self, name: str) -> None:
        try:
            await self._request("DELETE", f"volumes/{name}")
        except DockerError as e:
            if e.status != 404:
                raise DesktopError("volume_remove_failed", f"could not remove volume {name}: {e.message}") from e


def split_reference(image: str) -> tuple[str, str]:
    """``host:5000/name:tag`` → (``host:5000/name``, ``tag``); the tag defaults to latest."""
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        repository, _, tag = image.rpartition(":")
        return repository, tag
    return image, "latest"


async def _ping(http: aiohttp.ClientSession) -> bool:
    try:
        async with http.get("http://dockerd/_ping", timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False
