"""The escape suite: from inside a desktop, as its root and from a --privileged container of its
own dockerd, try what the known desktop-to-machine escapes need (issue 15, review C1). Under
``userns`` each is refused; under ``caps`` the same script reports what it allows (it writes
back only what it read, so a success changes nothing on the machine).

What the outcomes mean is in docs/threat-model.md ("The escape suite")."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.names import desktop_name
from workers.privilege import USERNS_FIRST, USERNS_SIZE
from workers.worker import SandboxWorker

from .conftest import CAPS, TEST_IMAGE, adocker, running_worker

READY = 90.0

# One line per attempt: "<name> refused" or "<name> ALLOWED[: detail]". POSIX sh, run by the
# desktop's /bin/sh (coreutils) or by busybox's in the test image (`busybox <applet>`).
ATTEMPTS = r"""
b=; command -v mknod >/dev/null 2>&1 || b=busybox
say() {  # name, status (0 allowed, 2 nothing there to try, else refused), detail
  case "$2" in 0) echo "$1 ALLOWED${3:+: $3}" ;; 2) echo "$1 absent" ;; *) echo "$1 refused" ;; esac
}

read -r inside outside count < /proc/self/uid_map
[ "$outside" = 0 ] && s=0 || s=1
say uid_map_is_machine_root "$s" "$inside $outside $count"

found=$($b find /sys/fs/cgroup -maxdepth 2 -name release_agent 2>/dev/null | $b head -n1)
s=2
if [ -n "$found" ]; then
  s=1
  $b cat "$found" > /tmp/ra 2>/dev/null && $b cat /tmp/ra > "$found" 2>/dev/null && s=0
fi
say release_agent_writable "$s" "$found"

s=1; $b cat /proc/sys/kernel/core_pattern > /tmp/cp 2>/dev/null \
  && $b cat /tmp/cp > /proc/sys/kernel/core_pattern 2>/dev/null && s=0
say core_pattern_writable "$s"

s=2; [ -e /proc/sysrq-trigger ] && { s=1; printf h > /proc/sysrq-trigger 2>/dev/null && s=0; }
say sysrq_trigger_writable "$s"

s=1; $b rm -f /tmp/disk
$b mknod /tmp/disk b DISK_MAJOR DISK_MINOR 2>/dev/null && $b head -c 512 /tmp/disk > /tmp/mbr 2>/dev/null \
  && [ -s /tmp/mbr ] && s=0
say machine_disk_readable "$s" "DISK_MAJOR:DISK_MINOR"

# The same from the devices hierarchy's root, where nothing is denied (a process that leaves
# its container's cgroup; it exits right after).
s=1; for d in /sys/fs/cgroup/devices /sys/fs/cgroup; do
  [ -e "$d/cgroup.procs" ] && [ -e /tmp/disk ] || continue
  sh -c "echo \$\$ > $d/cgroup.procs && exec $b head -c 512 /tmp/disk" > /tmp/mbr 2>/dev/null && [ -s /tmp/mbr ] && s=0
  break
done
say machine_disk_from_root_cgroup "$s"

# A fresh cgroup v1 mount: at the machine's hierarchy root it has release_agent (and every
# other container's limits); in a cgroup namespace of the desktop's own it shows the desktop's.
s=1; $b mkdir -p /tmp/cg && $b mount -t cgroup -o memory cgroup /tmp/cg 2>/dev/null \
  && { [ -e /tmp/cg/release_agent ] && s=0; $b umount /tmp/cg; }
say mount_cgroup_v1_at_machine_root "$s"

s=1; for f in /sys/fs/cgroup/devices/devices.allow /sys/fs/cgroup/devices.allow; do
  [ -e "$f" ] && printf 'c 1:3 rwm' > "$f" 2>/dev/null && s=0
