"""Settings, read once from the environment (``ORCH_*``, ``REDIS_*``, ``DOCKER_HOST``).

Each setting is declared once, as a dataclass field made by :func:`setting`: its variable,
default, parser and a one-line doc. ``from_env``, :func:`to_env` and the README's table
(``python -m orchestrator.config``) are generated from those fields. The classes follow the
components: ``RedisSettings`` (the connection), ``SharedSettings`` (what the API and the worker
both read), ``ApiSettings``, ``WorkerSettings``, and ``Settings``, which has them all."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self, TypeVar, cast, overload

T = TypeVar("T")
# (variable, raw value) -> value. A ValueError's message names the variable.
Parser = Callable[[str, str], T]
# (environment, variable) -> the raw value; "" or None: the default.
Reader = Callable[[Mapping[str, str], str], str | None]


def _lookup(environ: Mapping[str, str], name: str) -> str | None:
    return environ.get(name)


@dataclass(frozen=True)
class Setting:
    """What a field's metadata holds: how the field is read from and written to the environment."""

    env: str | None  # None: not configurable (a fact about the process, like its hostname)
    doc: str
    parse: Parser[Any]
    render: Callable[[Any], str]
    read: Reader
    shown: str | None  # the default as the table shows it, for a computed default


_KEY = "orchestrator.setting"


@overload
def setting(
    env: str | None,
    default: T,
    *,
    parse: Parser[T],
    doc: str,
    render: Callable[[T], str] = str,
    read: Reader = _lookup,
    secret: bool = False,
) -> T: ...


@overload
def setting(
    env: str | None,
    *,
    factory: Callable[[], T],
    shown: str,
    parse: Parser[T],
    doc: str,
    render: Callable[[T], str] = str,
    read: Reader = _lookup,
    secret: bool = False,
) -> T: ...


def setting(
    env: str | None,
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    shown: str | None = None,
    parse: Parser[Any],
    doc: str,
    render: Callable[[Any], str] = str,
    read: Reader = _lookup,
    secret: bool = False,
) -> Any:
    """A settings field: ``env`` unset or empty gives ``default`` (or ``factory()``, called only
    then), anything else goes through ``parse``; ``render`` is its inverse, for :func:`to_env`.
    A ``secret`` is kept out of repr (and so out of tracebacks and test output)."""
    spec = Setting(env, doc, parse, render, read, shown)
    return dataclasses.field(default=default, default_factory=factory, repr=not secret, metadata={_KEY: spec})


def spec_of(field: dataclasses.Field[Any]) -> Setting:
    spec = field.metadata.get(_KEY)
    if not isinstance(spec, Setting):
        raise TypeError(f"settings field {field.name} is not declared with setting()")
    return spec


# Parsers: (variable, raw) -> value, raw never empty.


def _text(name: str, raw: str) -> str:
    return raw


def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


_TRUE = ("1", "true", "yes", "on")


def _flag(name: str, raw: str) -> bool:
    # Anything else is off, as it always was: a typo never turns the firewall on by surprise.
    return raw.lower() in _TRUE


def _port_or_off(name: str, raw: str) -> int | None:
    if raw.lower() == "off":
        return None
    port = _int(name, raw)
    if not 0 <= port <= 65535:
        raise ValueError(f"{name} must be a TCP port (0: any free one) or off, got {raw!r}")
    return port


def _render_port(value: int | None) -> str:
    return "off" if value is None else str(value)


def _access_route(name: str, raw: str) -> str:
    if raw not in ("auto", "direct", "relay"):
        raise ValueError(f"{name} must be auto, direct or relay, got {raw!r}")
    return raw


def _render_flag(value: bool) -> str:
    return "1" if value else "0"


def _first_item(name: str, raw: str) -> str | None:
    # ORCH_REGISTRY may list several (start-dockerd trusts them all); the worker pulls from the first.
    return raw.split(",")[0].strip() or None


def _credentials(name: str, raw: str) -> tuple[str, str] | None:
    user, colon, password = raw.partition(":")
    if not (user and colon and password):
        raise ValueError(f"{name} must be user:password") from None  # the value itself is a secret
    return user, password


