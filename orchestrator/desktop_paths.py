"""A path into a desktop, as it arrives from outside (``?path=`` of the files routes): checked at
the edge, pure. What it names is only known inside the desktop: the worker's scripts
(workers/runtime/files.py) resolve its symlinks there and refuse the same places again.

Refused: a relative path, a NUL (no kernel path holds one), a ``..`` component (the path means
what it says, nothing is climbed out of), more than PATH_MAX bytes, and the pseudo filesystems
/proc, /sys and /dev (reading /dev/zero or /proc/kcore would never end, writing there is no
file transfer). The result is normalised: ``//`` and ``.`` collapsed, no trailing ``/``, and
``/`` stays ``/``."""

from __future__ import annotations

from .errors import ServiceError

PATH_MAX = 4096
PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")


def under(path: str, top: str) -> bool:
    """``path`` (normalised) is ``top`` or below it."""
    return path == top or path.startswith(top + "/")


def check_desktop_path(path: str, field: str = "path") -> str:
    """``path`` normalised, or ServiceError(400, "invalid_path") saying what is wrong with it."""

    def refuse(why: str) -> ServiceError:
        return ServiceError(400, "invalid_path", f"{field} {why}", field)

    if not path:
        raise refuse("is empty: an absolute path is required")
    if "\0" in path:
        raise refuse("contains a NUL byte")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise refuse("is not valid UTF-8") from e
    if size > PATH_MAX:
        raise refuse(f"is {size} bytes long, more than {PATH_MAX}")
    if not path.startswith("/"):
        raise refuse(f"must be absolute (start with /), got {path[:64]!r}")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise refuse("must not contain a '..' component")
    normal = "/" + "/".join(parts)
    for top in PSEUDO_FILESYSTEMS:
        if under(normal, top):
            raise refuse(f"is under {top}, a pseudo filesystem: not a file transfer's")
    return normal
