"""How desktops get what Docker-in-Docker needs. Pure: decided from facts, not probed here.

``userns`` is the safe one and ``auto``'s only choice on the machine: the desktop's dockerd
and everything in the desktop run in a user namespace (desktop_image/userns-desktop.sh) where
uid 0 is an unprivileged uid range of the sandbox, one range per desktop (a slot kept on the
session's volume). The container itself keeps a few capabilities for that set-up only, with a
private cgroup namespace. Where it fails, the worker refuses to serve (``refusal``), except
when the worker already runs in a user namespace that is not the machine's (``uid_map``): there
``caps`` is confined by that namespace, and ``auto`` may fall back to it.

``caps`` and ``privileged`` are unsafe (root in a desktop is root of the sandbox's user
namespace) and run only when named. ``privileged`` works where the capability bounding set is
complete; where it is not (some VMs and hardened CI runners lack CAP_SYS_RESOURCE) runc refuses
``--privileged``, and ``caps`` adds every capability the bounding set has, and the desktop
remounts its cgroups itself. A named OCI runtime (``runtime:sysbox-runc``) needs none of that.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
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
    USERNS = "userns"


# Root in a desktop is root on the machine under these (docs/threat-model.md): named only.
UNSAFE = frozenset({PrivilegeKind.PRIVILEGED, PrivilegeKind.CAPS})

# -- userns: the uid ranges --------------------------------------------------------------------
# Desktop n of a sandbox maps its uid 0 to USERNS_FIRST + n * USERNS_SIZE, USERNS_SIZE ids
# (what dockerd and the images it runs expect). The slot is chosen when the session's volume is
# made and kept on it as a label: the files on the volume belong to that range, so a resumed
# desktop gets the same one, and no two volumes of a sandbox hold the same slot.
USERNS_FIRST = 100_000
USERNS_SIZE = 65_536
USERNS_SLOTS = (2**32 - 1 - USERNS_FIRST) // USERNS_SIZE  # ranges that end below 2^32 - 1
# The privilege probe's range: the last slot, which free_slot never hands out.
PROBE_SLOT = USERNS_SLOTS - 1
LABEL_USERNS_SLOT = "orchestrator.userns-slot"
# The desktop's Env that tells desktop-init it is a userns desktop, and its range.
USERNS_ENV = ("ORCH_USERNS_BASE", "ORCH_USERNS_SIZE")


def slot_base(slot: int) -> int:
    if not 0 <= slot < USERNS_SLOTS:
        raise ValueError(f"uid range slot {slot} is out of 0..{USERNS_SLOTS - 1}")
    return USERNS_FIRST + slot * USERNS_SIZE


def free_slot(taken: Iterable[int]) -> int:
    """The lowest slot no volume of the sandbox holds (the probe's is never given)."""
    used = set(taken)
    for slot in range(PROBE_SLOT):
        if slot not in used:
            return slot
    raise ValueError("every uid range of this sandbox is taken")


def parse_slot(labels: dict[str, str]) -> int | None:
    raw = labels.get(LABEL_USERNS_SLOT, "")
    return int(raw) if raw.isascii() and raw.isdigit() and int(raw) < USERNS_SLOTS else None


# The container's own capabilities under userns: what the set-up needs (mounts, chown, the
# uid maps, the veth pair and its NAT, nsenter), nothing that reaches the machine's kernel
# state (modules, clock, raw I/O, reboot, open_by_handle_at). The namespaces get a full set of
# their own, which counts only inside them.
USERNS_CAPS = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "SETFCAP",
    "NET_ADMIN",
    "NET_RAW",
    "NET_BIND_SERVICE",
    "SYS_ADMIN",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "MKNOD",
    "AUDIT_WRITE",
)

