"""A graphical desktop's screen, as the worker sees it: the variables that make one
(``display_env``) and the marker its start-display writes when the screen answers
(``/run/orchestrator/display.ready``, in the socket directory the desktop shares with the
worker; docs/graphical.md). Reading the marker is pure file I/O, no Docker."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Annotated

import msgspec

from orchestrator.schemas import DisplaySize, SessionSpec

# The flavor's variables: the container's Env, never the session's env file (a session must
# not choose its desktop's image flavor, screen or the VNC port the worker relays to).
DISPLAY_ENV = ("ORCH_DESKTOP_FLAVOR", "ORCH_DISPLAY_SIZE", "ORCH_VNC_PORT")
MARKER = "display.ready"
# start-display's line is about 150 bytes; anything much larger is not one.
MARKER_MAX_BYTES = 4096

_Ms = Annotated[int, msgspec.Meta(ge=0, le=86_400_000)]


class DisplayMarker(msgspec.Struct, kw_only=True):
    """start-display's ``display.ready`` line. Written by the desktop's root, so read as
    untrusted input: typed, bounded. Unknown fields are ignored (an image newer than the worker
    may say more); the worker acts on none of it, it only reports it."""

    display: Annotated[str, msgspec.Meta(max_length=32)]
    width: Annotated[int, msgspec.Meta(ge=1, le=65_535)]
    height: Annotated[int, msgspec.Meta(ge=1, le=65_535)]
    depth: Annotated[int, msgspec.Meta(ge=1, le=64)]
    vnc_port: Annotated[int, msgspec.Meta(ge=1, le=65_535)] | None = None
    since_init_ms: _Ms | None = None
    start_ms: _Ms | None = None
    restarts: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0


_decode = msgspec.json.Decoder(DisplayMarker).decode


def display_of(spec: SessionSpec) -> DisplaySize | None:
    """The screen a session's desktop gets: None for a minimal one. A graphical record always
    has its size (records.new_record); the default covers one written without it."""
    if spec.flavor != "graphical":
        return None
    return spec.display or DisplaySize()


def display_env(display: DisplaySize | None) -> dict[str, str]:
    """The container's Env for a desktop with ``display`` (nothing for a minimal one: its
    container is what it was before flavors)."""
    if display is None:
        return {}
    return {"ORCH_DESKTOP_FLAVOR": "graphical", "ORCH_DISPLAY_SIZE": f"{display.width}x{display.height}"}


def marker_path(socket_dir: str, session_id: str) -> str:
    return os.path.join(socket_dir, session_id, MARKER)


def clear_marker(socket_dir: str, session_id: str) -> None:
    """Remove a stale marker (the directory outlives the container): a desktop being started
    must not look ready before its new screen says so."""
    for name in (MARKER, MARKER + ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(socket_dir, session_id, name))


class MarkerInvalid(Exception):
    """The marker is there but is not start-display's line (what, in the message)."""


def read_marker(path: str) -> DisplayMarker | None:
    """The marker at ``path``, None while there is none. The directory is the desktop's root's:
    the entry is opened without following a symlink (no file of the worker's is read through
    it), without blocking on a FIFO, and must be a regular file under the size cap.
    Raises MarkerInvalid for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MarkerInvalid("display.ready is a symlink") from None
        raise MarkerInvalid(f"display.ready cannot be opened: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MarkerInvalid("display.ready is not a regular file")
        if info.st_size > MARKER_MAX_BYTES:
            raise MarkerInvalid(f"display.ready is larger than {MARKER_MAX_BYTES} bytes")
        raw = os.read(fd, MARKER_MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        return _decode(raw)
    except msgspec.DecodeError as e:
        raise MarkerInvalid(f"display.ready is not start-display's line: {e}") from None
