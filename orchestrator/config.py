"""Settings, read once from the environment (``ORCH_*``, ``REDIS_URL``, ``DOCKER_HOST``)."""

from __future__ import annotations

import ipaddress
import os
import re
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


def _memory_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            return int(next(line.split()[1] for line in f if line.startswith("MemTotal:"))) // 1024
    except (OSError, StopIteration, ValueError):
        return 1024


def _tokens_from_env() -> str:
    inline = os.environ.get("ORCH_TOKENS", "")
    path = os.environ.get("ORCH_TOKENS_FILE")
    if path:
        with open(path) as f:
            inline = f"{inline};{f.read()}"
    return inline


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def _env_sentinels(name: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` (IPv6 as ``[::1]:26379``) -> ((host, port), ...)."""
    raw = os.environ.get(name) or ""
    if not raw.strip():
        return ()
    sentinels: list[tuple[str, int]] = []
    for item in (part.strip() for part in raw.split(",")):
        host, sep, port = item.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not item or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{name} must be host:port[,host:port...] with ports 1-65535; {item!r} in {raw!r} is not")
        sentinels.append((host, int(port)))
    return tuple(sentinels)


LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")


def parse_labels(raw: str) -> dict[str, str]:
    """``k=v,k=v`` into a dict; keys as session label keys, values free of ``,``."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not LABEL_RE.fullmatch(key):
            raise ValueError(f"ORCH_SANDBOX_LABELS: {item!r} is not key=value with a valid key")
        labels[key] = value
    return labels


def parse_networks(raw: str) -> tuple[str, ...]:
    """``cidr,cidr`` (IPv4 or IPv6 networks), validated."""
    networks = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"ORCH_DESKTOP_DENY: {item!r} is not a network (like 10.96.0.0/12)") from None
    return tuple(networks)


@dataclass(frozen=True)
class Settings:
    # May hold a password: kept out of repr (and so out of tracebacks and test output).
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    # Redis Sentinel (REDIS_SENTINELS "host:port,..."): when set, the master named
    # redis_sentinel_master is asked of the sentinels, and REDIS_URL only gives its user,
    # password, db and whether to use TLS (rediss://). See docs/redis.md.
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = "mymaster"
    # The sentinels' own password (their requirepass), if they have one.
    redis_sentinel_password: str | None = field(default=None, repr=False)
    # TLS (rediss://): the CA file that signed the server's certificate, and a client
    # certificate and key for servers that ask for one (tls-auth-clients).
    redis_tls_ca: str | None = None
    redis_tls_cert: str | None = None
    redis_tls_key: str | None = None
    # Every Redis key the project writes starts with this (arq's own job keys excepted: arq fixes them).
    key_prefix: str = "orchestrator:"
    # This worker's sandbox.
    sandbox_id: str = "local"
    # API: where sessions go while no sandbox has reported (e.g. make up, whose worker is "local"
    # and may start after the API). Unset: a create with no live sandbox is refused (503).
    default_sandbox: str | None = None
    # Depth of the sandbox's dockerd; its desktops run one level deeper.
    depth: int = 1
    docker_host: str | None = None
    desktop_image: str = "orchestrator/desktop:dev"
    # This level's registry (host:port, plain HTTP): when the desktop image is missing, the
    # worker pulls it from there. start-dockerd lists it in the daemon's insecure-registries.
    registry: str | None = None
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
    # How often a worker probes its ready desktops (desktop.health events on changes).
    health_interval_s: float = 2.0
    sse_keepalive_s: float = 15.0
    max_sessions: int = 50
    # What one desktop may ask for on this sandbox.
    max_cpus: float = field(default_factory=lambda: float(os.cpu_count() or 1))
    max_memory_mb: int = field(default_factory=_memory_mb)
    max_pids: int = 65536
    # TTL for sessions that do not set one (0: none) and what happens when it runs out.
    default_ttl_s: int = 0
    default_ttl_action: str = "stop"
    # Deadline for making the volume and the desktop container (readiness has its own).
    provision_timeout_s: float = 60.0
    # The reconciler: how often it runs, and how old an object of an unknown or deleted
    # session must be before it is removed (a create may be between its steps).
    reconcile_interval_s: float = 10.0
    orphan_grace_s: float = 300.0
    # A worker holds a session's lock while it works on it; a dead worker's lock lapses after this.
    lock_lease_s: float = 15.0
    # API tokens: "name:sha256hex:scope+scope;..." (see orchestrator/auth.py).
    tokens: str = ""
    # Test-only fault hook: the worker SIGKILLs itself on reaching this step (see workers/lifecycle.py).
    fault_kill_at: str | None = None
    # arq polls Redis for new jobs; its default 0.5 s dominates a sub-second session start.
    # 10 ms: pickup p50 ~ 12 ms (bench: queue) for ~100 cheap ZRANGEBYSCOREs a second.
    poll_delay_s: float = 0.01
    # Jobs mostly wait on Docker: enough to run a burst of creates at once (bench: 20).
    max_jobs: int = 32
    # Warm desktops each sandbox keeps ready for creates that take the defaults (0: no pool).
    pool_size: int = 0
    # Labels this sandbox carries, matched by sessions' constraints: ORCH_SANDBOX_LABELS=gpu=true,zone=a
    sandbox_labels: dict[str, str] = field(default_factory=dict)
    # A sandbox whose heartbeat is older than this is unavailable: no new sessions, and its
    # sessions are failed with desktop_lost (see docs/operations.md). Keep it >= 3 heartbeats.
    lost_after_s: float = 15.0
    # How often each API process looks for silent sandboxes.
    monitor_interval_s: float = 2.0
    # How long a drain (API or SIGTERM) waits for queued and running jobs before the worker exits.
    drain_timeout_s: float = 90.0
    # Firewall desktops off the sandbox's own networks (workers/firewall.py): on in the sandbox
    # image (ORCH_FIREWALL=1), off for a worker run on a host (it would edit the host's rules).
    firewall: bool = False
    # More networks desktops must not reach (e.g. a cluster's pod and service ranges).
    desktop_deny: tuple[str, ...] = ()
    # The worker's own /metrics (Prometheus) on this TCP port; 0: not served.
    worker_metrics_port: int = 0
    hostname: str = field(default_factory=socket.gethostname)

    def __post_init__(self) -> None:
        if self.lost_after_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"ORCH_SANDBOX_LOST_AFTER ({self.lost_after_s:g} s) must exceed ORCH_HEARTBEAT_INTERVAL"
                f" ({self.heartbeat_interval_s:g} s): a live sandbox would be declared lost between beats"
            )
        if self.default_ttl_action not in ("stop", "delete"):
            raise ValueError(f"ORCH_DEFAULT_TTL_ACTION must be stop or delete, got {self.default_ttl_action!r}")

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        return cls(
            redis_url=env("REDIS_URL") or cls.redis_url,
            redis_sentinels=_env_sentinels("REDIS_SENTINELS"),
            redis_sentinel_master=env("REDIS_SENTINEL_MASTER") or cls.redis_sentinel_master,
            redis_sentinel_password=env("ORCH_REDIS_SENTINEL_PASSWORD") or None,
            redis_tls_ca=env("REDIS_TLS_CA_FILE") or None,
            redis_tls_cert=env("REDIS_TLS_CERT_FILE") or None,
            redis_tls_key=env("REDIS_TLS_KEY_FILE") or None,
            key_prefix=env("ORCH_KEY_PREFIX") or cls.key_prefix,
            sandbox_id=env("ORCH_SANDBOX_ID") or cls.sandbox_id,
            default_sandbox=env("ORCH_DEFAULT_SANDBOX") or None,
            depth=_env_int("ORCH_DEPTH", cls.depth),
            docker_host=env("DOCKER_HOST") or None,
            desktop_image=env("ORCH_DESKTOP_IMAGE") or cls.desktop_image,
            pool_size=_env_int("ORCH_POOL_SIZE", cls.pool_size),
            health_interval_s=_env_float("ORCH_HEALTH_INTERVAL", cls.health_interval_s),
            registry=(env("ORCH_REGISTRY") or "").split(",")[0].strip() or None,
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
            max_cpus=_env_float("ORCH_MAX_CPUS", float(os.cpu_count() or 1)),
            max_memory_mb=_env_int("ORCH_MAX_MEMORY_MB", _memory_mb()),
            max_pids=_env_int("ORCH_MAX_PIDS", cls.max_pids),
            default_ttl_s=_env_int("ORCH_DEFAULT_TTL", cls.default_ttl_s),
            default_ttl_action=env("ORCH_DEFAULT_TTL_ACTION") or cls.default_ttl_action,
            provision_timeout_s=_env_float("ORCH_PROVISION_TIMEOUT", cls.provision_timeout_s),
            reconcile_interval_s=_env_float("ORCH_RECONCILE_INTERVAL", cls.reconcile_interval_s),
            orphan_grace_s=_env_float("ORCH_ORPHAN_GRACE", cls.orphan_grace_s),
            lock_lease_s=_env_float("ORCH_LOCK_LEASE", cls.lock_lease_s),
            fault_kill_at=env("ORCH_FAULT_KILL_AT") or None,
            tokens=_tokens_from_env(),
            poll_delay_s=_env_float("ORCH_POLL_DELAY", cls.poll_delay_s),
            max_jobs=_env_int("ORCH_MAX_JOBS", cls.max_jobs),
            sandbox_labels=parse_labels(env("ORCH_SANDBOX_LABELS") or ""),
            lost_after_s=_env_float("ORCH_SANDBOX_LOST_AFTER", cls.lost_after_s),
            drain_timeout_s=_env_float("ORCH_DRAIN_TIMEOUT", cls.drain_timeout_s),
            monitor_interval_s=_env_float("ORCH_MONITOR_INTERVAL", cls.monitor_interval_s),
            worker_metrics_port=_env_int("ORCH_WORKER_METRICS_PORT", cls.worker_metrics_port),
            firewall=(env("ORCH_FIREWALL") or "0").lower() in ("1", "true", "yes", "on"),
            desktop_deny=parse_networks(env("ORCH_DESKTOP_DENY") or ""),
        )
