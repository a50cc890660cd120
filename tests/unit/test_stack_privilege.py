"""scripts/stack.sh picks the sandboxes' privilege (ORCH_SANDBOX_PRIVILEGE): least by default,
the unsafe overlays only when named (and said so). Read through `docker compose config`, which
needs no Docker Engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from workers.privilege import USERNS_CAPS

ROOT = Path(__file__).resolve().parents[2]


def config(privilege: str | None, *, wrap: tuple[str, ...] = ()) -> tuple[int, dict[str, Any], str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` (v2) here: scripts/env.sh installs it")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "ORCH_"))}
    if privilege is not None:
        env["ORCH_SANDBOX_PRIVILEGE"] = privilege
    run = subprocess.run(
        [*wrap, "bash", str(ROOT / "scripts" / "stack.sh"), "compose", "config", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    sandbox = json.loads(run.stdout)["services"]["sandbox"] if run.returncode == 0 else {}
    return run.returncode, sandbox, run.stderr


def test_least_privilege_by_default() -> None:
    for privilege in (None, "auto", "least"):
        status, sandbox, stderr = config(privilege)
        assert status == 0, stderr
        assert not sandbox.get("privileged")
        assert (sandbox["cap_drop"], sorted(sandbox["cap_add"])) == (["ALL"], sorted(USERNS_CAPS))
        assert sandbox["cgroup"] == "private"
        assert sandbox["security_opt"][0].startswith("seccomp=") and "unconfined" not in sandbox["security_opt"][0]
        assert "ORCH_SANDBOX_UNSAFE" not in sandbox["environment"] and "UNSAFE" not in stderr


def test_unsafe_overlays_only_when_named() -> None:
    status, caps, stderr = config("caps")
    assert status == 0, stderr
    assert "UNSAFE: ORCH_SANDBOX_PRIVILEGE=caps" in stderr
    assert caps["environment"]["ORCH_SANDBOX_UNSAFE"] == "caps"
    # Docker takes the last seccomp option, and ALL in cap_add over cap_drop's ALL.
    assert [o for o in caps["security_opt"] if o.startswith("seccomp=")][-1] == "seccomp=unconfined"
    assert "ALL" in caps["cap_add"] and "SYS_RESOURCE" in caps["cap_drop"]
    status, privileged, stderr = config("privileged")
    assert status == 0, stderr
    assert privileged["privileged"] is True and "UNSAFE: ORCH_SANDBOX_PRIVILEGE=privileged" in stderr
    status, _, stderr = config("root")
    assert status != 0 and "ORCH_SANDBOX_PRIVILEGE must be auto, least, caps or privileged" in stderr


def test_auto_is_least_in_a_user_namespace_too() -> None:
    """A stack inside a userns desktop (self-hosting) gets the same least-privilege sandboxes."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-Ur", "true"], capture_output=True).returncode:
        pytest.skip("no user namespaces here")
    status, sandbox, stderr = config("auto", wrap=("unshare", "-Ur"))
    assert status == 0, stderr
    assert not sandbox.get("privileged") and sorted(sandbox["cap_add"]) == sorted(USERNS_CAPS)
    assert "UNSAFE" not in stderr
