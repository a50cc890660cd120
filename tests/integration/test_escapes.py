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
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.names import desktop_name
from tests.conftest import free_port
from workers.prepare import PrivilegeRefused
from workers.privilege import CAPS_KEPT, USERNS_FIRST, USERNS_SIZE
from workers.worker import SandboxWorker

from .conftest import SANDBOX_IMAGE, TEST_IMAGE, UNCONFINED, adocker, pipe_in, running_worker

READY = 90.0
# The most a container inside a caps desktop can get: the desktop's own capabilities (runc
# refuses --privileged and ALL there), unconfined.
INNER_CAPS = [
    "--cap-drop",
    "ALL",
    *(arg for cap in CAPS_KEPT for arg in ("--cap-add", cap)),
    *UNCONFINED,
]

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

# The limits the worker set on the desktop (memory, pids, CPU), at its cgroup namespace's root:
# the desktop's cgroup. A fresh mount shows that root wherever it is allowed (a container of the
# desktop's dockerd sees its own cgroup at /sys/fs/cgroup, whose limits are its dockerd's to
# set); else the desktop's /sys/fs/cgroup. Written back as read (a success changes nothing);
# allowed, the desktop's root could lift its own limits.
s=2; $b mkdir -p /tmp/cgl
if $b mount -t cgroup -o memory cgroup /tmp/cgl 2>/dev/null; then
  limits=/tmp/cgl/memory.limit_in_bytes
else
  limits="/sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/cpu/cpu.cfs_quota_us"
  limits="$limits /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max"
fi
for f in $limits; do
  [ -e "$f" ] || continue
  s=1; $b cat "$f" > /tmp/limit 2>/dev/null && $b cat /tmp/limit > "$f" 2>/dev/null && { s=0; break; }
done
$b umount /tmp/cgl 2>/dev/null
say own_limits_writable "$s" "$f"

# Granting this cgroup the machine's disk (read only), then what that gives.
s=1; for f in /sys/fs/cgroup/devices/devices.allow /sys/fs/cgroup/devices.allow; do
  [ -e "$f" ] && printf 'b DISK_MAJOR:DISK_MINOR r' > "$f" 2>/dev/null && s=0
done
say devices_allow_writable "$s"
s=1; [ -e /tmp/disk ] && $b head -c 512 /tmp/disk > /tmp/mbr 2>/dev/null && [ -s /tmp/mbr ] && s=0
say machine_disk_after_devices_allow "$s"

# busybox: the test image's, or the one the test copies into the desktop (insmod, nc).
bb=$(command -v busybox 2>/dev/null || :)

# Loading a module: any file will do, the kernel refuses a non-module only after the
# permission checks (and seccomp) let the call through.
s=2; out=
if [ -n "$bb" ]; then
  printf 'not a module' > /tmp/m.ko
  out=$($bb insmod /tmp/m.ko 2>&1) && s=0 || case "$out" in *"not permitted"*) s=1 ;; *) s=0 ;; esac
fi
say module_load "$s" "$(printf '%s' "$out" | $b head -n1)"

# Setting the clock, to the second it is (a success moves it by under a second). busybox's
# date exits 0 when it cannot: a success is one that says nothing.
s=1; out=$($b date -s "@$($b date +%s)" 2>&1 >/dev/null) && [ -z "$out" ] && s=0
say clock_settable "$s"

