"""scripts/env.sh on a second, private dockerd and Redis: starts them, reuses them, and
recovers from a daemon killed with its pid file and socket left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]

NETNS_PREFIX = "orchenv"


@pytest.fixture
def private_env(docker_host: str) -> Iterator[dict[str, str]]:
    """A second dockerd and Redis in a network namespace of their own: two daemons on one
    network stack fight over docker0 and iptables (a restarted one deletes the other's bridge)."""
    if os.geteuid() != 0:
        pytest.skip("scripts/env.sh starts daemons: needs root")
    base = Path(tempfile.mkdtemp(prefix="orch-env-"))
    netns = f"{NETNS_PREFIX}{free_port()}"
    subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
    subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "ip", "link", "set", "lo", "up"], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "REDIS_URL")} | {
        "ORCH_STATE_DIR": str(base / "state"),
        "ORCH_RUN_DIR": str(base / "run"),
        "ORCH_REDIS_PORT": "6391",
        "ORCH_DEPTH": "30",
        "NETNS": netns,
    }
    yield env
    env_sh(env, "down")
    subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
    subprocess.run(["rm", "-rf", str(base)], check=False)


def env_sh(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # nsenter, not `ip netns exec`: that also remounts /sys, hiding the cgroup mounts dockerd needs.
        ["nsenter", f"--net=/run/netns/{env['NETNS']}", "bash", str(ROOT / "scripts/env.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_env_script_is_idempotent_and_cleans_a_dead_daemon(private_env: dict[str, str]) -> None:
    run_dir = Path(private_env["ORCH_RUN_DIR"])
    first = env_sh(private_env, "up")
    assert first.returncode == 0, first.stderr
    assert f"DOCKER_HOST=unix://{run_dir}/docker.sock" in first.stdout
    assert "REDIS_URL=redis://127.0.0.1:6391/0" in first.stdout
    assert (run_dir / "env").read_text() == first.stdout
    pid = int((run_dir / "docker.pid").read_text())

    again = env_sh(private_env, "up")
    assert again.returncode == 0, again.stderr
    assert "dockerd already runs" in again.stderr and "redis already runs" in again.stderr
    assert int((run_dir / "docker.pid").read_text()) == pid

    # Kill the daemon hard: its pid file and socket stay behind.
    os.kill(pid, signal.SIGKILL)
    subprocess.run(["bash", "-c", f"while kill -0 {pid} 2>/dev/null; do sleep 0.05; done"], timeout=30)
    assert (run_dir / "docker.pid").exists() and (run_dir / "docker.sock").exists()

    recovered = env_sh(private_env, "up")
    assert recovered.returncode == 0, recovered.stderr
    assert "starting dockerd" in recovered.stderr
    assert int((run_dir / "docker.pid").read_text()) != pid
    version = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        env={**os.environ, "DOCKER_HOST": f"unix://{run_dir}/docker.sock"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert version.returncode == 0 and version.stdout.strip(), version.stderr