def _render_credentials(value: tuple[str, str] | None) -> str:
    return "" if value is None else ":".join(value)


def _sentinels(name: str, raw: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` (IPv6 as ``[::1]:26379``) -> ((host, port), ...)."""
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


def _render_sentinels(value: tuple[tuple[str, int], ...]) -> str:
    return ",".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in value)


LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")


def _labels(name: str, raw: str) -> dict[str, str]:
    """``k=v,k=v`` into a dict; keys as session label keys, values free of ``,``."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not LABEL_RE.fullmatch(key):
            raise ValueError(f"{name}: {item!r} is not key=value with a valid key")
        labels[key] = value
    return labels


def _render_labels(value: dict[str, str]) -> str:
    return ",".join(f"{key}={item}" for key, item in value.items())


def _networks(name: str, raw: str) -> tuple[str, ...]:
    """``cidr,cidr`` (IPv4 or IPv6 networks), validated."""
    networks = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"{name}: {item!r} is not a network (like 10.96.0.0/12)") from None
    return tuple(networks)


def _render_list(value: tuple[str, ...]) -> str:
    return ",".join(value)


def _read_tokens(environ: Mapping[str, str], name: str) -> str:
    """ORCH_TOKENS, then the contents of the file ORCH_TOKENS_FILE names (a mounted secret)."""
    inline = environ.get(name, "")
    path = environ.get(f"{name}_FILE")
    if path:
        with open(path) as f:
            inline = f"{inline};{f.read()}"
    return inline


def _cpus() -> float:
    return float(os.cpu_count() or 1)


def _memory_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            return int(next(line.split()[1] for line in f if line.startswith("MemTotal:"))) // 1024
    except (OSError, StopIteration, ValueError):
        return 1024


@dataclass(frozen=True)
class RedisSettings:
    """The Redis connection (orchestrator/redis_conn.py) and the prefix of every key."""

    # Sentinel: REDIS_URL then only gives the master's user, password, db and TLS (docs/redis.md).
    redis_url: str = setting(
        "REDIS_URL",
        "redis://127.0.0.1:6379/0",
        parse=_text,
        secret=True,
        doc="`redis://`, `rediss://` (TLS) or `unix://`, with an ACL user and password",
    )
    redis_sentinels: tuple[tuple[str, int], ...] = setting(
        "REDIS_SENTINELS",
        (),
        parse=_sentinels,
        render=_render_sentinels,
        doc="`host:port,...` (IPv6 `[::1]:26379`): ask these sentinels for the master",
    )
    redis_sentinel_master: str = setting(
        "REDIS_SENTINEL_MASTER", "mymaster", parse=_text, doc="the master's name at the sentinels"
    )
    redis_sentinel_password: str | None = setting(
        "ORCH_REDIS_SENTINEL_PASSWORD", None, parse=_text, secret=True, doc="the sentinels' own requirepass"
    )
    redis_tls_ca: str | None = setting(
        "REDIS_TLS_CA_FILE", None, parse=_text, doc="CA file for `rediss://` (default: the system CAs)"
    )
    redis_tls_cert: str | None = setting(
        "REDIS_TLS_CERT_FILE", None, parse=_text, doc="client certificate, for servers with tls-auth-clients"
    )
    redis_tls_key: str | None = setting("REDIS_TLS_KEY_FILE", None, parse=_text, doc="the client certificate's key")
    # Every client: a half-open connection (a partition, a dead master) fails a command after
    # this instead of hanging a heartbeat or job until TCP gives up (keep-alive probes too).
    redis_socket_timeout_s: float = setting(
        "ORCH_REDIS_SOCKET_TIMEOUT",
        30.0,
        parse=_float,
        doc="seconds a Redis command may wait for its reply (more than ORCH_SSE_KEEPALIVE: the SSE reader blocks)",
    )
    redis_connect_timeout_s: float = setting(
        "ORCH_REDIS_CONNECT_TIMEOUT", 5.0, parse=_float, doc="seconds to open a Redis connection"
    )
    redis_health_check_s: int = setting(
        "ORCH_REDIS_HEALTH_CHECK_INTERVAL",
        15,
        parse=_int,
        doc="a pooled Redis connection idle this long (s) is PINGed before use; 0: never",
    )
    key_prefix: str = setting(
        "ORCH_KEY_PREFIX",
        "orchestrator:",
        parse=_text,
        doc="start of every Redis key the project writes (arq's job keys excepted: arq fixes them)",
    )

    def __post_init__(self) -> None:
        """The end of the validation chain: each subclass checks its own fields, then calls super()."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """This class's fields from ``environ`` (default: ``os.environ``); unset or empty: the default."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            spec = spec_of(field)
            if spec.env is None:
                continue
            raw = spec.read(environ, spec.env)
            if raw:  # unset or empty: the field's default (a computed one is computed only then)
                values[field.name] = spec.parse(spec.env, raw)
        return cls(**values)


