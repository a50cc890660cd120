"""Settings, read once from the environment (``ORCH_*``, ``REDIS_URL``, ``DOCKER_HOST``)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Every Redis key the project writes starts with this (arq's own job keys excepted: arq fixes them).
    key_prefix: str = "orchestrator:"
    # This process's sandbox (worker) or the sandbox used when none has reported yet (API).
    sandbox_id: str = "local"
    # Depth of the sandbox's dockerd; its desktops run one level deeper.
    depth: int = 1
    docker_host: str | None = None
    desktop_image: str = "orchestrator/desktop:dev"
    # Host directory under which each desktop gets a bind-mounted folder holding its dockerd's
    # socket, so the worker reaches the inner daemon without `docker exec`.
    socket_dir: str = "/run/orchestrator/desktops"
    # auto | privileged | caps | runtime:<name>
    privilege: str = "auto"
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    max_body_bytes: int = 64 * 1024
    ready_timeout_s: float = 60.0
    stop_timeout_s: int = 20
    firehose_maxlen: int = 100_000
    session_stream_maxlen: int = 2_000
    heartbeat_interval_s: float = 5.0
    sse_keepalive_s: float = 15.0
    max_sessions: int = 50
    # arq polls Redis for new jobs; its default 0.5 s dominates a sub-second session start.
    poll_delay_s: float = 0.02
    max_jobs: int = 16
    hostname: str = field(default_factory=socket.gethostname)

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        return cls(
            redis_url=env("REDIS_URL") or cls.redis_url,
            key_prefix=env("ORCH_KEY_PREFIX") or cls.key_prefix,
            sandbox_id=env("ORCH_SANDBOX_ID") or cls.sandbox_id,
            depth=_env_int("ORCH_DEPTH", cls.depth),
            docker_host=env("DOCKER_HOST") or None,
            desktop_image=env("ORCH_DESKTOP_IMAGE") or cls.desktop_image,
            socket_dir=env("ORCH_SOCKET_DIR") or cls.socket_dir,
            privilege=env("ORCH_PRIVILEGE") or cls.privilege,
            api_host=env("ORCH_API_HOST") or cls.api_host,
            api_port=_env_int("ORCH_API_PORT", cls.api_port),
            max_body_bytes=_env_int("ORCH_MAX_BODY_BYTES", cls.max_body_bytes),
            ready_timeout_s=_env_float("ORCH_READY_TIMEOUT", cls.ready_timeout_s),
            stop_timeout_s=_env_int("ORCH_STOP_TIMEOUT", cls.stop_timeout_s),
            heartbeat_interval_s=_env_float("ORCH_HEARTBEAT_INTERVAL", cls.heartbeat_interval_s),
            sse_keepalive_s=_env_float("ORCH_SSE_KEEPALIVE", cls.sse_keepalive_s),
            max_sessions=_env_int("ORCH_MAX_SESSIONS", cls.max_sessions),
            poll_delay_s=_env_float("ORCH_POLL_DELAY", cls.poll_delay_s),
            max_jobs=_env_int("ORCH_MAX_JOBS", cls.max_jobs),
        )
