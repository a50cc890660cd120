"""Images: on the sandbox's daemon (pulled from this level's registry when missing) and
copied from there into a desktop's daemon."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError, DockerStreamError

from .errors import DesktopError, DesktopErrorCode, unless_absent
from .inner import DockerInnerDaemon, image_in_path

# Chunks of the image archive as they stream from one daemon to the other.
CHUNK_BYTES = 1 << 20


class DockerImages:
    def __init__(
        self,
        docker: aiodocker.Docker,
        inner: DockerInnerDaemon,
        *,
        registry: str | None,
        credentials: tuple[str, str] | None = None,
        read_timeout_s: float = 60.0,
    ) -> None:
        self._docker = docker
        self._inner = inner
        # Streams (pull progress, an image archive) have no total: a silence ends them instead.
        self._timeout = aiohttp.ClientTimeout(sock_connect=read_timeout_s, sock_read=read_timeout_s)
        # This level's registry: images missing from the sandbox's daemon are pulled from it.
        self.registry = registry
        self._credentials = credentials  # (user, password) for a registry with auth; never logged

    async def has(self, image: str) -> bool:
        return await unless_absent(self._docker.images.inspect(image_in_path(image))) is not None

    async def ensure(self, image: str) -> bool:
        """True if the sandbox's daemon has ``image``, pulling it from the registry if needed."""
        if await self.has(image):
            return True
        return self.registry is not None and await self.pull(self.registry, image)

    async def pull(self, registry: str, image: str) -> bool:
        """Pull ``image`` from ``registry`` (as ``registry/image``) and tag it under its own
        name, which is what desktops are created from. False if the registry lacks it."""
        remote = f"{registry}/{image}"
        repository, tag = split_reference(remote)
        auth = None
        if self._credentials is not None:
            user, password = self._credentials
            auth = {"username": user, "password": password, "serveraddress": registry}
        try:
            # aiodocker annotates a float (total and read alike); a ClientTimeout is what it uses.
            await self._docker.images.pull(repository, tag=tag, auth=auth, timeout=self._timeout)  # type: ignore[call-overload]
        except TimeoutError as e:
            silent = f"no progress for {self._timeout.sock_read:g} s"
            raise DesktopError("image_pull_failed", f"pulling {remote}: {silent}") from e
        except DockerStreamError as e:
            # The pull answers 200 and reports failure inside its progress stream.
            if "not found" in e.message or "manifest unknown" in e.message:
                return False
            raise DesktopError("image_pull_failed", f"pulling {remote}: {e.message}") from e
        except DockerError as e:
            if e.status == 404:
                return False
            raise DesktopError("image_pull_failed", f"pulling {remote}: {e.message}") from e
        own_repository, own_tag = split_reference(image)
        await self._docker.images.tag(image_in_path(remote), own_repository, tag=own_tag)
        return True

    async def copy_into(self, session_id: str, images: list[str]) -> int:
        """Copy ``images`` from the sandbox's daemon (pulled from the registry if missing
        there) into the desktop's, in one archive so shared layers move once. Returns bytes."""
        for image in images:
            if not await self.ensure(image):
                where = f"the sandbox's daemon nor {self.registry}" if self.registry else "the sandbox's daemon"
                raise DesktopError("image_missing", f"image {image!r} is neither in {where}")
        moved = 0

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal moved
            # The project's one call into aiodocker's private API: its export_image() takes one
            # name, and an archive per image would carry the layers they share once for each.
            query = urllib.parse.urlencode([("names", image) for image in images])
            async with self._docker._query(f"images/get?{query}", timeout=self._timeout) as tar:
                async for chunk in tar.content.iter_chunked(CHUNK_BYTES):
                    moved += len(chunk)
                    yield chunk

        try:
            async with self._inner.client(session_id) as inner:
                await inner.images.import_image(chunks(), timeout=self._inner.timeout())
        except TimeoutError as e:
            # Either daemon went silent (a desktop's dockerd can be stopped by its tenant).
            silent = f"no data for {self._timeout.sock_read:g} s"
            raise DesktopError("preload_failed", f"could not copy {', '.join(images)}: {silent}") from e
        except DockerError as e:
            code: DesktopErrorCode = "image_missing" if e.status == 404 else "preload_failed"
            raise DesktopError(code, f"could not copy {', '.join(images)} into the desktop: {e.message}") from e
        return moved


def split_reference(image: str) -> tuple[str, str]:
    """``host:5000/name:tag`` → (``host:5000/name``, ``tag``); the tag defaults to latest."""
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        repository, _, tag = image.rpartition(":")
        return repository, tag
    return image, "latest"
