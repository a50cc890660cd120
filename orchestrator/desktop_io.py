"""Files and ports of a desktop, as both sides name them: a listing's entries, and the closed
sets of error codes the worker's file and port operations (workers/runtime/files.py, netns.py)
end with, so the API maps a code to its status without importing the worker."""

from __future__ import annotations

import enum
from typing import Literal

import msgspec


class FileKind(enum.StrEnum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"  # a listing's entry only: a read or write follows symlinks
    OTHER = "other"  # fifo, socket, device: never read or written as a file


class FileEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a directory's listing, as ``lstat`` sees it (a symlink is itself)."""

    name: str
    kind: FileKind
    size: int
    mode: int  # permission bits with setuid/setgid/sticky (0o4755), without the type
    mtime: float  # seconds since the epoch


FileErrorCode = Literal[
    "not_found",  # the path, or a directory on its way, does not exist
    "not_a_directory",  # a component (or a listing's, a tar upload's target) is not a directory
    "is_a_directory",  # a file write to a directory
    "permission_denied",  # the user the operation runs as may not do it
    "invalid_path",  # it resolves (symlinks) into /proc, /sys or /dev, or names a fifo, socket or device
    "unknown_user",  # the write's user is not a user of the desktop
    "desktop_gone",  # no running desktop (or its namespaces are not up)
    "file_failed",  # anything else: the message says what (a full disk, a corrupt tar...)
]

PortErrorCode = Literal[
    "port_closed",  # nothing listens there (refused)
    "desktop_gone",  # no running desktop (or its namespaces are not up)
    "port_unreachable",  # the desktop's network namespace is not reachable from this process, or no answer in time
]
