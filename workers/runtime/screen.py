"""The screen of a graphical desktop: a screenshot or an input action is one docker exec of
``orch-screen`` (desktop_image/orch-screen.py) through ``enter_argv`` (enter.py), as files.py
runs its scripts, so it acts as the desktop's user (the namespaces' root), who owns the display.

orch-screen refuses with one line on stderr (``orch-screen: CODE: message``, exit 3) before it
sends anything to the screen; that becomes a ``ScreenError`` with its code. desktop-enter's 125
(the namespaces not up) is ``desktop_gone``, as for files.

Input actions of one session run one at a time in this worker (a lock per session): two
agents' clicks interleaved inside one xdotool sequence would be neither's."""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref

import aiodocker
import msgspec
from aiodocker.exceptions import DockerError

from orchestrator.errors import CodedError
from orchestrator.exec_types import OutputStream
from orchestrator.names import desktop_name
from orchestrator.screen_types import Captured, InputAction, Screenshot, input_argv, parse_refusal, screenshot_argv

from .enter import enter_argv
from .execs import DockerExecProcess, _close_stdin

TOOL = "orch-screen"
# A 7680x4320 screen of noise is 100 MB of RGB; a real screen's PNG is a fraction of that.
MAX_IMAGE_BYTES = 128 * 1024 * 1024
STDERR_KEPT = 8192
# Typing 10,000 characters at orch-screen's 12 ms a key takes two minutes.
INPUT_TIMEOUT_S = 180.0
SCREENSHOT_TIMEOUT_S = 60.0


class ScreenError(CodedError):
    pass


class Shot(msgspec.Struct, kw_only=True):
    image: bytes
    captured: Captured


class DesktopScreen:
    """Screens of the graphical desktops on one Docker daemon (the sandbox's)."""

    def __init__(self, docker: aiodocker.Docker) -> None:
        self._docker = docker
        self._input_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def screenshot(self, session_id: str, shot: Screenshot) -> Shot:
        stdout, stderr = await self._run(session_id, screenshot_argv(shot), None, SCREENSHOT_TIMEOUT_S)
        line = stderr.strip().splitlines()[-1] if stderr.strip() else b""
        try:
            captured = msgspec.json.decode(line, type=Captured)
        except msgspec.DecodeError as e:
            raise ScreenError("capture_failed", f"orch-screen said {line[:200]!r} of its screenshot") from e
        if captured.bytes != len(stdout):
            raise ScreenError("capture_failed", f"orch-screen wrote {len(stdout)} of {captured.bytes} bytes")
        return Shot(image=stdout, captured=captured)

    async def act(self, session_id: str, action: InputAction) -> dict[str, object]:
        """Do ``action`` (in screen pixels); orch-screen's answer (the pointer after it)."""
        argv, stdin = input_argv(action)
        lock = self._input_locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            stdout, _ = await self._run(session_id, argv, stdin, INPUT_TIMEOUT_S)
        try:
            answer = msgspec.json.decode(stdout.strip().splitlines()[-1] if stdout.strip() else b"")
        except msgspec.DecodeError as e:
            raise ScreenError("input_failed", f"orch-screen answered {stdout[:200]!r}") from e
        if not isinstance(answer, dict):
            raise ScreenError("input_failed", f"orch-screen answered {stdout[:200]!r}")
        return answer

    async def _run(
        self, session_id: str, args: list[str], stdin: bytes | None, timeout_s: float
    ) -> tuple[bytes, bytes]:
        """orch-screen's stdout and stderr when it exited 0; a ScreenError otherwise."""
        argv = enter_argv([TOOL, *args], env={}, cwd="/", user=None)
        container = self._docker.containers.container(desktop_name(session_id))
        try:
            exec_ = await container.exec(argv, stdin=stdin is not None, tty=False)
        except DockerError as e:
            if e.status in (404, 409):  # no desktop, or not running
                raise ScreenError("desktop_gone", f"the desktop is not running: {e.message}") from e
            raise ScreenError("screen_failed", f"docker refused the exec: {e.message}") from e
        stream = exec_.start(detach=False)
        try:
            await stream.__aenter__()
        except DockerError as e:
            await stream.close()
            raise ScreenError("screen_failed", f"docker could not start the exec: {e.message}") from e
        process = DockerExecProcess(exec_, stream)
        stdout, stderr = bytearray(), bytearray()
        began = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                if stdin is not None:
                    await stream.write_in(stdin)
                    _close_stdin(stream)
                async for kind, data in process.output():
                    if kind is OutputStream.STDOUT:
                        stdout += data
                        if len(stdout) > MAX_IMAGE_BYTES:
                            raise ScreenError("capture_failed", f"orch-screen wrote over {MAX_IMAGE_BYTES} bytes")
                    else:
                        stderr += data
                        del stderr[:-STDERR_KEPT]
        except TimeoutError:
            with contextlib.suppress(Exception):
                await process.kill()
            raise ScreenError(
                "input_failed" if stdin is not None or args[0] != "screenshot" else "capture_failed",
                f"orch-screen {args[0]} did not end within {round(time.monotonic() - began)} s",
            ) from None
        finally:
            await process.close()
        code = await process.exit_code()
        if code != 0:
            raise _failure(code, bytes(stderr), args[0])
        return bytes(stdout), bytes(stderr)


def _failure(code: int | None, stderr: bytes, action: str) -> ScreenError:
    refusal = parse_refusal(stderr)
    if refusal is not None:
        return ScreenError(*refusal)
    tail = "; ".join(line.strip() for line in stderr.decode(errors="replace").splitlines()[-3:] if line.strip())
    if code == 125:  # desktop-enter: the namespaces are not up (starting, or gone)
        return ScreenError("desktop_gone", f"the desktop is not running: {tail or 'no message'}")
    if code == 127:  # no orch-screen: not the graphical image
        return ScreenError("display_unavailable", f"this desktop has no screen ({tail or 'no orch-screen'})")
    return ScreenError("screen_failed", f"orch-screen {action} failed (exit {code}): {tail or 'no message'}")