# open_by_handle_at (the "shocker" escape): inode 2, the root directory of the filesystem
# /etc/hosts is on (the machine's, bind-mounted by Docker). Perl's syscall(), no compiler; the
# handle in a variable (perl dies on a constant there). Only EPERM is a refusal: any other
# failure of the probe itself counts as allowed, so a broken probe fails the test loudly.
s=2; out=
if command -v perl >/dev/null 2>&1; then
  out=$(perl -MPOSIX -e '
    my $n = {x86_64 => 304, aarch64 => 265}->{(POSIX::uname())[4]} or exit 2;
    open(my $f, "<", "/etc/hosts") or exit 2;
    my $handle = pack("LlLL", 8, 1, 2, 0);
    my $fd = syscall($n, fileno($f), $handle, 0);
    print $fd >= 0 ? "opened the root directory of the /etc/hosts filesystem" : "errno " . ($! + 0);
    exit($fd >= 0 ? 0 : $! == 1 ? 1 : 0);' 2>&1) && s=0 || case $? in 2) s=2 ;; 1) s=1 ;; *) s=0 ;; esac
fi
say open_by_handle_at "$s" "$out"

# The stack's own services (TARGETS: name=address:port, from the test).
for t in TARGETS; do
  name=${t%%=*}; addr=${t#*=}; ip=${addr%:*}; port=${addr##*:}; s=1
  if command -v bash >/dev/null 2>&1; then
    timeout 3 bash -c "exec 3<>/dev/tcp/$ip/$port" 2>/dev/null && s=0
  elif [ -n "$bb" ]; then
    $bb nc -w 2 "$ip" "$port" </dev/null >/dev/null 2>&1 && s=0
  else
    s=2
  fi
  say "reach_$name" "$s" "$addr"
done

# Last (it changes this desktop's /proc/sys): CAP_SYS_ADMIN lifts Docker's read-only /proc/sys.
s=1
if $b mount -o remount,rw /proc/sys 2>/dev/null || $b umount /proc/sys 2>/dev/null; then
  $b cat /proc/sys/kernel/core_pattern > /tmp/cp 2>/dev/null \
    && $b cat /tmp/cp > /proc/sys/kernel/core_pattern 2>/dev/null && s=0
fi
say core_pattern_after_remount "$s"
"""


def machine_disk() -> tuple[int, int]:
    """The block device under this machine's Docker data (the machine's disk)."""
    root = "/var/lib/orchestrator-dev/docker"
    if not os.path.isdir(root):
        pytest.skip(f"{root} is not here: the test must run on the machine of its dockerd")
    dev = os.stat(root).st_dev
    return os.major(dev), os.minor(dev)


def attempts(targets: dict[str, str]) -> str:
    major, minor = machine_disk()
    listed = " ".join(f"{name}={address}" for name, address in targets.items())
    return ATTEMPTS.replace("DISK_MAJOR", str(major)).replace("DISK_MINOR", str(minor)).replace("TARGETS", listed)


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
    # The worker serves its metrics, as a sandbox does (on every address: the target below).
    settings = replace(docker_settings, privilege=request.param, worker_metrics_port=free_port())
    async with running_worker(settings) as worker:
        yield request.param, settings, worker


# What each context may do under each profile; anything else allowed fails the test. Under
# caps the container is root on the machine (uid_map) with CAP_SYS_ADMIN, which lifts Docker's
# read-only /proc/sys and writes its own cgroup's devices.allow (the parent, Docker's, allows
# everything; reading the disk was still refused here). This harness's sandbox is the machine
# itself, without the firewall (workers/firewall.py; the compose test covers it): the worker's
# metrics port, on every address, answers through the desktops' gateway.
OPEN_WITHOUT_FIREWALL = {"reach_metrics_via_gateway"}
MAY_ALLOW = {
    ("userns", "desktop root"): set[str](),
    ("userns", "privileged container inside"): set[str](),
    ("caps", "desktop root"): {
        "uid_map_is_machine_root",
        "core_pattern_after_remount",
        "devices_allow_writable",
        "own_limits_writable",
    },
    ("caps", "container inside"): {"uid_map_is_machine_root", "core_pattern_after_remount", "own_limits_writable"},
}


async def test_escapes_from_a_desktop(profiled: tuple[str, Settings, SandboxWorker], client: Client, api: str) -> None:
    profile, settings, worker = profiled
    host = settings.docker_host
    assert host
    sid = (await client.create()).id
    events = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=READY)
    assert events[-1].type == "session.ready", [e.data for e in events]
    (started,) = [e.data["data"] for e in events if e.type == "desktop.started"]
    assert started["privilege"] == profile
    # Reported as unsafe (caps) or not, never confined here: this worker is on the machine.
    assert (started["unsafe"], started["confined"]) == (profile == "caps", False)
    (beat,) = [s for s in await client.sandboxes() if s.id == settings.sandbox_id]
    assert (beat.privilege_unsafe, beat.privilege_confined) == (profile == "caps", False)
    desktop = desktop_name(sid)
    # The stack's real addresses: on the machine's loopback, and through the desktops' gateway
    # (the machine, seen from the desktops' network).
    gateway = await adocker(
        "network",
        "inspect",
        "--format",
        "{{(index .IPAM.Config 0).Gateway}}",
        f"desktops-{settings.sandbox_id}",
        host=host,
    )
    ports = {
        "redis": str(urlsplit(settings.redis_url).port or 6379),
        "api": str(urlsplit(api).port),
        "metrics": str(settings.worker_metrics_port),
    }
    targets = {}
    for name, port in ports.items():
        targets[f"{name}_loopback"] = f"127.0.0.1:{port}"
        targets[f"{name}_via_gateway"] = f"{gateway}:{port}"
    script = attempts(targets)
    # insmod and nc for the desktop's root (the desktop image has neither).
    await adocker("cp", "/bin/busybox", f"{desktop}:/usr/local/bin/busybox", host=host)

    # As the desktop's root, where its user's shell lands (desktop-enter: the namespaces under userns).
    as_root = outcomes(await adocker("exec", desktop, "desktop-enter", "sh", "-c", script, host=host))
    # From a container of the desktop's own dockerd (depth 3), as privileged as it allows:
    # --privileged under userns; under caps (where runc refuses --privileged and ALL) the
    # desktop's own capabilities and no confinement.
    await worker.runtime.images.copy_into(sid, [TEST_IMAGE])
    inside = "privileged container inside" if profile == "userns" else "container inside"
    flags = ["--privileged"] if profile == "userns" else INNER_CAPS
    privileged = outcomes(
        await adocker("exec", desktop, "docker", "run", "--rm", *flags, TEST_IMAGE, "sh", "-c", script, host=host)
    )
    seen = {"desktop root": as_root, inside: privileged}
    print(json.dumps({profile: seen}, indent=1))  # the table in docs/threat-model.md comes from this

    names = {
        "uid_map_is_machine_root",
        "release_agent_writable",
        "core_pattern_writable",
        "sysrq_trigger_writable",
        "machine_disk_readable",
        "machine_disk_from_root_cgroup",
        "mount_cgroup_v1_at_machine_root",
        "own_limits_writable",
        "devices_allow_writable",
        "machine_disk_after_devices_allow",
        "module_load",
        "clock_settable",
        "open_by_handle_at",
        "core_pattern_after_remount",
        *(f"reach_{target}" for target in targets),
    }
    open_here = set() if settings.firewall else OPEN_WITHOUT_FIREWALL
    for where, found in seen.items():
        assert set(found) == names, (where, found)
        allowed = {name for name, outcome in found.items() if outcome not in ("refused", "absent")}
        assert allowed <= MAY_ALLOW[profile, where] | open_here, (where, {n: found[n] for n in allowed})
    # The stack's services never answer a desktop, with or without the firewall.
    for found in seen.values():
        for name in ("redis", "api"):
            assert found[f"reach_{name}_loopback"] == found[f"reach_{name}_via_gateway"] == "refused", found
    # The new attempts ran where their tools are: in the desktop, each of them.
    for name in ("module_load", "clock_settable", "open_by_handle_at"):
        assert as_root[name] == "refused", (name, as_root[name])
    if profile == "userns":
        # The limits attempt found the desktop's limits to try (the desktop's own cgroup, and
        # the privileged container's view of the same), and neither may write them.
        assert as_root["own_limits_writable"] == privileged["own_limits_writable"] == "refused", seen
        # uid 0 inside is the first uid of one of the desktops' ranges.
        uid_map = await adocker("exec", desktop, "desktop-enter", "cat", "/proc/self/uid_map", host=host)
        inside_uid, outside, count = (int(n) for n in uid_map.split())
        assert inside_uid == 0 and count == USERNS_SIZE
        assert outside >= USERNS_FIRST and (outside - USERNS_FIRST) % USERNS_SIZE == 0
    else:
        # The unsafe profile, hardened: root on the machine still (C1), with fewer ways to use it.
        assert as_root["uid_map_is_machine_root"].startswith("ALLOWED")
        for name in ("release_agent_writable", "core_pattern_writable", "mount_cgroup_v1_at_machine_root"):
            assert as_root[name] in ("refused", "absent"), (name, as_root[name])

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


NESTED_CHOICE = """
import asyncio, json, sys
from orchestrator.config import Settings
from workers.prepare import DesktopPreparation, PrivilegeRefused
from workers.privilege import candidates, read_bounding_set, read_uid_map
from workers.runtime import DesktopRuntime

async def main() -> None:
    image = sys.argv[1]
    settings = Settings(privilege="auto", desktop_image=image, sandbox_id="nested", depth=3)
    runtime = DesktopRuntime(
        docker_host="unix:///var/run/docker.sock", image=image, sandbox_id="nested", depth=3,
        socket_dir="/tmp/desktops", profile=candidates("auto", *read_bounding_set(), uid_map=read_uid_map())[0],
    )
    try:
        profile = await DesktopPreparation(runtime, settings).choose_privilege()
        print(json.dumps({"kind": profile.kind.value, "unsafe": profile.unsafe, "confined": profile.confined}))
    except PrivilegeRefused as e:
        print(json.dumps({"refused": e.message}))
    finally:
        await runtime.close()

asyncio.run(main())
"""


async def test_a_worker_nested_in_a_userns_desktop_falls_back_to_confined_caps(
    docker_settings: Settings, client: Client
) -> None:
    """What self-hosting does (a sandbox inside a userns desktop): this branch's worker code, in
    a --privileged container of the desktop's dockerd (the sandbox image, for its Python), decides
    on that dockerd. Its uid_map is the desktop's range: userns cannot nest there (no 65536 ids
    above 100000 in a range of 65536), so auto takes caps, confined, instead of refusing."""
    host = docker_settings.docker_host
    assert host
    async with running_worker(docker_settings) as worker:
        sid = (await client.create()).id
        events = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=READY)
        assert events[-1].type == "session.ready", [e.data for e in events]
        desktop = desktop_name(sid)
        await worker.runtime.images.copy_into(sid, [SANDBOX_IMAGE])
        root = Path(__file__).parents[2]
        await pipe_in(
            host,
            ["exec", "-i", desktop, "desktop-enter"],
            "mkdir -p /tmp/src && tar -x -C /tmp/src",
            f"tar -c -C {root} --exclude=__pycache__ orchestrator workers",
        )
        out = await adocker(
            "exec", desktop, "desktop-enter", "docker", "run", "--rm", "--privileged",
            "-v", "/var/run/docker.sock:/var/run/docker.sock", "-v", "/tmp/src:/src:ro", "-e", "PYTHONPATH=/src",
            "--entrypoint", "python3", SANDBOX_IMAGE, "-c", NESTED_CHOICE, SANDBOX_IMAGE,
            host=host, timeout=180,
        )  # fmt: skip
        choice = json.loads(out.splitlines()[-1])
        assert choice == {"kind": "caps", "unsafe": True, "confined": True}, out


async def test_auto_refuses_to_serve_where_userns_fails(
    docker_settings: Settings, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """No silent fallback to an unsafe profile: with a desktop image that has no userns set-up
    (the test image), the userns probe fails on the machine's dockerd, and the worker stops at
    start-up with one error line saying what to set; it never heartbeats, so nothing is placed."""
    settings = replace(docker_settings, desktop_image=TEST_IMAGE)
    with pytest.raises(PrivilegeRefused) as refused:
        async with running_worker(settings):
            pass
    assert refused.value.code == "privilege_refused"
    (error,) = [r for r in caplog.records if r.name == "workers.prepare" and r.levelname == "ERROR"]
    assert "(userns: " in error.getMessage(), error.getMessage()
    assert "ORCH_PRIVILEGE=caps|privileged|runtime:<name>" in error.getMessage()
    assert not [s for s in await client.sandboxes() if s.id == settings.sandbox_id]
