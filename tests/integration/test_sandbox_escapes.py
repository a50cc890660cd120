"""A hostile sandbox: root in a sandbox container started as docker-compose.yml starts it (its
settings read through `docker compose config`, so the test follows the file), with its dockerd up
(start-dockerd, which remounts the cgroups), tries the escape suite of test_escapes.py and a fresh
/proc. The outcomes measured on our CI kind of machine are asserted exactly; what they mean, and
what they do not stop, is in docs/threat-model.md ("A hostile sandbox")."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest

from .conftest import SANDBOX_IMAGE, adocker, compose_sandbox_flags
from .test_escapes import attempts, outcomes

# Besides test_escapes.ATTEMPTS: what CAP_SYS_ADMIN in the machine's user namespace gives
# through a /proc of its own (not Docker's, with its masked and read-only paths).
FRESH_PROC = r"""
s=1; mkdir -p /tmp/p && mount -t proc proc /tmp/p 2>/dev/null && {
  cat /tmp/p/sys/kernel/core_pattern > /tmp/cp 2>/dev/null \
    && cat /tmp/cp > /tmp/p/sys/kernel/core_pattern 2>/dev/null && s=0
  [ -e /tmp/p/sysrq-trigger ] || sysrq=absent
  umount /tmp/p
}
[ "$s" = 0 ] && echo "core_pattern_via_fresh_proc ALLOWED" || echo "core_pattern_via_fresh_proc refused"
echo "sysrq_trigger_via_fresh_proc ${sysrq:-present}"
"""

# Measured here (cgroup v1, kernel 6.18, no LSM, no CONFIG_MAGIC_SYSRQ). "least" is
# docker-compose.yml; "least, host cgroupns" is the same under compose v1, which cannot say
# `cgroup: private` (sandbox-init refuses to start there: the test below); "caps" is the unsafe
# overlay docker-compose.caps.yml. (The privileged overlay cannot start here: runc "unable to
# apply caps: operation not permitted".)
REFUSED = {
    "release_agent_writable": "absent",
    "core_pattern_writable": "refused",
    "sysrq_trigger_writable": "absent",
    "machine_disk_readable": "refused",
    "machine_disk_from_root_cgroup": "refused",
    "mount_cgroup_v1_at_machine_root": "refused",
    "devices_allow_writable": "refused",
    "machine_disk_after_devices_allow": "refused",
    "module_load": "refused",
    "clock_settable": "refused",
    "open_by_handle_at": "refused",
    "core_pattern_after_remount": "refused",
    "core_pattern_via_fresh_proc": "refused",
    "sysrq_trigger_via_fresh_proc": "absent",
}
# Root of the machine's user namespace with CAP_SYS_ADMIN, in every variant: Docker's read-only
# /proc/sys and a fresh /proc give core_pattern (code as machine root at the next crash), and the
# sandbox's own devices list is writable (the machine's disk still refused to open here).
SYS_ADMIN = {
    "uid_map_is_machine_root": "ALLOWED",
    "devices_allow_writable": "ALLOWED",
    "core_pattern_after_remount": "ALLOWED",
    "core_pattern_via_fresh_proc": "ALLOWED",
    # Its own cgroup's limits (memory, pids, CPU) at the root of its cgroup namespace.
    "own_limits_writable": "ALLOWED",
}
EXPECTED = {
    "least": REFUSED | SYS_ADMIN,
    # The machine's hierarchy roots: the classic release_agent escape.
    "least, host cgroupns": REFUSED
    | SYS_ADMIN
    | {"release_agent_writable": "ALLOWED", "mount_cgroup_v1_at_machine_root": "ALLOWED"}
    # (the probe writes the limits at its namespace's root: here the machine's, which has none)
    | {"own_limits_writable": "refused"},
    # Every capability: modules, the clock, open_by_handle_at (seccomp unconfined) on top.
    "caps": REFUSED
    | SYS_ADMIN
    | {"module_load": "ALLOWED", "clock_settable": "ALLOWED", "open_by_handle_at": "ALLOWED"},
}


@pytest.fixture
async def sandbox_box(docker_host: str, request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str]]:
    """(variant, container): a sandbox container with its dockerd up."""
    variant: str = request.param
    flags = list(compose_sandbox_flags(*(["docker-compose.caps.yml"] if variant == "caps" else [])))
    if variant == "least, host cgroupns":
        flags = [f for f in flags if not f.startswith("--cgroupns")] + ["--cgroupns=host"]
    name = f"hostile-sandbox-{uuid.uuid4().hex[:8]}"
    await adocker(
        "run", "-d", "--name", name, "--label", "orchestrator.role=test-hostile-sandbox", *flags,
        "-v", "/var/lib/docker", "--entrypoint", "start-dockerd", SANDBOX_IMAGE, "--supervise",
        host=docker_host,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            while not await adocker("exec", name, "docker", "version", "-f", "ok", host=docker_host, check=False):
                await asyncio.sleep(0.2)
        yield variant, name
    finally:
        await adocker("rm", "-f", "-v", name, host=docker_host, check=False)


@pytest.mark.parametrize("sandbox_box", list(EXPECTED), indirect=True)
async def test_what_root_in_a_sandbox_reaches(sandbox_box: tuple[str, str], docker_host: str) -> None:
    variant, box = sandbox_box
    # insmod for the module probe (the sandbox image has no busybox).
    await adocker("cp", "/bin/busybox", f"{box}:/usr/local/bin/busybox", host=docker_host)
    found = outcomes(await adocker("exec", box, "sh", "-c", attempts({}) + FRESH_PROC, host=docker_host))
    print(json.dumps({variant: found}, indent=1))  # the table in docs/threat-model.md comes from this
    seen = {name: outcome.split(":")[0] for name, outcome in found.items()}
    wrong = {name: (found.get(name), want) for name, want in EXPECTED[variant].items() if seen.get(name) != want}
    assert seen == EXPECTED[variant], wrong


async def test_sandbox_init_refuses_the_machines_cgroup_namespace(docker_host: str) -> None:
    """What compose v1 gives on a cgroup v1 machine (no `cgroup: private`): sandbox-init stops
    before anything starts, saying what to do; the same settings with a private one pass."""
    base = [f for f in compose_sandbox_flags() if not f.startswith("--cgroupns")]
    for cgroupns, status in (("host", "1"), ("private", "0")):
        out = await adocker(
            "run", "--rm", *base, f"--cgroupns={cgroupns}", "--entrypoint", "sh", SANDBOX_IMAGE, "-c",
            # Only the check: sandbox-init with everything after it cut off.
            "sed '/^check_privilege$/q' /usr/local/bin/sandbox-init > /tmp/check && sh /tmp/check; echo status=$?",
            host=docker_host, stderr=True,
        )  # fmt: skip
        assert f"status={status}" in out, (cgroupns, out)
        if cgroupns == "host":
            assert "refusing to start: this sandbox shares the machine's cgroup namespace" in out, out
        else:
            assert "privilege: least (17 capabilities, private cgroup namespace)" in out, out