@dataclass(frozen=True)
class SharedSettings(RedisSettings):
    """What the API and the worker both read."""

    # Not read from the environment (they never were): fixed stream lengths both sides must agree on.
    firehose_maxlen: int = setting(None, 100_000, parse=_int, doc="entries kept in the firehose")
    session_stream_maxlen: int = setting(None, 2_000, parse=_int, doc="entries kept in each session's event stream")
    max_sessions: int = setting(
        "ORCH_MAX_SESSIONS",
        50,
        parse=_int,
        doc="sessions a sandbox holds at most, the hard cap (API: the cap assumed with no sandbox)",
    )
    # What one desktop may ask for on this sandbox. The API checks a create against them when
    # it sends it to ORCH_DEFAULT_SANDBOX before any sandbox has reported its own.
    max_cpus: float = setting(
        "ORCH_MAX_CPUS",
        factory=_cpus,
        shown="the machine's CPUs",
        parse=_float,
        doc="most CPUs one desktop may ask for",
    )
    max_memory_mb: int = setting(
        "ORCH_MAX_MEMORY_MB",
        factory=_memory_mb,
        shown="the machine's memory",
        parse=_int,
        doc="most memory (MiB) one desktop may ask for",
    )
    max_pids: int = setting("ORCH_MAX_PIDS", 65536, parse=_int, doc="most processes one desktop may ask for")
    # The reconciler removes a record-less desktop or volume only on a tombstone (or the pool's
    # own word): it must outlive any leftover a delete can leave (a sandbox down for days).
    tombstone_ttl_s: int = setting(
        "ORCH_TOMBSTONE_TTL",
        3 * 86400,
        parse=_int,
        doc="seconds a deleted session's tombstone lasts (its leftovers are removable meanwhile)",
    )
    default_ttl_s: int = setting("ORCH_DEFAULT_TTL", 0, parse=_int, doc="TTL (s) of sessions that set none; 0: none")
    default_ttl_action: str = setting(
        "ORCH_DEFAULT_TTL_ACTION", "stop", parse=_text, doc="what a TTL's end does: `stop` or `delete`"
    )
    exec_keep_s: int = setting(
        "ORCH_EXEC_KEEP", 3600, parse=_int, doc="seconds an ended exec's record and output stay readable"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.default_ttl_action not in ("stop", "delete"):
            raise ValueError(f"ORCH_DEFAULT_TTL_ACTION must be stop or delete, got {self.default_ttl_action!r}")


@dataclass(frozen=True)
class ApiSettings(SharedSettings):
    """The HTTP API's."""

    api_host: str = setting("ORCH_API_HOST", "127.0.0.1", parse=_text, doc="address the API listens on")
    api_port: int = setting("ORCH_API_PORT", 8080, parse=_int, doc="port the API listens on")
    max_body_bytes: int = setting("ORCH_MAX_BODY_BYTES", 64 * 1024, parse=_int, doc="largest request body")
    sse_keepalive_s: float = setting(
        "ORCH_SSE_KEEPALIVE", 15.0, parse=_float, doc="seconds between SSE keep-alive comments"
    )
    # How often each API process looks for silent sandboxes.
    monitor_interval_s: float = setting(
        "ORCH_MONITOR_INTERVAL", 2.0, parse=_float, doc="seconds between looks for lost sandboxes"
    )
    # e.g. make up, whose worker is "local" and may start after the API.
    default_sandbox: str | None = setting(
        "ORCH_DEFAULT_SANDBOX",
        None,
        parse=_text,
        doc="where sessions wait while no sandbox has reported; unset: such a create gets 503",
    )
    tokens: str = setting(
        "ORCH_TOKENS",
        "",
        parse=_text,
        read=_read_tokens,
        doc="API tokens `name:sha256hex:scope+scope[:tenant=NAME];...`, plus those in the file"
        " `ORCH_TOKENS_FILE` names",
    )
    # Counted atomically with each create (the store's scripts), over all of a tenant's tokens.
    tenant_max_sessions: int = setting(
        "ORCH_TENANT_MAX_SESSIONS",
        0,
        parse=_int,
        doc="sessions (not deleted) one tenant may hold; more creates get 429 `quota_exceeded`; 0: no limit",
    )
    # Bounds at the edge (docs/operations.md): what one client, or all, can hold of the process.
    exec_max_timeout_s: float = setting(
        "ORCH_EXEC_MAX_TIMEOUT", 3600.0, parse=_float, doc="longest timeout_s an exec may ask for"
    )
    exec_max_output_bytes: int = setting(
        "ORCH_EXEC_MAX_OUTPUT_BYTES", 64 * 2**20, parse=_int, doc="most output an exec may ask to keep"
    )
    exec_max_stdin_bytes: int = setting(
        "ORCH_EXEC_MAX_STDIN_BYTES", 48 * 1024, parse=_int, doc="largest stdin of an exec (within ORCH_MAX_BODY_BYTES)"
    )
    exec_max_per_session: int = setting(
        "ORCH_EXEC_MAX_PER_SESSION", 32, parse=_int, doc="execs one session runs at once (more: 429)"
    )
    # The command stream (orchestrator/commands.py, docs/jobs.md).
    command_claim_idle_s: float = setting(
        "ORCH_COMMAND_CLAIM_IDLE",
        30.0,
        parse=_float,
        doc="seconds a command read by an API process that went silent waits before another claims it",
    )
    command_deadline_s: float = setting(
        "ORCH_COMMAND_DEADLINE",
        300.0,
        parse=_float,
        doc="seconds a command may wait in its stream; older when read: rejected `overloaded` (0: no deadline)",
    )
    access_route: str = setting(
        "ORCH_ACCESS_ROUTE",
        "auto",
        parse=_access_route,
        doc="how the API reaches a desktop for terminals, files and ports: `auto` (direct to the worker's "
        "access port when it answers, else through Redis), `direct` or `relay` (Redis only)",
    )
    files_max_bytes: int = setting(
        "ORCH_FILES_MAX_BYTES", 4 * 2**30, parse=_int, doc="largest file (or tar) one upload may write into a desktop"
    )
    terminal_max_per_session: int = setting(
        "ORCH_TERMINAL_MAX_PER_SESSION", 8, parse=_int, doc="terminals one session has open at once (more: 429)"
    )
    terminal_idle_s: float = setting(
        "ORCH_TERMINAL_IDLE",
        900.0,
        parse=_float,
        doc="seconds a terminal may pass with no byte either way before it is closed (0: never)",
    )
    # The port proxy (orchestrator/api_ports.py): its bodies stream, so their cap is its own.
    port_url_ttl_s: int = setting(
        "ORCH_PORT_URL_TTL", 300, parse=_int, doc="seconds a port URL (`POST .../ports/{port}/url`) stays valid"
    )
    port_url_base: str | None = setting(
        "ORCH_PORT_URL_BASE",
        None,
        parse=_text,
        doc="origin port URLs are given on (e.g. another hostname of this API, apart from the dashboard's);"
        " unset: the request's own",
    )
    port_max_body_bytes: int = setting(
        "ORCH_PORT_MAX_BODY_BYTES", 2**30, parse=_int, doc="largest request body the port proxy forwards (streamed)"
    )
    port_timeout_s: float = setting(
        "ORCH_PORT_TIMEOUT",
        60.0,
        parse=_float,
        doc="seconds the port proxy waits for a response's head (or a WebSocket handshake); then 504",
    )
    port_keepalive_s: float = setting(
        "ORCH_PORT_KEEPALIVE",
        30.0,
        parse=_float,
        doc="seconds an idle connection to a desktop's port is kept for the next request to it; 0: one per request",
    )
    port_ws_max_message_bytes: int = setting(
        "ORCH_PORT_WS_MAX_MESSAGE_BYTES",
        16 * 2**20,
        parse=_int,
        doc="largest WebSocket message the port proxy relays from a desktop (more: closed 1009)",
    )
    sse_max_streams: int = setting(
        "ORCH_SSE_MAX_STREAMS", 2000, parse=_int, doc="open event streams one API process serves at most"
    )
    sse_max_streams_per_token: int = setting(
        "ORCH_SSE_MAX_STREAMS_PER_TOKEN", 100, parse=_int, doc="open event streams one token may hold per API process"
    )
    max_query_bytes: int = setting(
        "ORCH_MAX_QUERY_BYTES", 4096, parse=_int, doc="longest query string of an event stream request"
    )
    max_header_bytes: int = setting(
        "ORCH_MAX_HEADER_BYTES", 16 * 1024, parse=_int, doc="longest request line plus headers (`orchestrator api`)"
    )
    max_connections: int = setting(
        "ORCH_API_MAX_CONNECTIONS",
        4096,
        parse=_int,
        doc="connections and requests `orchestrator api` serves at once; more get 503",
    )
    redis_max_connections: int = setting(
        "ORCH_REDIS_MAX_CONNECTIONS", 64, parse=_int, doc="Redis connections of one API process at most"
    )
    redis_pool_timeout_s: float = setting(
        "ORCH_REDIS_POOL_TIMEOUT",
        5.0,
        parse=_float,
        doc="seconds an API request waits for a free Redis connection, then fails",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sse_keepalive_s >= self.redis_socket_timeout_s:
            raise ValueError(
                f"ORCH_SSE_KEEPALIVE ({self.sse_keepalive_s:g} s) must be less than ORCH_REDIS_SOCKET_TIMEOUT"
                f" ({self.redis_socket_timeout_s:g} s): the SSE reader blocks in Redis that long"
            )
        if self.port_url_ttl_s < 1:
            raise ValueError(f"ORCH_PORT_URL_TTL must be at least 1 (seconds), got {self.port_url_ttl_s}")
        if self.port_url_base is not None and not re.fullmatch(r"https?://[^/?#\s]+", self.port_url_base):
            raise ValueError(
                f"ORCH_PORT_URL_BASE must be an origin like https://ports.example.com, got {self.port_url_base!r}"
            )
        if self.tenant_max_sessions < 0:
            raise ValueError(f"ORCH_TENANT_MAX_SESSIONS must be 0 (no limit) or more, got {self.tenant_max_sessions}")
        if self.sse_max_streams >= self.max_connections:
            raise ValueError(
                f"ORCH_SSE_MAX_STREAMS ({self.sse_max_streams}) must be less than ORCH_API_MAX_CONNECTIONS"
                f" ({self.max_connections}): event streams would leave no room for other requests"
            )


def operation_deadline(provision_s: float, ready_s: float, preload_s: float, stop_s: float) -> float:
    """The default deadline of one lifecycle operation: every step's own timeout, one after
    another (a stop's two removals included), and a margin for the Redis and event writes."""
    return provision_s + ready_s + preload_s + 2 * stop_s + 30


@dataclass(frozen=True)
class WorkerSettings(SharedSettings):
    """A sandbox worker's."""

    sandbox_id: str = setting("ORCH_SANDBOX_ID", "local", parse=_text, doc="this worker's sandbox")
    # Its desktops run one level deeper than the sandbox's dockerd.
    depth: int = setting("ORCH_DEPTH", 1, parse=_int, doc="nesting depth of the sandbox's dockerd")
    docker_host: str | None = setting("DOCKER_HOST", None, parse=_text, doc="the sandbox's dockerd")
    desktop_image: str = setting(
        "ORCH_DESKTOP_IMAGE", "orchestrator/desktop:dev", parse=_text, doc="image of the desktops"
    )
    # Ensured lazily, before the first graphical desktop (workers/prepare.py): a sandbox that
    # serves none never needs its 1.9 GB.
    graphical_image: str = setting(
        "ORCH_GRAPHICAL_IMAGE",
        "orchestrator/desktop-graphical:dev",
        parse=_text,
        doc="image of the graphical desktops (flavor `graphical`, docs/graphical.md)",
    )
    # start-dockerd lists it (all of a comma list) in the daemon's insecure-registries.
    registry: str | None = setting(
        "ORCH_REGISTRY",
        None,
        parse=_first_item,
        doc="this level's registry (host:port, plain HTTP): where a missing desktop image is pulled from",
    )
    # A registry with htpasswd auth (deploy/kubernetes): what the worker sends with its pulls.
    registry_credentials: tuple[str, str] | None = setting(
        "ORCH_REGISTRY_CREDENTIALS",
        None,
        parse=_credentials,
        render=_render_credentials,
        secret=True,
        doc="`user:password` for ORCH_REGISTRY, when it asks for them",
    )
    # So the worker reaches each desktop's dockerd without `docker exec`.
    socket_dir: str = setting(
        "ORCH_SOCKET_DIR",
        "/run/orchestrator/desktops",
        parse=_text,
        doc="host directory of the bind-mounted folders holding each desktop's dockerd socket",
    )
    privilege: str = setting(
        "ORCH_PRIVILEGE",
        "auto",
        parse=_text,
        doc="`auto` (userns; where it fails the worker refuses to serve, unless it runs in a user namespace "
        "of its own: then caps), `userns`, `caps` or `privileged` (unsafe: named only) or `runtime:<name>`",
    )
    ready_timeout_s: float = setting(
        "ORCH_READY_TIMEOUT", 60.0, parse=_float, doc="seconds a desktop's dockerd has to get ready"
    )
    stop_timeout_s: int = setting("ORCH_STOP_TIMEOUT", 20, parse=_int, doc="seconds a desktop has to stop")
    provision_timeout_s: float = setting(
        "ORCH_PROVISION_TIMEOUT", 60.0, parse=_float, doc="seconds to make a desktop's volume and container"
    )
    preload_timeout_s: float = setting(
        "ORCH_PRELOAD_TIMEOUT", 300.0, parse=_float, doc="seconds to copy a session's preload_images into its desktop"
    )
    # The backstop over every step's own timeout: whatever hangs, the lease is released.
    operation_timeout_s: float = setting(
        "ORCH_OPERATION_TIMEOUT",
        0.0,
        parse=_float,
        doc="seconds one create, start, stop or delete may take; 0: provision + ready + preload + 2 stop + 30",
    )
    # A stalled daemon (a SIGSTOPped dockerd in a desktop) must not hang a pull, export or import.
    docker_read_timeout_s: float = setting(
        "ORCH_DOCKER_READ_TIMEOUT",
        60.0,
        parse=_float,
        doc="seconds a streaming Docker call (pull, image export/import, inner daemon calls) may go silent",
    )
    heartbeat_interval_s: float = setting(
        "ORCH_HEARTBEAT_INTERVAL", 5.0, parse=_float, doc="seconds between the sandbox's heartbeats"
    )
    # Keep it >= 3 heartbeats (docs/operations.md).
    lost_after_s: float = setting(
        "ORCH_SANDBOX_LOST_AFTER",
        15.0,
        parse=_float,
        doc="heartbeat age (s) after which the sandbox is unavailable and its sessions desktop_lost",
    )
    health_interval_s: float = setting(
        "ORCH_HEALTH_INTERVAL", 2.0, parse=_float, doc="seconds between probes of ready desktops"
    )
    # A create may be between its steps: an object that young is not yet an orphan.
    reconcile_interval_s: float = setting(
        "ORCH_RECONCILE_INTERVAL", 10.0, parse=_float, doc="seconds between reconciler passes"
    )
    orphan_grace_s: float = setting(
        "ORCH_ORPHAN_GRACE",
        300.0,
        parse=_float,
        doc="age (s) before a deleted session's leftover object is removed",
    )
    reconcile_max_removals: int = setting(
        "ORCH_RECONCILE_MAX_REMOVALS", 20, parse=_int, doc="desktops and volumes one reconciler pass removes at most"
    )
    lock_lease_s: float = setting(
        "ORCH_LOCK_LEASE", 15.0, parse=_float, doc="seconds a dead worker's session lock lasts"
    )
    # Only without wake-ups (ORCH_POLL_FALLBACK=0): arq's default 0.5 s would dominate a
    # sub-second session start; 10 ms costs ~100 ZRANGEBYSCOREs a second per worker.
    poll_delay_s: float = setting(
        "ORCH_POLL_DELAY",
        0.01,
        parse=_float,
        doc="with ORCH_POLL_FALLBACK 0: seconds between a worker's polls for jobs (with wake-ups it polls when woken)",
    )
    # An idle worker blocks on its queue's wake-up list (BLPOP) instead of polling; this bounds
    # how late it finds a job enqueued without a wake-up (docs/jobs.md) and costs ~3 commands per
    # period when idle. Less than the socket timeout: the BLPOP holds a reply that long.
    poll_fallback_s: float = setting(
        "ORCH_POLL_FALLBACK",
        1.0,
        parse=_float,
        doc="seconds an idle worker waits for a wake-up before it polls its queue anyway; 0: no wake-ups, poll",
    )
    # Jobs mostly wait on Docker: enough to run a burst of creates at once (bench: 20).
    max_jobs: int = setting("ORCH_MAX_JOBS", 32, parse=_int, doc="jobs a worker runs at once")
    # Apart from max_jobs: execs never hold up lifecycle jobs.
    exec_max_running: int = setting(
        "ORCH_EXEC_MAX_RUNNING", 256, parse=_int, doc="execs one worker runs at once (more wait on the stream)"
    )
    pool_size: int = setting(
        "ORCH_POOL_SIZE", 0, parse=_int, doc="warm desktops kept ready for creates with the defaults"
    )
    # A pool of its own (Keys.pool), made with the default screen: a graphical create with
    # another display size is made cold. Each costs its desktop's memory while it waits.
    pool_graphical_size: int = setting(
        "ORCH_WARM_POOL_GRAPHICAL",
        0,
        parse=_int,
        doc="warm graphical desktops (default display size) kept ready for graphical creates with the defaults",
    )
    # setting() returns a dataclasses.field (default_factory=dict): nothing mutable is shared.
    sandbox_labels: dict[str, str] = setting(  # noqa: RUF009
        "ORCH_SANDBOX_LABELS",
        factory=dict,
        shown="none",
        parse=_labels,
        render=_render_labels,
        doc="`k=v,...` this sandbox carries, matched by sessions' constraints",
    )
    # The sandbox's disk, shared by all its desktops' volumes and layers: below this much free,
    # placement sends new sessions elsewhere, so those already here have room to keep working.
    min_free_disk_mb: int = setting(
        "ORCH_SANDBOX_MIN_FREE_DISK_MB",
        2048,
        parse=_int,
        doc="MiB free on the sandbox's dockerd data root below which placement skips it; 0: no watermark",
    )
    drain_timeout_s: float = setting(
        "ORCH_DRAIN_TIMEOUT", 90.0, parse=_float, doc="seconds a drain waits for jobs before the worker exits"
    )
    # On in the sandbox image; off for a worker on a host: it would edit the host's rules, for
    # every Docker bridge there (br-+, docker0), not only the desktops'.
    firewall: bool = setting(
        "ORCH_FIREWALL",
        False,
        parse=_flag,
        render=_render_flag,
        doc="`1`: desktops reach the internet only: private ranges, the sandbox's networks and IPv6 denied "
        "(on in the sandbox image; workers/firewall.py)",
    )
    desktop_deny: tuple[str, ...] = setting(
        "ORCH_DESKTOP_DENY",
        (),
        parse=_networks,
        render=_render_list,
        doc="more IPv4 networks (`cidr,...`) desktops must not reach, on top of every private range",
    )
    desktop_allow: tuple[str, ...] = setting(
        "ORCH_DESKTOP_ALLOW",
        (),
        parse=_networks,
        render=_render_list,
        doc="IPv4 networks (`cidr,...`) desktops may reach although private or denied, e.g. a package mirror",
    )
    worker_access_port: int | None = setting(
        "ORCH_WORKER_ACCESS_PORT",
        cast(int | None, 0),
        parse=_port_or_off,
        render=_render_port,
        doc="TCP port of the worker's direct access road (terminals, files, ports); 0: any free one; `off`: Redis only",
    )
    worker_access_host: str = setting(
        "ORCH_WORKER_ACCESS_HOST",
        "",
        parse=_text,
        doc="address the worker listens on and advertises for direct access (default: its host name's address)",
    )
    worker_metrics_port: int = setting(
        "ORCH_WORKER_METRICS_PORT", 0, parse=_int, doc="TCP port of the worker's /metrics; 0: not served"
    )
    fault_kill_at: str | None = setting(
        "ORCH_FAULT_KILL_AT",
        None,
        parse=_text,
        doc="test only: the worker SIGKILLs itself at this step (workers/lifecycle.py FAULT_POINTS)",
    )
    hostname: str = setting(
        None, factory=socket.gethostname, shown="", parse=_text, doc="the machine's name, in the worker's id"
    )

    @property
    def operation_deadline_s(self) -> float:
        """ORCH_OPERATION_TIMEOUT, or the sum of the steps' own timeouts when it is 0."""
        if self.operation_timeout_s > 0:
            return self.operation_timeout_s
        return operation_deadline(
            self.provision_timeout_s, self.ready_timeout_s, self.preload_timeout_s, self.stop_timeout_s
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lost_after_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"ORCH_SANDBOX_LOST_AFTER ({self.lost_after_s:g} s) must exceed ORCH_HEARTBEAT_INTERVAL"
                f" ({self.heartbeat_interval_s:g} s): a live sandbox would be declared lost between beats"
            )
        if self.min_free_disk_mb < 0:
            raise ValueError(f"ORCH_SANDBOX_MIN_FREE_DISK_MB must be 0 (off) or more, got {self.min_free_disk_mb}")
        if not 0 <= self.poll_fallback_s < self.redis_socket_timeout_s:
            raise ValueError(
                f"ORCH_POLL_FALLBACK ({self.poll_fallback_s:g} s) must be 0 (poll) or more and less than"
                f" ORCH_REDIS_SOCKET_TIMEOUT ({self.redis_socket_timeout_s:g} s): the worker blocks in Redis that long"
            )


@dataclass(frozen=True)
class Settings(ApiSettings, WorkerSettings):
    """Every setting: for the CLI, which starts either component, and for tests that run both."""


def to_env(settings: RedisSettings) -> dict[str, str]:
    """The environment whose ``from_env`` gives ``settings`` back; unset (None) is left out."""
    env: dict[str, str] = {}
    for field in dataclasses.fields(settings):
        spec = spec_of(field)
        value = getattr(settings, field.name)
        if spec.env is None or value is None:
            continue
        env[spec.env] = spec.render(value)
        if env[spec.env] == "" and value != _default(field):
            # from_env reads an empty variable as unset, so this value would come back as the default.
            raise ValueError(f"{spec.env}: {value!r} cannot be said in the environment (empty means the default)")
    return env


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _shown(field: dataclasses.Field[Any]) -> str:
    spec = spec_of(field)
    if spec.shown is not None:
        return spec.shown
    default = _default(field)
    if default is None:
        return "unset"
    rendered = spec.render(default)
    return f"`{rendered}`" if rendered else "none"


def table() -> str:
    """Every variable as a markdown table: what reads it, its default, what it does."""
    owners = [(SharedSettings, "API, worker"), (ApiSettings, "API"), (WorkerSettings, "worker")]
    rows = ["| Variable | Read by | Default | Meaning |", "| --- | --- | --- | --- |"]
    seen: set[str] = set()
    for cls, readers in owners:
        for field in dataclasses.fields(cls):
            spec = spec_of(field)
            if spec.env is None or field.name in seen:  # a subclass lists its bases' fields again
                continue
            seen.add(field.name)
            rows.append(f"| `{spec.env}` | {readers} | {_shown(field)} | {spec.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