# Calls nothing in a desktop needs and the known escapes use; inherited by every process in
# the desktop, nested containers included (each adds its own dockerd's profile on top). Not
# Docker's default profile: that one refuses keyctl, which runc inside needs.
DENIED_SYSCALLS = (
    "open_by_handle_at",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "stime",
    "swapon",
    "swapoff",
    "acct",
    "iopl",
    "ioperm",
)
SECCOMP_PROFILE = json.dumps(
    {
        "defaultAction": "SCMP_ACT_ALLOW",
        # The compat architectures too, or a 32-bit call would pass the filter.
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
        ],
        "syscalls": [{"names": list(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    },
    separators=(",", ":"),
)


@dataclass(frozen=True)
class PrivilegeProfile:
    kind: PrivilegeKind
    reason: str
    missing_caps: tuple[str, ...] = ()
    runtime: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The worker runs in a user namespace that is not the machine's (nested in a userns
    # desktop, or a Sysbox sandbox): root in an unsafe desktop is root of that namespace only.
    confined: bool = False

    def describe(self) -> str:
        return self._describe() + (f"; {CONFINED}" if self.confined and self.unsafe else "")

    def _describe(self) -> str:
        if self.kind is PrivilegeKind.CAPS and self.confined:
            return f"caps (all but {', '.join(self.missing_caps) or 'none'}; {self.reason})"
        if self.kind is PrivilegeKind.CAPS:
            lacking = f", lacking {', '.join(self.missing_caps)}" if self.missing_caps else ""
            return f"caps (hardened: {len(CAPS_KEPT)} capabilities{lacking}; {self.reason})"
        if self.kind is PrivilegeKind.RUNTIME:
            return f"runtime {self.runtime} ({self.reason})"
        if self.kind is PrivilegeKind.USERNS:
            ids = f"{USERNS_SIZE} unprivileged uids per desktop from {USERNS_FIRST} up"
            return f"userns ({ids}; {self.reason})"
        return f"privileged ({self.reason})"

    @property
    def unsafe(self) -> bool:
        """Root in the desktop is root of the sandbox's user namespace (the machine's, unless
        ``confined``)."""
        return self.kind in UNSAFE

    def host_config(self) -> dict[str, Any]:
        """The HostConfig fields this profile sets on a desktop container."""
        if self.kind is PrivilegeKind.PRIVILEGED:
            return {"Privileged": True}
        if self.kind is PrivilegeKind.RUNTIME:
            return {"Runtime": self.runtime}
        if self.kind is PrivilegeKind.USERNS:
            return userns_host_config()
        if self.confined:
            # Nested in a user namespace, the desktop's dockerd mounts /proc and /sys for its
            # containers, which the kernel allows there only where they are fully visible
            # already: no masked paths. The enclosing namespace is the boundary (not measured
            # with the hardening below, so not given it).
            return {
                "CapAdd": ["ALL"],
                "CapDrop": list(self.missing_caps),
                "SecurityOpt": ["seccomp=unconfined", "apparmor=unconfined"],
                # The API form of `--security-opt systempaths=unconfined`.
                "MaskedPaths": [],
                "ReadonlyPaths": [],
            }
        return caps_host_config(self.missing_caps)

    def desktop_env(self, slot: int | None) -> list[str]:
        """What the desktop's init needs to know of the profile (desktop-init.sh)."""
        if self.kind is not PrivilegeKind.USERNS:
            return []
        if slot is None:
            raise ValueError("a userns desktop needs its uid range slot")
        base, size = USERNS_ENV
        return [f"{base}={slot_base(slot)}", f"{size}={USERNS_SIZE}"]

    def probe_config(self) -> dict[str, Any]:
        """The probe container's command and environment: `true`, or under userns the whole
        set-up and `true` inside the namespaces (an image without it fails the probe)."""
        if self.kind is PrivilegeKind.USERNS:
            return {"Entrypoint": ["userns-desktop", "--probe"], "Cmd": [], "Env": self.desktop_env(PROBE_SLOT)}
        return {"Entrypoint": ["true"], "Cmd": []}


def userns_host_config() -> dict[str, Any]:
    return {
        # Mounting cgroup v1 shows this container's own cgroup as the root: no release_agent,
        # no other container's limits, no devices.allow of the machine's root.
        "CgroupnsMode": "private",
        "CapDrop": ["ALL"],
        "CapAdd": list(USERNS_CAPS),
        "SecurityOpt": [f"seccomp={SECCOMP_PROFILE}", "apparmor=unconfined"],
        # The namespaces mount a /proc and /sys of their own, which the kernel allows only
        # where one is fully visible already. What they then see of the machine's /proc/sys,
        # sysrq-trigger and the like belongs to an unmapped uid 0: read-only at most.
        "MaskedPaths": [],
        "ReadonlyPaths": [],
        # Per network namespace, for the veth pair's NAT and the DNAT to Docker's resolver.
        "Sysctls": {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.route_localnet": "1"},
    }


# The caps profile's capabilities: what the desktop's dockerd, containerd and runc were measured
# to need (dockerd.ready, `docker run`, `-p`, `docker build` inside; docs/threat-model.md), the
# same as the userns container's. Not SYS_MODULE, SYS_TIME, DAC_READ_SEARCH (open_by_handle_at),
# SYS_RAWIO, SYS_BOOT, LINUX_IMMUTABLE, SYS_RESOURCE, MAC_*, AUDIT_CONTROL, SYSLOG and the rest.
CAPS_KEPT = USERNS_CAPS


def caps_host_config(missing_caps: Iterable[str]) -> dict[str, Any]:
    """The unsafe caps profile, hardened as far as Docker-in-Docker allows: still root on the
    machine (CAP_SYS_ADMIN in its user namespace), with fewer ways to use it."""
    missing = set(missing_caps)
    return {
        # Mounting cgroup v1 shows this container's own cgroup as the root: no release_agent,
        # no devices.allow of the machine's root, no other container's limits.
        "CgroupnsMode": "private",
        "CapDrop": ["ALL"],
        "CapAdd": [cap for cap in CAPS_KEPT if cap not in missing],
        # No LSM here; where AppArmor runs, docker-default would refuse dockerd's mounts.
        "SecurityOpt": [f"seccomp={SECCOMP_PROFILE}", "apparmor=unconfined"],
        # Docker's masked and read-only paths are kept (no MaskedPaths/ReadonlyPaths here): what
        # dockerd needs of /proc/sys is set per container, and start-dockerd never remounts it.
        "Sysctls": {"net.ipv4.ip_forward": "1"},
    }


# Docker 20.10 (Debian 12's) knows capabilities up to AUDIT_READ (37): its "ALL" never adds the
# newer ones, and it refuses to drop a name it does not know. So only these are ever dropped.
DOCKER_KNOWN = 38


def missing_capabilities(cap_bounding_hex: str, cap_last_cap: int) -> tuple[str, ...]:
    bounding = int(cap_bounding_hex, 16)
    last = min(cap_last_cap, DOCKER_KNOWN - 1)
    return tuple(CAPABILITIES[n] for n in range(last + 1) if not bounding >> n & 1)


def choose_profile(setting: str, cap_bounding_hex: str, cap_last_cap: int) -> PrivilegeProfile:
    """``setting`` is auto | userns | privileged | caps | runtime:<name>; ``auto`` is userns
    here (``candidates`` says when the worker may try caps after it)."""
    missing = missing_capabilities(cap_bounding_hex, cap_last_cap)
    if setting.startswith("runtime:"):
        name = setting.removeprefix("runtime:")
        if not name:
            raise ValueError("privilege 'runtime:' needs a runtime name, e.g. runtime:sysbox-runc")
        return PrivilegeProfile(PrivilegeKind.RUNTIME, "configured", runtime=name)
    if setting == "userns":
        return PrivilegeProfile(PrivilegeKind.USERNS, "configured")
    if setting == "privileged":
        return PrivilegeProfile(PrivilegeKind.PRIVILEGED, "configured")
    if setting == "caps":
        return PrivilegeProfile(PrivilegeKind.CAPS, "configured", missing_caps=missing)
    if setting != "auto":
        raise ValueError(f"privilege must be auto, userns, privileged, caps or runtime:<name>, got {setting!r}")
    # Never an unsafe one on its own (candidates says when caps may follow).
    return PrivilegeProfile(PrivilegeKind.USERNS, "auto")


# The initial user namespace maps every uid to itself; any other map is a namespace of its own.
MACHINE_UID_MAP = ((0, 0, 2**32 - 1),)
CONFINED = "confined by the enclosing user namespace"


def nested_in_userns(uid_map: str) -> bool:
    """Whether /proc/self/uid_map (``uid_map``) is a user namespace other than the machine's.
    Anything unreadable or malformed counts as the machine's: no confined fallback on a guess."""
    try:
        ranges = tuple(tuple(int(n) for n in line.split()) for line in uid_map.strip().splitlines())
    except ValueError:
        return False
    if not ranges or any(len(r) != 3 for r in ranges):
        return False
    return ranges != MACHINE_UID_MAP


def candidates(setting: str, cap_bounding_hex: str, cap_last_cap: int, *, uid_map: str) -> list[PrivilegeProfile]:
    """Profiles to try, best first. A named setting gives that one (``caps`` and ``privileged``
    are unsafe, logged so at every start). ``auto`` gives ``userns`` only: where it fails the
    worker refuses to serve (``refusal``), never falling back to an unsafe profile on its own,
    except when this process already runs in a user namespace that is not the machine's
    (``uid_map``): there ``caps`` is confined by that namespace, so it follows, in the variants
    that matter when this process's bounding set is not the daemon's (the daemon decides)."""
    nested = nested_in_userns(uid_map)
    if setting != "auto":
        return [replace(choose_profile(setting, cap_bounding_hex, cap_last_cap), confined=nested)]
    found = [PrivilegeProfile(PrivilegeKind.USERNS, "probe")]
    if not nested:
        return found
    caps = [
        PrivilegeProfile(PrivilegeKind.CAPS, "probe: all capabilities", missing_caps=(), confined=True),
        PrivilegeProfile(
            PrivilegeKind.CAPS, "probe: all but SYS_RESOURCE", missing_caps=("SYS_RESOURCE",), confined=True
        ),
    ]
    missing = missing_capabilities(cap_bounding_hex, cap_last_cap)
    if missing not in {p.missing_caps for p in caps}:
        reason = "probe: the bounding set lacks " + ", ".join(missing)
        caps.append(PrivilegeProfile(PrivilegeKind.CAPS, reason, missing_caps=missing, confined=True))
    return found + caps


def refusal(tried: Iterable[tuple[PrivilegeProfile, str]]) -> str:
    """What the worker logs (at error) when ``auto`` found no profile it may use on its own."""
    why = "; ".join(f"{profile.kind.value}: {reason}" for profile, reason in tried) or "nothing was tried"
    return (
        f"refusing to serve: no safe privilege profile works on this sandbox ({why}). "
        "Fix what made userns fail, or set ORCH_PRIVILEGE=caps|privileged|runtime:<name> to accept "
        "the risk: under caps and privileged root in a desktop is root on this machine (docs/threat-model.md)"
    )


def read_uid_map() -> str:
    """This process's uid map ("" where unreadable: counted as the machine's)."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read()
    except OSError:
        return ""


def read_bounding_set() -> tuple[str, int]:
    """This process's bounding set; the sandbox's dockerd shares this machine or container."""
    with open("/proc/self/status") as f:
        bounding = next(line.split()[1] for line in f if line.startswith("CapBnd:"))
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    return bounding, last
