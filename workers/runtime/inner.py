"""The desktop's own dockerd, reached through the socket its desktop shares with the worker."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError

from orchestrator.names import address_pool
from orchestrator.schemas import DisplayReady, DockerdReady

from ..privilege import USERNS_SIZE, slot_base
from .desktop_spec import socket_path
from .desktops import DockerDesktops
from .display import DisplayMarker, MarkerInvalid, marker_path, read_marker
from .errors import DesktopError, unless_absent

log = logging.getLogger("workers.runtime.inner")

# How often a wait for dockerd asks the sandbox's daemon whether the desktop still runs.
EXIT_CHECK_S = 0.5


def image_in_path(image: str) -> str:
    """``image`` as a Docker API path segment (aiodocker puts names into ``images/{name}/json``
    as they are): quoted, and refused if it has a component a URL would resolve (``..``,
    ``.``, empty), so no name reaches another endpoint (L1; requests are checked by ImageRef)."""
    if any(part in ("", ".", "..") for part in image.split("/")):
        raise DesktopError("image_missing", f"image {image[:200]!r} is not a valid reference")
    return urllib.parse.quote(image, safe="/:@")


@contextlib.contextmanager
def pinned_socket(path: str) -> Iterator[str]:
    """A path that reaches the socket at ``path`` and nothing else, for as long as the block runs.

    ``path`` is in a directory the desktop writes (its /run/orchestrator): its root may put a
    symlink there to any socket of the worker's filesystem, the sandbox's dockerd included
    (e3), and swap it between a check and a connect. So the entry is opened once without
    following it (O_PATH | O_NOFOLLOW: a symlink is opened as itself), must be a socket, and
    the connect goes through the descriptor (/proc/self/fd/N), which no later rename moves.
    Raises OSError (ENOENT when absent, ENOTSOCK for anything but a socket)."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.ENOTSOCK, "not a socket (a desktop controls this path)", path)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


