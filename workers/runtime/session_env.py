"""How a session's env reaches its desktop: as a root-only file written into the container
before its first start, never as the container's ``Env`` (which ``docker inspect``, the
daemon's ``config.v2.json`` and anything holding the sandbox's Docker socket would show).

The file (``SESSION_ENV_PATH``, mode 0600 in a 0700 directory, owned by root) holds one
variable a line: ``NAME=BASE64``. Names are the API's env keys (``[A-Za-z_][A-Za-z0-9_]*``);
each value is the base64 of its UTF-8 bytes, so a value may hold any character but NUL
(newlines, quotes, ``$(...)``) and the reader never has to quote or evaluate anything. The
reader is ``desktop_image/session-env.sh`` (``load_session_env``): desktop-init exports the
variables to what it starts, and login shells pick them up through /etc/profile.d.

It lives in the container's own layer (``/etc``, under no tmpfs or bind mount), so it
survives a restart of the same container; a new generation is a new container and gets it
written again."""

from __future__ import annotations

import base64
import io
import tarfile
from collections.abc import Mapping

SESSION_ENV_DIR = "/etc/orchestrator"
SESSION_ENV_PATH = f"{SESSION_ENV_DIR}/session.env"


def encode_env_file(env: Mapping[str, str]) -> bytes:
    """The file's bytes: ``NAME=BASE64\\n`` per variable, sorted by name."""
    lines = (f"{name}=".encode() + base64.b64encode(value.encode()) + b"\n" for name, value in sorted(env.items()))
    return b"".join(lines)


def env_archive(env: Mapping[str, str]) -> bytes:
    """A tar to extract at ``/etc`` (Docker's archive upload): the directory, 0700, and the
    file, 0600, both root's. Only root in the desktop can read it."""
    body = encode_env_file(env)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo(SESSION_ENV_DIR.rsplit("/", 1)[1])
        directory.type, directory.mode = tarfile.DIRTYPE, 0o700
        tar.addfile(directory)
        file = tarfile.TarInfo(f"{directory.name}/{SESSION_ENV_PATH.rsplit('/', 1)[1]}")
        file.mode, file.size = 0o600, len(body)
        tar.addfile(file, io.BytesIO(body))
    return out.getvalue()
