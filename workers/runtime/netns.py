"""A TCP connection to a port of a desktop's own loopback: 127.0.0.1 in the network namespace
where the desktop's user runs (a userns desktop's namespaces, where its dockerd's docker-proxy
listens for ``docker run -p``; the container's own under the other profiles). A server that
listens only there, or on 0.0.0.0 there, is reached; nothing is published anywhere.

How: the socket is made in that namespace and connected from here. A short-lived thread
enters the namespace (setns(2) on /proc/PID/ns/net; Python 3.11 has no os.setns), creates the
socket and ends; a socket keeps the namespace it was made in, so the event loop connects it
and uses it like any other. The thread never runs anything else: the process's other threads,
and the event loop, stay in the worker's namespace.

PID is the desktop's container's (Docker's State.Pid, in the daemon's pid namespace), or for a
userns desktop the pid 1 of its namespaces (a child of the container's processes one pid
namespace down: userns-desktop.sh inner_pid). So this works where the worker shares the
sandbox dockerd's pid namespace (the sandbox container, where sandbox-init runs both; a worker
on the host of its daemon); elsewhere the pid means nothing here and the answer is
``port_unreachable``. It needs CAP_SYS_ADMIN (setns) and CAP_SYS_PTRACE (another process's
ns files), which the sandbox has (docker-compose.yml), and a seccomp profile that allows
setns (deploy/seccomp/sandbox.json does)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiodocker
from aiodocker.exceptions import DockerError

from orchestrator.desktop_io import PortErrorCode
from orchestrator.errors import CodedError
from orchestrator.names import desktop_name

from .proctree import children

CLONE_NEWNET = 0x40000000
# The descendants looked at for a userns desktop's namespaces (its outer side runs a handful).
MAX_SCANNED = 4096

MAX_KNOWN = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]  # int setns(int fd, int nstype)
_libc.setns.restype = ctypes.c_int


class PortError(CodedError):
    code: PortErrorCode

    def __init__(self, code: PortErrorCode, message: str) -> None:
        super().__init__(code, message)


@dataclass(frozen=True)
class _Netns:
    """Where a desktop's loopback is: a process in that namespace, and its start time (so a
    pid reused by another process is never taken for it)."""

    pid: int
    started: int


def nspids(pid: int) -> list[int] | None:
    """The pid of ``pid`` in each pid namespace from this /proc's down to its own."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(n) for n in line.split()[1:]]
    except (OSError, ValueError):
        return None
    return None


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, its identity."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # comm may hold spaces and parentheses
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def namespaces_pid(container_pid: int) -> int | None:
    """A userns desktop's namespaces' pid 1: the descendant of the container's processes that
    is pid 1 of a pid namespace one below the container's. Only the container's own pid
    namespace is searched (the desktop's inner containers are deeper, under the namespaces)."""
    top = nspids(container_pid)
    if top is None:
        return None
    todo, scanned = [container_pid], 0
    while todo and scanned < MAX_SCANNED:
        for child in children(todo.pop()):
            scanned += 1
            levels = nspids(child)
            if levels is None:
                continue
            if len(levels) == len(top) + 1 and levels[-1] == 1:
                return child
            if len(levels) == len(top):
                todo.append(child)
    return None


def _in_namespace(pid: int) -> socket.socket:
    """In a thread of its own: enter ``pid``'s network namespace, make a TCP socket there."""
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns into the network namespace of {pid}: {os.strerror(code)}")
    finally:
        os.close(fd)
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


async def socket_in_namespace(pid: int) -> socket.socket:
    """A TCP socket of ``pid``'s network namespace, made by a thread that then ends."""
    made: concurrent.futures.Future[socket.socket] = concurrent.futures.Future()

    def run() -> None:
        try:
            made.set_result(_in_namespace(pid))
        except BaseException as e:
            made.set_exception(e)

    threading.Thread(target=run, name=f"netns-{pid}", daemon=True).start()
    try:
        return await asyncio.wrap_future(made)
    except asyncio.CancelledError:
        # Cancelled meanwhile: the socket the thread still makes is closed, never leaked.
        made.add_done_callback(_close_result)
        raise


def _close_result(made: concurrent.futures.Future[socket.socket]) -> None:
    if not made.cancelled() and made.exception() is None:
        made.result().close()


