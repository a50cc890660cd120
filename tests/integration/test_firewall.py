"""The desktops' firewall in a real sandbox container (the sandbox image's sandbox-init, its own
dockerd), with no worker able to run (Redis unreachable): the rules are loaded before dockerd
starts, so desktops that dockerd restarts after a sandbox restart are fenced from their first
packet. Stand-in desktops are small containers on a bridge of the sandbox's dockerd, which is
all the rules match on (``br-+``), with a restart policy like the real ones.

Checked each time: a neighbour on the sandbox's own network (where Redis lives in compose) does
not answer a desktop, and two desktops that turned IPv6 on do not reach each other nor the
sandbox over link-local. Flushing the chains once shows the probes work (the guard is what
stops them)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from workers.firewall import CHAIN, INPUT_CHAIN

from .conftest import SANDBOX_IMAGE, TEST_IMAGE, adocker, compose_sandbox_flags

HTTPD = "mkdir -p /www && echo hello-from-target > /www/index.html && exec busybox httpd -f -p 80 -h /www"
V6 = [f"--sysctl=net.ipv6.conf.{i}.disable_ipv6=0" for i in ("all", "default", "eth0")]
# Like a pod with IPv6 on: the sandbox's bridges get a link-local address it answers on (its
# /proc/sys is read-only: the defaults new interfaces take are set when it is made).
SANDBOX_V6 = [f"--sysctl=net.ipv6.conf.{i}.disable_ipv6=0" for i in ("all", "default")]


class Sandbox:
    def __init__(self, host: str, name: str) -> None:
        self.host, self.name = host, name

    async def sh(self, script: str, check: bool = True) -> str:
        return await adocker("exec", self.name, "sh", "-c", script, host=self.host, check=check)

    async def in_desktop(self, desktop: str, *args: str) -> str:
        """``args`` in a stand-in desktop, bounded inside (busybox timeout): '' when no answer."""
        cmd = ["docker", "exec", desktop, "busybox", "timeout", "4", *args]
        return await adocker("exec", self.name, *cmd, host=self.host, check=False, timeout=30)

    async def wait(self, what: str, script: str, timeout: float = 60) -> None:
        try:
            async with asyncio.timeout(timeout):
                while (await self.sh(script, check=False)) != "yes":
                    await asyncio.sleep(0.2)
        except TimeoutError:
            logs = await adocker("logs", "--tail", "30", self.name, host=self.host, check=False, stderr=True)
            pytest.fail(f"{what} within {timeout} s; sandbox log:\n{logs}")

    async def link_local(self, where: str) -> str:
        """The fe80:: address of eth0 in a desktop (``where``), or of the desktops' bridge."""
        if where == "bridge":
            show = "ip -6 addr show dev $(ls /sys/class/net | grep '^br-')"
        else:
            show = f"docker exec {where} busybox ip -6 addr show dev eth0"
        out = await self.sh(f"{show} | grep -o 'fe80::[0-9a-f:]*'")
        assert out, f"no link-local address on {where}"
        return out.split()[0]


@pytest.fixture
async def sandbox(docker_host: str) -> AsyncIterator[tuple[Sandbox, str]]:
    tag = uuid.uuid4().hex[:8]
    names = {"target": f"fw-target-{tag}", "sandbox": f"fw-sandbox-{tag}"}
    labels = ["--label", f"orchestrator.role=test-firewall-{tag}"]
    try:
        await adocker("run", "-d", *labels, "--name", names["target"], TEST_IMAGE, "sh", "-c", HTTPD, host=docker_host)
        target = await adocker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", names["target"], host=docker_host)
        # Depth 2: its pool (10.214/16) stays clear of this machine's dockerd (ORCH_DEPTH=1).
        await adocker(
            "run", "-d", *labels, "--name", names["sandbox"], *compose_sandbox_flags(), *SANDBOX_V6,
            "-v", "/var/lib/docker",
            "-e", "ORCH_DEPTH=2", "-e", "REDIS_URL=redis://127.0.0.1:9/0", SANDBOX_IMAGE,
            host=docker_host,
        )  # fmt: skip
        box = Sandbox(docker_host, names["sandbox"])
        await box.wait("the sandbox's dockerd did not answer", "docker version >/dev/null 2>&1 && echo yes")
        yield box, target
    finally:
        await adocker("rm", "-fv", *names.values(), host=docker_host, check=False)


async def test_desktops_are_fenced_before_the_worker_and_after_a_sandbox_restart(
    sandbox: tuple[Sandbox, str],
) -> None:
    box, target = sandbox
    host = box.host
    archive = await asyncio.create_subprocess_shell(
        f"docker save {TEST_IMAGE} | docker exec -i {box.name} docker load -q",
        env={"DOCKER_HOST": host, "PATH": "/usr/local/bin:/usr/bin:/bin"},
    )
    assert await archive.wait() == 0
    await box.sh("docker network create -o com.docker.network.bridge.enable_icc=false desktops >/dev/null")
    for name, extra in (("desk", []), ("v6a", V6), ("v6b", V6)):
        await box.sh(
            f"docker run -d --name {name} --network desktops --restart unless-stopped {' '.join(extra)} "
            f"{TEST_IMAGE} sleep 1d >/dev/null"
        )

    async def reach() -> dict[str, bool]:
        peer, bridge = await box.link_local("v6b"), await box.link_local("bridge")
        ping = ["busybox", "ping", "-c", "1", "-W", "2"]
        http, to_peer, to_bridge = await asyncio.gather(
            box.in_desktop("desk", "busybox", "wget", "-qO-", f"http://{target}/"),
            box.in_desktop("v6a", *ping, f"{peer}%eth0"),
            box.in_desktop("v6a", *ping, f"{bridge}%eth0"),
        )
        return {
            "the sandbox's network": http == "hello-from-target",
            "another desktop over IPv6": "1 packets received" in to_peer,
            "the sandbox over IPv6": "1 packets received" in to_bridge,
        }

    closed = dict.fromkeys(["the sandbox's network", "another desktop over IPv6", "the sandbox over IPv6"], False)
    # No worker ever ran here (it cannot reach Redis): sandbox-init loaded the rules itself.
    assert "the worker exited with status" in await adocker("logs", box.name, host=host, stderr=True)
    assert await reach() == closed

    # The probes work: with the chains emptied (as a person could), everything answers.
    await box.sh(f"iptables -F {CHAIN} && iptables -F {INPUT_CHAIN} && ip6tables -F {CHAIN}")
    assert await reach() == dict.fromkeys(closed, True)

    # A sandbox restart: new network namespace, no rules, and dockerd brings the desktops back
    # at once. sandbox-init loads the rules before dockerd starts, Redis or not.
    await adocker("restart", "-t", "1", box.name, host=host)
    await box.wait(
        "the desktops did not come back",
        "[ $(docker ps -q --filter status=running | wc -l) -eq 3 ] && echo yes",
    )
    assert await reach() == closed
