"""How desktops get what Docker-in-Docker needs. Pure: decided from facts, not probed here.

``privileged`` works where the capability bounding set is complete. Where it is not (some
VMs and hardened CI runners lack CAP_SYS_RESOURCE), runc refuses ``--privileged``, so the
``caps`` profile adds every capability the bounding set has, unconfines seccomp, AppArmor
and the masked /proc and /sys paths, and the desktop remounts its cgroups itself.
A named OCI runtime (``runtime:sysbox-runc``) needs none of that.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

# Linux capability numbers 0..40 (linux/capability.h), as Docker names them (without CAP_).
CAPABILITIES = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
]


class PrivilegeKind(enum.StrEnum):
    """How a desktop gets what it needs (the ``desktop.started`` event's ``privilege``)."""

    PRIVILEGED = "privileged"
    CAPS = "caps"
    RUNTIME = "runtime"


@dataclass(frozen=True)
class PrivilegeProfile:
    kind: PrivilegeKind
    reason: str
    missing_caps: tuple[str, ...] = ()
    runtime: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.kind is PrivilegeKind.CAPS:
            return f"caps (all but {', '.join(self.missing_caps) or 'none'}; {self.reason})"
        if self.kind is PrivilegeKind.RUNTIME:
            return f"runtime {self.runtime} ({self.reason})"
        return f"privileged ({self.reason})"

    def host_config(self) -> dict[str, Any]:
        """The HostConfig fields this profile sets on a desktop container."""
        if self.kind is PrivilegeKind.PRIVILEGED:
            return {"Privileged": True}
        if self.kind is PrivilegeKind.RUNTIME:
            return {"Runtime": self.runtime}
        return {
            "CapAdd": ["ALL"],
            "CapDrop": list(self.missing_caps),
            "SecurityOpt": ["seccomp=unconfined", "apparmor=unconfined"],
            # The API form of `--security-opt systempaths=unconfined`.
            "MaskedPaths": [],
            "ReadonlyPaths": [],
        }


# Docker 20.10 (Debian 12's) knows capabilities up to AUDIT_READ (37): its "ALL" never adds the
# newer ones, and it refuses to drop a name it does not know. So only these are ever dropped.
DOCKER_KNOWN = 38


def missing_capabilities(cap_bounding_hex: str, cap_last_cap: int) -> tuple[str, ...]:
    bounding = int(cap_bounding_hex, 16)
    last = min(cap_last_cap, DOCKER_KNOWN - 1)
    return tuple(CAPABILITIES[n] for n in range(last + 1) if not bounding >> n & 1)


def choose_profile(setting: str, cap_bounding_hex: str, cap_last_cap: int) -> PrivilegeProfile:
    """``setting`` is auto | privileged | caps | runtime:<name>."""
    missing = missing_capabilities(cap_bounding_hex, cap_last_cap)
    if setting.startswith("runtime:"):
        name = setting.removeprefix("runtime:")
        if not name:
            raise ValueError("privilege 'runtime:' needs a runtime name, e.g. runtime:sysbox-runc")
        return PrivilegeProfile(PrivilegeKind.RUNTIME, "configured", runtime=name)
    if setting == "privileged":
        return PrivilegeProfile(PrivilegeKind.PRIVILEGED, "configured")
    if setting == "caps":
        return PrivilegeProfile(PrivilegeKind.CAPS, "configured", missing_caps=missing)
    if setting != "auto":
        raise ValueError(f"privilege must be auto, privileged, caps or runtime:<name>, got {setting!r}")
    if missing:
        return PrivilegeProfile(
            PrivilegeKind.CAPS, "capability bounding set lacks " + ", ".join(missing), missing_caps=missing
        )
    return PrivilegeProfile(PrivilegeKind.PRIVILEGED, "capability bounding set is complete")


def candidates(setting: str, cap_bounding_hex: str, cap_last_cap: int) -> list[PrivilegeProfile]:
    """Profiles to try, best first. Explicit settings give one; ``auto`` gives what the bounding
    set suggests, then the fallbacks that matter when this process's set is not the daemon's
    (a worker in a container sees its own, smaller set): the daemon decides by trying."""
    if setting != "auto":
        return [choose_profile(setting, cap_bounding_hex, cap_last_cap)]
    found = [
        PrivilegeProfile(PrivilegeKind.PRIVILEGED, "probe"),
        PrivilegeProfile(PrivilegeKind.CAPS, "probe: all capabilities", missing_caps=()),
        PrivilegeProfile(PrivilegeKind.CAPS, "probe: all but SYS_RESOURCE", missing_caps=("SYS_RESOURCE",)),
    ]
    own = choose_profile("auto", cap_bounding_hex, cap_last_cap)
    if own.kind is PrivilegeKind.CAPS and own.missing_caps not in {p.missing_caps for p in found[1:]}:
        found.append(own)
    return found


def read_bounding_set() -> tuple[str, int]:
    """This process's bounding set; the sandbox's dockerd shares this machine or container."""
    with open("/proc/self/status") as f:
        bounding = next(line.split()[1] for line in f if line.startswith("CapBnd:"))
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    return bounding, last
