"""What deploy/kubernetes/make-secrets.py prints works on a real redis-server: the users.acl
loads, each client's REDIS_URL (as the manifests build it) logs in, the probe's user answers
PONG, and anonymous clients are refused."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import redis
from redis.exceptions import AuthenticationError, ResponseError

from tests.unit.test_kubernetes_manifests import BASE, containers, env_of, generated_secrets, the

from .test_redis_security import running, start_server


def test_the_generated_acl_serves_the_manifests_urls(tmp_path: Path) -> None:
    secret = generated_secrets()["orchestrator-redis"]
    (tmp_path / "users.acl").write_text(secret["users.acl"])
    with running(start_server(tmp_path, "--aclfile", str(tmp_path / "users.acl"))) as server:
        for kind, name in (("Deployment", "api"), ("StatefulSet", "sandbox")):
            (container,) = containers(the(BASE, kind, name))
            env = env_of(container)
            password = secret[env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"]]
            # What Kubernetes makes of $(REDIS_PASSWORD), pointed at this server.
            url = env["REDIS_URL"]["value"].replace("$(REDIS_PASSWORD)", password)
            url = url.replace("@redis:6379", f"@127.0.0.1:{server.port}")
            with contextlib.closing(redis.Redis.from_url(url)) as client:
                assert client.ping() is True, name
        with contextlib.closing(redis.Redis(port=server.port)) as anonymous:
            try:
                anonymous.ping()
                raise AssertionError("an anonymous PING was answered")
            except (AuthenticationError, ResponseError) as e:
                assert "NOAUTH" in str(e) or "Authentication" in str(e)
        # The probe's command, as the redis container runs it (REDISCLI_AUTH from the Secret).
        (container,) = containers(the(BASE, "StatefulSet", "redis"))
        probe = container["readinessProbe"]["exec"]["command"][-1].replace("redis-cli", f"redis-cli -p {server.port}")
        ok = subprocess.run(
            ["sh", "-c", probe], env={"REDISCLI_AUTH": secret["admin-password"], "PATH": "/usr/bin:/bin"}
        )
        assert ok.returncode == 0
        wrong = subprocess.run(["sh", "-c", probe], env={"REDISCLI_AUTH": "wrong", "PATH": "/usr/bin:/bin"})
        assert wrong.returncode != 0, "the probe must fail when Redis refuses it"
