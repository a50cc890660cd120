"""Everything the worker does to Docker: the port (``port``), its aiodocker implementation
(``DesktopRuntime`` and its parts), and the one error type."""

from .engine import DesktopRuntime
from .errors import DesktopError
from .images import split_reference
from .port import Desktop, Desktops, DockerObject, Images, InnerDaemon, PrivilegeProbe, Runtime

__all__ = [
    "Desktop",
    "DesktopError",
    "DesktopRuntime",
    "Desktops",
    "DockerObject",
    "Images",
    "InnerDaemon",
    "PrivilegeProbe",
    "Runtime",
    "split_reference",
]
