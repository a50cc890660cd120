"""Commands in a desktop on the sandbox's daemon: a docker exec of ``desktop-enter`` (enter.py),
its stdout and stderr apart, its stdin written then closed, its exit code, and a kill that
reaches the whole process tree (proctree.py)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiodocker
from aiodocker.exceptions import DockerError
from aiodocker.execs import Exec
from aiodocker.stream import Stream

from orchestrator.exec_types import OutputStream
from orchestrator.names import desktop_name

from . import proctree
from .enter import enter_argv
from .errors import DesktopError

log = logging.getLogger("workers.runtime.execs")

_STREAMS = {1: OutputStream.STDOUT, 2: OutputStream.STDERR}
# SIGTERM first, then SIGKILL this long after: a timeout or a kill ends the tree either way.
KILL_GRACE_S = 1.0


@dataclass(frozen=True, kw_only=True)
class ExecSpec:
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str | None
    user: str | None
    stdin: bytes


async def exit_code_of(exec_: Exec) -> int | None:
    """An ended exec's exit code (None if Docker has none): after its output ended, Docker may
    take a moment to record the exit, so it is asked again for up to a second."""
    for _ in range(50):
        info: Mapping[str, Any] = await exec_.inspect()
        if not info.get("Running"):
            code = info.get("ExitCode")
            return code if isinstance(code, int) else None
        await asyncio.sleep(0.02)
    return None


class DockerExecProcess:
    """One started exec: read its output, then its exit code; kill it at any time."""

    def __init__(self, exec_: Exec, stream: Stream) -> None:
        self._exec = exec_
        self._stream = stream
        self.pid: int | None = None

    async def output(self) -> AsyncIterator[tuple[OutputStream, bytes]]:
        while True:
            message = await self._stream.read_out()
            if message is None:
                return
            yield _STREAMS.get(message.stream, OutputStream.STDOUT), message.data

    async def exit_code(self) -> int | None:
        return await exit_code_of(self._exec)

    async def kill(self) -> bool:
        """TERM the tree, KILL what is left after the grace. False when the process is not in
        this worker's view (a worker not in the sandbox daemon's pid namespace)."""
        if self.pid is None:  # known once the process runs: Docker reports 0 before
            info: Mapping[str, Any] = await self._exec.inspect()
            self.pid = info.get("Pid") or None
        if self.pid is None or not proctree.visible(self.pid):
            log.warning("exec process %s is not visible here: it cannot be killed from this worker", self.pid)
            return False
        await asyncio.to_thread(proctree.signal_tree, self.pid, signal.SIGTERM)
        await asyncio.sleep(KILL_GRACE_S)
        if proctree.visible(self.pid):
            await asyncio.to_thread(proctree.signal_tree, self.pid, signal.SIGKILL)
        return True

    async def close(self) -> None:
        await self._stream.close()


class DockerExecs:
    def __init__(self, docker: aiodocker.Docker) -> None:
        self._docker = docker

    async def start(self, session_id: str, spec: ExecSpec) -> DockerExecProcess:
        container = self._docker.containers.container(desktop_name(session_id))
        try:
            exec_ = await container.exec(
                enter_argv(spec.argv, env=spec.env, cwd=spec.cwd, user=spec.user),
                stdin=bool(spec.stdin),
                tty=False,
            )
        except DockerError as e:
            if e.status in (404, 409):  # no desktop, or not running
                raise DesktopError("desktop_gone", f"the desktop is not running: {e.message}") from e
            raise DesktopError("exec_failed", f"docker refused the exec: {e.message}") from e
        stream = exec_.start(detach=False)
        try:
            await stream.__aenter__()
            if spec.stdin:  # without, the process's stdin is /dev/null
                await stream.write_in(spec.stdin)
                _close_stdin(stream)
        except DockerError as e:
            await stream.close()
            raise DesktopError("exec_failed", f"docker could not start the exec: {e.message}") from e
        return DockerExecProcess(exec_, stream)


def _close_stdin(stream: Stream) -> None:
    """Half-close the hijacked connection: the process reads EOF on stdin, its output still
    flows. aiodocker's Stream.close() would close both halves; this is the one place that
    reaches into its response (aiodocker 0.27)."""
    resp = getattr(stream, "_resp", None)
    transport = resp.connection.transport if resp is not None and resp.connection is not None else None
    if transport is not None and transport.can_write_eof():
        transport.write_eof()