done
say devices_allow_writable "$s"
"""


def machine_disk() -> tuple[int, int]:
    """The block device under this machine's Docker data (the machine's disk)."""
    root = "/var/lib/orchestrator-dev/docker"
    if not os.path.isdir(root):
        pytest.skip(f"{root} is not here: the test must run on the machine of its dockerd")
    dev = os.stat(root).st_dev
    return os.major(dev), os.minor(dev)


def attempts() -> str:
    major, minor = machine_disk()
    return ATTEMPTS.replace("DISK_MAJOR", str(major)).replace("DISK_MINOR", str(minor))


def outcomes(out: str) -> dict[str, str]:
    found = {}
    for line in out.splitlines():
        name, _, outcome = line.partition(" ")
        found[name] = outcome
    return found


@pytest.fixture(params=["userns", "caps"])
async def profiled(
    request: pytest.FixtureRequest, docker_settings: Settings
) -> AsyncIterator[tuple[str, Settings, SandboxWorker]]:
    settings = replace(docker_settings, privilege=request.param)
    async with running_worker(settings) as worker:
        yield request.param, settings, worker


async def test_escapes_from_a_desktop(profiled: tuple[str, Settings, SandboxWorker], client: Client) -> None:
    profile, settings, worker = profiled
    host = settings.docker_host
    assert host
    sid = (await client.create()).id
    events = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=READY)
    assert events[-1].type == "session.ready", [e.data for e in events]
    (started,) = [e.data["data"] for e in events if e.type == "desktop.started"]
    assert started["privilege"] == profile
    desktop = desktop_name(sid)
    script = attempts()

    # As the desktop's root, where its user's shell lands (desktop-enter: the namespaces under userns).
    as_root = outcomes(await adocker("exec", desktop, "desktop-enter", "sh", "-c", script, host=host))
    # From a --privileged container of the desktop's own dockerd (depth 3). In a caps desktop
    # runc refuses --privileged (the bounding set lacks SYS_RESOURCE): all it has, as there.
    await worker.runtime.images.copy_into(sid, [TEST_IMAGE])
    flags = ["--privileged"] if profile == "userns" else CAPS
    privileged = outcomes(
        await adocker("exec", desktop, "docker", "run", "--rm", *flags, TEST_IMAGE, "sh", "-c", script, host=host)
    )
    seen = {"desktop root": as_root, "privileged container inside": privileged}
    print(json.dumps({profile: seen}, indent=1))  # the table in docs/threat-model.md comes from this

    names = {
        "uid_map_is_machine_root",
        "release_agent_writable",
        "core_pattern_writable",
        "sysrq_trigger_writable",
        "machine_disk_readable",
        "machine_disk_from_root_cgroup",
        "mount_cgroup_v1_at_machine_root",
        "devices_allow_writable",
    }
    for where, found in seen.items():
        assert set(found) == names, (where, found)
    if profile == "userns":
        for where, found in seen.items():
            allowed = {name: outcome for name, outcome in found.items() if outcome not in ("refused", "absent")}
            assert not allowed, (where, allowed)
        # uid 0 inside is the first uid of one of the desktops' ranges.
        uid_map = await adocker("exec", desktop, "desktop-enter", "cat", "/proc/self/uid_map", host=host)
        inside, outside, count = (int(n) for n in uid_map.split())
        assert inside == 0 and count == USERNS_SIZE
        assert outside >= USERNS_FIRST and (outside - USERNS_FIRST) % USERNS_SIZE == 0
    else:
        # The unsafe profile, for contrast: the suite sees what the review found (C1).
        assert as_root["uid_map_is_machine_root"].startswith("ALLOWED")
        assert as_root["core_pattern_writable"] == "ALLOWED"
        # (This kernel has no magic SysRq at all: no /proc/sysrq-trigger to try.)
        assert as_root["sysrq_trigger_writable"] in ("ALLOWED", "absent")
        assert as_root["release_agent_writable"].startswith("ALLOWED")
        assert as_root["mount_cgroup_v1_at_machine_root"] == "ALLOWED"

    # And the desktop still does its job: a container runs inside.
    out = await adocker("exec", desktop, "docker", "run", "--rm", TEST_IMAGE, "echo", "inside", host=host)
    assert out == "inside"


async def test_auto_chooses_userns_where_it_works(docker_settings: Settings, client: Client) -> None:
    """On this machine (our CI kind) the default is the user-namespaced profile, reported in the
    heartbeat and on each desktop.started; a fallback to an unsafe one would fail here."""
    assert docker_settings.privilege == "auto"
    async with running_worker(docker_settings):
        async with asyncio.timeout(30):
            while not (mine := [s for s in await client.sandboxes() if s.id == docker_settings.sandbox_id]):
                await asyncio.sleep(0.1)
        assert mine[0].privilege.startswith("userns"), mine[0].privilege
        sid = (await client.create()).id
        events = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=READY)
        assert events[-1].type == "session.ready", [e.data for e in events]
        (started,) = [e.data["data"] for e in events if e.type == "desktop.started"]
        assert started["privilege"] == "userns"
