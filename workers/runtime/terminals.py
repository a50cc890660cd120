"""Interactive terminals in a desktop: a docker exec with a TTY of ``desktop-enter`` (enter.py,
the one way in), its bytes both ways, its window size, its exit code, and a hang-up that
reaches the whole process tree when its client goes away."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Mapping, Sequence
from typing import Any

import aiodocker
from aiodocker.exceptions import DockerError
from aiodocker.execs import Exec
from aiodocker.stream import Stream

from orchestrator.names import desktop_name

from . import proctree
from .enter import enter_argv
from .errors import DesktopError
from .execs import exit_code_of

log = logging.getLogger("workers.runtime.terminals")

# A login shell: bash where the desktop has it, else sh.
LOGIN_SHELL = ["/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash -l; fi; exec sh -l"]
HANGUP_GRACE_S = 1.0


class TerminalProcess:
    def __init__(self, exec_: Exec, stream: Stream) -> None:
        self._exec = exec_
        self._stream = stream
        self._pid: int | None = None

    async def read(self) -> bytes | None:
        """The next bytes the terminal shows; None once the process has ended."""
        message = await self._stream.read_out()
        return None if message is None else message.data

    async def write(self, data: bytes) -> None:
        await self._stream.write_in(data)

    async def resize(self, cols: int, rows: int) -> None:
        try:
            await self._exec.resize(h=rows, w=cols)
        except DockerError as e:  # ended meanwhile
            log.debug("terminal resize refused: %s", e)

    async def exit_code(self) -> int | None:
        return await exit_code_of(self._exec)

    async def hang_up(self) -> None:
        """The client went away: HUP the tree (as a closed terminal does), KILL what is left."""
        if self._pid is None:
            info: Mapping[str, Any] = await self._exec.inspect()
            if not info.get("Running"):
                return
            self._pid = info.get("Pid") or None
        if self._pid is None or not proctree.visible(self._pid):
            return
        await asyncio.to_thread(proctree.signal_tree, self._pid, signal.SIGHUP)
        await asyncio.sleep(HANGUP_GRACE_S)
        if proctree.visible(self._pid):
            await asyncio.to_thread(proctree.signal_tree, self._pid, signal.SIGKILL)

    async def close(self) -> None:
        await self._stream.close()


class DockerTerminals:
    def __init__(self, docker: aiodocker.Docker) -> None:
        self._docker = docker

    async def open(
        self,
        session_id: str,
        *,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None,
        user: str | None,
        cols: int,
        rows: int,
    ) -> TerminalProcess:
        container = self._docker.containers.container(desktop_name(session_id))
        env = {"TERM": "xterm-256color", **env}
        try:
            exec_ = await container.exec(
                enter_argv(argv or LOGIN_SHELL, env=env, cwd=cwd, user=user),
                stdin=True,
                tty=True,
                # The outer side's too: desktop-enter's nsenter inherits it.
                environment={"TERM": env["TERM"]},
            )
        except DockerError as e:
            if e.status in (404, 409):
                raise DesktopError("desktop_gone", f"the desktop is not running: {e.message}") from e
            raise DesktopError("terminal_failed", f"docker refused the terminal: {e.message}") from e
        stream = exec_.start(detach=False)
        try:
            await stream.__aenter__()
        except DockerError as e:
            await stream.close()
            raise DesktopError("terminal_failed", f"docker could not start the terminal: {e.message}") from e
        process = TerminalProcess(exec_, stream)
        await process.resize(cols, rows)
        return process
