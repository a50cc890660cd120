"""A registry with htpasswd auth, configured as deploy/kubernetes/registry.yaml configures it
(its env, the htpasswd make-secrets.py prints), and the worker's pulls from it: they log in
with ORCH_REGISTRY_CREDENTIALS and are refused without."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import httpx
import pytest

from orchestrator.config import Settings
from tests.conftest import free_port
from tests.unit.test_kubernetes_manifests import BASE, containers, env_of, generated_secrets, the
from workers.runtime.errors import DesktopError
from workers.worker import _runtime

from .conftest import SANDBOX_IMAGE, TEST_IMAGE, adocker


async def test_pulls_log_in_to_the_kubernetes_registry(docker_host: str, tmp_path: Path) -> None:
    secret = generated_secrets()["orchestrator-registry"]
    (registry,) = containers(the(BASE, "Deployment", "registry"))
    env = {name: e["value"] for name, e in env_of(registry).items()}
    auth_dir = tmp_path / "auth"
    auth_dir.mkdir()
    (auth_dir / "htpasswd").write_text(secret["htpasswd"])
    mounted = os.path.dirname(env["REGISTRY_AUTH_HTPASSWD_PATH"])
    tag = uuid.uuid4().hex[:8]
    name, port = f"registry-auth-{tag}", free_port()
    address = f"127.0.0.1:{port}"
    image = f"fence-test/busybox:{tag}"
    config = tmp_path / "docker-config"
    try:
        await adocker(
            "run", "-d", "--name", name, "--label", "orchestrator.role=test-registry", "-p", f"{address}:5000",
            "-v", f"{auth_dir}:{mounted}:ro", *(f"-e{k}={v}" for k, v in env.items()),
            SANDBOX_IMAGE, *registry["args"], host=docker_host,
        )  # fmt: skip
        async with httpx.AsyncClient() as http, asyncio.timeout(30):
            while True:
                try:
                    if (await http.get(f"http://{address}/v2/")).status_code == 401:
                        break  # up, and asking for a login
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        # Push as the operator (orchestrator-push), through a CLI config of the test's own.
        user, password = secret["push-credentials"].split(":", 1)
        login = await asyncio.create_subprocess_exec(
            "docker", "--config", str(config), "login", "-u", user, "--password-stdin", address,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            env={**os.environ, "DOCKER_HOST": docker_host},
        )  # fmt: skip
        await login.communicate(password.encode())
        assert login.returncode == 0
        await adocker("tag", TEST_IMAGE, f"{address}/{image}", host=docker_host)
        await adocker("--config", str(config), "push", f"{address}/{image}", host=docker_host)
        await adocker("rmi", f"{address}/{image}", host=docker_host)

        async def pull(credentials: tuple[str, str] | None) -> bool:
            settings = Settings(docker_host=docker_host, registry=address, registry_credentials=credentials)
            runtime = _runtime(settings)
            try:
                return await runtime.images.pull(address, image)
            finally:
                await runtime.close()

        for credentials in (None, ("orchestrator-sandbox", "wrong")):
            with pytest.raises(DesktopError) as refused:
                await pull(credentials)
            assert refused.value.code == "image_pull_failed"
            assert "unauthorized" in refused.value.message or "auth" in refused.value.message
        sandbox_user, sandbox_password = secret["sandbox-credentials"].split(":", 1)
        assert await pull((sandbox_user, sandbox_password)) is True
        assert await adocker("image", "inspect", "-f", "{{.Id}}", image, host=docker_host)
    finally:
        await adocker("rm", "-fv", name, host=docker_host, check=False)
        await adocker("rmi", "-f", image, f"{address}/{image}", host=docker_host, check=False)