class DesktopPorts:
    """Connections to the desktops' loopback ports on one Docker daemon. Where each desktop's
    namespace is, is remembered (per session, checked by its process's start time before each
    use, forgotten when it fails), so a connection costs no Docker call."""

    def __init__(
        self,
        docker: aiodocker.Docker,
        *,
        known: dict[str, _Netns] | None = None,
        visible: Callable[[int, str], bool] | None = None,
    ) -> None:
        self._docker = docker
        self._known: dict[str, _Netns] = {} if known is None else known
        self._visible = visible or container_visible

    async def open(
        self, session_id: str, port: int, *, timeout_s: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is not a TCP port")
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(timeout_s):
                sock = await self._socket(session_id)
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
                return await asyncio.open_connection(sock=sock)
        except BaseException as e:
            if sock is not None:
                sock.close()
            if isinstance(e, ConnectionRefusedError):
                raise PortError("port_closed", f"nothing listens on port {port} of the desktop") from None
            if isinstance(e, TimeoutError):
                raise PortError(
                    "port_unreachable", f"port {port} of the desktop did not answer in {timeout_s} s"
                ) from None
            if isinstance(e, OSError):
                raise PortError("port_unreachable", f"port {port} of the desktop cannot be reached: {e}") from e
            raise

    async def _socket(self, session_id: str) -> socket.socket:
        known = self._known.get(session_id)
        if known is not None and start_time(known.pid) == known.started:
            try:
                return await socket_in_namespace(known.pid)
            except OSError:
                pass  # gone between the check and the open: look again
        self._known.pop(session_id, None)
        netns = await self._find(session_id)
        try:
            sock = await socket_in_namespace(netns.pid)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ESRCH):
                raise PortError("desktop_gone", f"the desktop's processes ended: {e}") from e
            raise PortError("port_unreachable", f"the desktop's network namespace cannot be entered here: {e}") from e
        if len(self._known) >= MAX_KNOWN:  # the oldest first (dicts keep their order)
            del self._known[next(iter(self._known))]
        self._known[session_id] = netns
        return sock

    async def _find(self, session_id: str) -> _Netns:
        name = desktop_name(session_id)
        try:
            info: Mapping[str, Any] = await self._docker.containers.container(name).show()
        except DockerError as e:
            if e.status == 404:
                raise PortError("desktop_gone", f"no desktop {name}") from e
            raise
        state = info.get("State") or {}
        pid = state.get("Pid") or 0
        if not state.get("Running") or not isinstance(pid, int) or pid <= 0:
            raise PortError("desktop_gone", f"the desktop {name} is not running")
        if not self._visible(pid, str(info.get("Id", ""))):
            raise PortError(
                "port_unreachable",
                f"the desktop's processes are not visible here (pid {pid}): this worker does not share"
                " the sandbox dockerd's pid namespace",
            )
        env = (info.get("Config") or {}).get("Env") or []
        if any(isinstance(v, str) and v.startswith("ORCH_USERNS_BASE=") and v != "ORCH_USERNS_BASE=" for v in env):
            # The same decision desktop-enter makes: a userns desktop's user lives in its namespaces.
            inner = namespaces_pid(pid)
            if inner is None:
                raise PortError("desktop_gone", f"the namespaces of the desktop {name} are not up")
            pid = inner
        started = start_time(pid)
        if started is None:
            raise PortError("desktop_gone", f"the desktop {name}'s processes ended")
        return _Netns(pid, started)


def container_visible(pid: int, container_id: str) -> bool:
    """``pid`` is the container's process in this /proc: its cgroup path names the container
    (cgroupfs /docker/ID, systemd docker-ID.scope), so a pid of another namespace that happens
    to exist here is never taken for it."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            return bool(container_id) and container_id in f.read()
    except OSError:
        return False


# open_desktop_port's memory of where the desktops are, whatever Docker client asks (a session
# id names one desktop; each entry is checked by its process's start time before use).
_KNOWN: dict[str, _Netns] = {}


async def open_desktop_port(
    docker: aiodocker.Docker, session_id: str, port: int, *, timeout_s: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to 127.0.0.1:``port`` of the session's desktop (see the module's doc);
    PortError ``port_closed``, ``desktop_gone`` or ``port_unreachable`` when there is none."""
    return await DesktopPorts(docker, known=_KNOWN).open(session_id, port, timeout_s=timeout_s)