class DockerInnerDaemon:
    def __init__(self, desktops: DockerDesktops, *, read_timeout_s: float = 60.0) -> None:
        # The desktops' side: where the sockets are, and whether a desktop still runs.
        self._desktops = desktops
        # A desktop's dockerd is the tenant's: it may stall (SIGSTOP) and must not hang us.
        self.read_timeout_s = read_timeout_s

    def timeout(self, extra_s: float = 0.0) -> aiohttp.ClientTimeout:
        """No total (an image import may be long), but no silence longer than the read timeout."""
        return aiohttp.ClientTimeout(sock_connect=self.read_timeout_s, sock_read=self.read_timeout_s + extra_s)

    @contextlib.asynccontextmanager
    async def client(self, session_id: str, extra_s: float = 0.0) -> AsyncIterator[aiodocker.Docker]:
        """A client of the desktop's dockerd, its reads bounded (``extra_s`` more for a call
        that waits by design, as a stop does for its grace period)."""
        with pinned_socket(self._socket(session_id)) as path:
            client = aiodocker.Docker(url=f"unix://{path}", timeout=self.timeout(extra_s))
            try:
                yield client
            finally:
                await client.close()

    def _socket(self, session_id: str) -> str:
        return socket_path(self._desktops.socket_dir, session_id)

    async def stop_containers(self, session_id: str, timeout_s: int) -> int:
        """``docker stop`` every running container of the desktop's own dockerd, all at once,
        so they get their stop signal and grace before the desktop goes. Best effort: a
        desktop whose dockerd does not answer is stopped as it is."""
        try:
            async with self.client(session_id, extra_s=timeout_s) as inner, asyncio.timeout(timeout_s + 15):
                running = await inner.containers.list()
                await asyncio.gather(*(c.stop(t=timeout_s) for c in running), return_exceptions=True)
                return len(running)
        except (DockerError, aiohttp.ClientError, OSError, TimeoutError) as e:
            log.info("could not stop the inner containers of %s first: %s", session_id, e)
            return 0

    async def answers(self, session_id: str) -> bool:
        """At most 2 s."""
        return await _ping(self._socket(session_id))

    async def wait_ready(self, session_id: str, started_at: float, limit_s: float) -> DockerdReady:
        """Wait until the desktop's dockerd answers ``/_ping``, then read what it reports.

        Fails fast (``desktop_exited``) when the desktop stops, e.g. because start-dockerd
        refused to run; fails with ``dockerd_timeout`` after ``limit_s`` seconds.
        """
        deadline = started_at + limit_s
        next_check = time.monotonic() + EXIT_CHECK_S
        while not await _ping(self._socket(session_id)):
            now = time.monotonic()
            if now >= deadline:
                raise DesktopError("dockerd_timeout", f"the desktop's dockerd did not answer within {limit_s:g} s")
            if now >= next_check:
                next_check = now + EXIT_CHECK_S
                await self._fail_if_exited(session_id)
            await asyncio.sleep(0.02)
        duration_ms = int((time.monotonic() - started_at) * 1000)
        await self._check_userns(session_id)
        async with self.client(session_id) as inner:
            info = await inner.system.info()
        driver_status = dict(info.get("DriverStatus") or [])
        depth = self._desktops.depth + 1
        return DockerdReady(
            duration_ms=duration_ms,
            storage_driver=info.get("Driver", ""),
            backing_filesystem=driver_status.get("Backing Filesystem", ""),
            server_version=info.get("ServerVersion", ""),
            depth=depth,
            address_pool=address_pool(depth),
        )

    async def wait_display(self, session_id: str, started_at: float, limit_s: float) -> DisplayReady:
        """Wait until the graphical desktop's start-display writes display.ready (display.py),
        under the same deadline as its dockerd (``limit_s`` from ``started_at``): ``desktop_exited``
        if the desktop stops first, ``display_timeout`` after it. A marker that does not parse
        is waited past (start-display renames a whole line into place) and named if it stays."""
        deadline = started_at + limit_s
        next_check = time.monotonic() + EXIT_CHECK_S
        path = marker_path(self._desktops.socket_dir, session_id)
        invalid = ""
        while True:
            try:
                marker = read_marker(path)
            except MarkerInvalid as e:
                marker, invalid = None, str(e)
            if marker is not None:
                break
            now = time.monotonic()
            if now >= deadline:
                why = f" ({invalid})" if invalid else ""
                raise DesktopError("display_timeout", f"the desktop's display was not ready within {limit_s:g} s{why}")
            if now >= next_check:
                next_check = now + EXIT_CHECK_S
                await self._fail_if_exited(session_id, "its display")
            await asyncio.sleep(0.02)
        return DisplayReady(
            duration_ms=int((time.monotonic() - started_at) * 1000),
            width=marker.width,
            height=marker.height,
            depth=marker.depth,
            display=marker.display,
            since_init_ms=marker.since_init_ms,
            start_ms=marker.start_ms,
            restarts=marker.restarts,
        )

    async def display_marker(self, session_id: str) -> DisplayMarker | None:
        try:
            return read_marker(marker_path(self._desktops.socket_dir, session_id))
        except MarkerInvalid:
            return None

    async def _check_userns(self, session_id: str) -> None:
        """Under userns, the socket must be the namespaced dockerd's: made by its root, a uid of
        the desktop's range. A dockerd running as the sandbox's root (an image without the
        userns set-up, which would be the caps profile in all but name) is refused."""
        slot = await self._desktops.userns_slot(session_id)
        if slot is None:
            return
        base = slot_base(slot)
        try:
            with pinned_socket(self._socket(session_id)) as path:  # never a link's target (e3)
                info = os.stat(path)
        except OSError as e:
            raise DesktopError("desktop_not_userns", f"the desktop's socket is not one: {e}") from e
        if not base <= info.st_uid < base + USERNS_SIZE:
            raise DesktopError(
                "desktop_not_userns",
                f"the desktop's dockerd is not in its user namespace (socket uid {info.st_uid}, "
                f"expected {base}..{base + USERNS_SIZE - 1}): does the desktop image have userns-desktop?",
            )

    async def _fail_if_exited(self, session_id: str, what: str = "its dockerd") -> None:
        desktop = await self._desktops.inspect(session_id)
        if desktop is None or not desktop.running:
            logs = await self._desktops.logs(session_id)
            code = "?" if desktop is None else desktop.exit_code
            raise DesktopError(
                "desktop_exited", f"the desktop exited (status {code}) before {what} was ready: {logs[-500:]}"
            )

    async def has_image(self, session_id: str, image: str) -> bool:
        try:
            async with self.client(session_id) as inner:
                return await unless_absent(inner.images.inspect(image_in_path(image))) is not None
        except TimeoutError as e:  # its read timeout: the desktop's dockerd stalled
            silent = f"the desktop's dockerd did not answer within {self.read_timeout_s:g} s"
            raise DesktopError("preload_failed", f"could not look for {image!r}: {silent}") from e


async def _ping(socket: str) -> bool:
    """Whether a dockerd answers ``/_ping`` on the socket at ``socket`` (pinned), within 2 s."""
    try:
        with pinned_socket(socket) as path:
            connector = aiohttp.UnixConnector(path=path)
            async with (
                aiohttp.ClientSession(connector=connector) as http,
                http.get("http://dockerd/_ping", timeout=aiohttp.ClientTimeout(total=2)) as resp,
            ):
                return resp.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False
