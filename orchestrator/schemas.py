"""Wire types (msgspec): request bodies, records, job payloads, events, errors.

Every external input is decoded into one of these at the edge. Request bodies (``Strict``:
SessionCreate, its Resources, LifecycleJob) refuse unknown fields. What is read back from Redis
or from the server (``Stored``: records, heartbeats, events, drain requests, responses) ignores
them: during a rolling upgrade a newer process's extra field must not break an older one.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec

from .names import DEFAULT_TENANT
from .states import SandboxStatus, SessionState

# Every pattern ends in (?!\n)$: '$' alone also matches before a trailing newline.
SessionId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]{2,62}(?!\n)$", max_length=63)]
LabelKey = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}(?!\n)$")]
LabelValue = Annotated[str, msgspec.Meta(max_length=256)]
Labels = Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=64)]


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A request body: a field this version does not know is a client's mistake."""


class Stored(msgspec.Struct, kw_only=True):
    """Written by some version of this project, read by this one: unknown fields are ignored."""


EnvKey = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}(?!\n)$")]
EnvValue = Annotated[str, msgspec.Meta(max_length=8192, pattern=r"^[^\x00]*$")]
Env = Annotated[dict[EnvKey, EnvValue], msgspec.Meta(max_length=128)]
TtlAction = Literal["stop", "delete"]
# Who asked a sandbox to drain: an operator through the API, or its worker's SIGTERM.
DrainBy = Literal["api", "signal"]
# Why a session failed, when the code alone does not say: its sandbox went silent.
ErrorCause = Literal["sandbox_unavailable"]
# An image reference in Docker's grammar (distribution/reference): [domain[:port]/]path
# components of [a-z0-9]+ joined by '.', '_', '__' or dashes, then [:tag][@digest]. So no
# '..', no empty or dot-led component (nothing a URL path would resolve: L1) and no leading
# '-' (no flag injection). The lookahead refuses a newline, which '$' lets through at the end.
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REF_RE = (
    rf"^(?!.*\n)(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?/)?{_PATH_PART}(?:/{_PATH_PART})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@[a-z0-9]+(?:[+._-][a-z0-9]+)*:[0-9a-fA-F]{32,})?$"
)
ImageRef = Annotated[str, msgspec.Meta(pattern=IMAGE_REF_RE, max_length=255)]


class Resources(Strict, omit_defaults=True):
    """Limits applied to the desktop; each must fit the sandbox's maximum."""

    cpus: Annotated[float, msgspec.Meta(gt=0, le=1024)] | None = None
    # The desktop runs a dockerd: less than 128 MiB is not a working desktop.
    memory_mb: Annotated[int, msgspec.Meta(ge=128, le=4 * 1024 * 1024)] | None = None
    pids: Annotated[int, msgspec.Meta(ge=64, le=4 * 1024 * 1024)] | None = None


class StoredResources(Resources, forbid_unknown_fields=False):
    """Resources as a record keeps them (lenient: see ``Stored``)."""


# Which desktop image a session gets: the minimal one (dockerd only, the default) or the
# graphical one (a screen, a window manager, a terminal, an editor and a browser; docs/graphical.md).
Flavor = Literal["minimal", "graphical"]
DEFAULT_DISPLAY_WIDTH, DEFAULT_DISPLAY_HEIGHT = 1280, 800


class DisplaySize(Strict, omit_defaults=True):
    """The screen of a graphical desktop, in pixels (desktop_image/start-display.sh's bounds)."""

    width: Annotated[int, msgspec.Meta(ge=320, le=7680)] = DEFAULT_DISPLAY_WIDTH
    height: Annotated[int, msgspec.Meta(ge=200, le=4320)] = DEFAULT_DISPLAY_HEIGHT


class StoredDisplaySize(DisplaySize, forbid_unknown_fields=False):
    """A display size as a record keeps it (lenient: see ``Stored``)."""


class SessionCreate(Strict):
    """Body of ``POST /v1/sessions``."""

    id: SessionId | None = None
    labels: Labels = {}
    # Pin the session to a sandbox; by default the API places it.
    sandbox: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,62}(?!\n)$")] | None = None
    resources: Resources = msgspec.field(default_factory=Resources)
    # Environment of the desktop: stored apart from the record, never echoed in events, logs or lists.
    env: Env = {}
    # Stop (or delete) the session this long after it was (re)started; default from configuration.
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1, le=365 * 86400)] | None = None
    ttl_action: TtlAction | None = None
    # Images copied from the sandbox's daemon into the desktop's before it is ready.
    preload_images: Annotated[list[ImageRef], msgspec.Meta(max_length=16)] = []
    # Labels the chosen sandbox must carry (its ORCH_SANDBOX_LABELS), e.g. {"gpu": "true"}.
    constraints: Labels = {}
    # The desktop's image: "graphical" adds a screen (docs/graphical.md) of ``display``'s size.
    flavor: Flavor = "minimal"
    display: DisplaySize | None = None

    def __post_init__(self) -> None:
        if self.display is not None and self.flavor != "graphical":
            raise ValueError("display is for graphical desktops: set flavor to graphical")


class SessionSpec(Stored):
    labels: Labels = {}
    resources: StoredResources = msgspec.field(default_factory=StoredResources)
    env_keys: list[str] = []
    ttl_seconds: int | None = None
    ttl_action: TtlAction = "stop"
    preload_images: list[str] = []
    constraints: dict[str, str] = {}
    # A record written before flavors decodes as minimal, which every desktop then was.
    flavor: Flavor = "minimal"
    # Graphical sessions only: the screen's size (always set for them by new_record).
    display: StoredDisplaySize | None = None


class SessionError(Stored, omit_defaults=True):
    code: str
    message: str
    # desktop_lost: "sandbox_unavailable" when the API declared it because the sandbox went
    # silent; the sandbox's reconciler recovers such a session if its desktop is still there.
    cause: ErrorCause | None = None


class SessionRecord(Stored):
    id: str
    state: SessionState
    generation: int
    sandbox: str
    spec: SessionSpec
    created_at: str
    updated_at: str
    # Bumped on every stored change; the compare-and-set token.
    revision: int = 0
    error: SessionError | None = None
    # When the TTL runs out (Unix seconds), counted from the last create or start.
    expires_at: float | None = None
    # Whose session it is: the tenant of the token that created it (auth.py). A record written
    # before tenancy decodes as the default tenant's, which every session then was.
    tenant: str = DEFAULT_TENANT
    # The request id of the command (docs/jobs.md, the command stream) that last moved it; null
    # when an HTTP request (or the system) did. The events of the jobs it enqueued carry it.
    request_id: str | None = None


class SessionList(Stored):
    sessions: list[SessionRecord]


class ErrorBody(Stored):
    code: str
    message: str
    field: str | None = None


class LifecycleJob(Strict, omit_defaults=True):
    """Keyword arguments of every lifecycle job (arq, JSON). Non-Python producers send these."""

    session: SessionId
    generation: Annotated[int, msgspec.Meta(ge=1)]
    # create_session only: a producer that enqueues directly (not through the API) sends the
    # request here; the worker then stores the session record itself.
    spec: SessionCreate | None = None
    # The trace id of the request that caused the job: its events and log lines carry it.
    trace: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}(?!\n)$")] | None = None


class Event(Stored):
    """The envelope of everything on the event streams; the stream entry id is the event id."""

    type: str
    ts: str
    sandbox: str
    session: str | None = None
    generation: int | None = None
    data: dict[str, Any] = {}
    # The operation's trace id (the API request's, carried by the job); null when none caused it.
    trace: str | None = None
    # The session's tenant (null for sandbox events, and for a session whose record was gone when
    # the event was published): what a tenant's token is shown. Keep it the last field: the
    # event bus fills it in inside Redis by replacing the encoding's trailing ',"tenant":null}'.
    tenant: str | None = None


class SessionChanged(Stored, omit_defaults=True):
    """``data`` of ``session.<state>``: where it came from; for ``session.failed``, why."""

    from_: str | None = msgspec.field(default=None, name="from")
    code: str | None = None
    message: str | None = None
    volume_removed: bool | None = None
    # session.ready: where the bring-up's time went (ms: queue, prepare, volume, create, start,
    # dockerd, preload, total); or warm=true when a pooled desktop was claimed (no bring-up).
    phases_ms: dict[str, int] | None = None
    warm: bool | None = None
    # session.ready from failed: its sandbox came back with the desktop still answering.
    recovered: bool | None = None
    # session.deleting/deleted by POST /v1/sandboxes/{id}/retire (volume_removed: false).
    reason: Literal["sandbox_retired"] | None = None
    # Every event that follows from a command (docs/jobs.md) carries its request id here.
    request_id: str | None = None


class VolumeCreated(Stored):
    name: str


class DesktopStarted(Stored):
    container: str
    id: str
    privilege: str
    # The profile lets root in the desktop be root of the sandbox's user namespace (caps,
    # privileged: named by the operator), which is the machine's unless ``confined``.
    unsafe: bool = False
    confined: bool = False


class ImagesLoaded(Stored):
    images: list[str]
    bytes: int
    seconds: float


class DockerdReady(Stored):
    duration_ms: int
    storage_driver: str
    backing_filesystem: str
    server_version: str
    depth: int
    address_pool: str


class DisplayReady(Stored):
    """``display.ready``: a graphical desktop's screen answers (desktop_image/start-display.sh's
    marker, read by the worker). ``duration_ms`` from the desktop's start, as dockerd.ready's;
    ``since_init_ms`` and ``start_ms`` as the desktop counted them (from desktop-init's start,
    from Xvnc's); ``restarts``: how often the display server was restarted before."""

    duration_ms: int
    width: int
    height: int
    depth: int
    display: str = ":0"
    since_init_ms: int | None = None
    start_ms: int | None = None
    restarts: int = 0


class DisplayRestarted(Stored):
    """``display.restarted``: a ready graphical desktop's display server died and start-display
    brought it back (the marker's ``restarts`` grew since the worker last looked). Its windows
    were restarted with it: an agent's open applications are gone."""

    restarts: int
    width: int
    height: int
    start_ms: int | None = None


class SandboxInfo(Stored):
    id: str
    depth: int
    version: str
    hostname: str
    sessions: int
    capacity: int
    load: float
    free_disk_bytes: int
    privilege: str
    ts: str
    # As on desktop.started: an unsafe profile (caps, privileged), and whether the sandbox's
    # own user namespace (not the machine's) confines it.
    privilege_unsafe: bool = False
    privilege_confined: bool = False
    max_cpus: float = 0.0
    max_memory_mb: int = 0
    max_pids: int = 0
    # The sandbox's own dockerd's networks; its desktops take the next depth's.
    address_pool: str = ""
    # Warm pool: desktops it keeps ready (target) and how many are ready and unclaimed now.
    pool_target: int = 0
    pool_ready: int = 0
    # available | draining | drained, as the worker says; a reader reports "unavailable" when
    # the heartbeat is older than the sandbox's lost_after_s (orchestrator/sandboxes.py).
    status: SandboxStatus = SandboxStatus.AVAILABLE
    # Matched by a session's constraints (e.g. gpu=true); from ORCH_SANDBOX_LABELS.
    labels: dict[str, str] = {}
    # The sandbox's whole machine share, for operators (max_* are per desktop).
    cpus: float = 0.0
    memory_mb: int = 0
    sessions_by_state: dict[str, int] = {}
    # Sessions placed here and not yet deleted (what the cap counts), as the reader found it.
    placed: int = 0
    lost_after_s: float = 0.0
    # Placement skips the sandbox while ``free_disk_bytes`` (its dockerd's data root) is below
    # this (its ORCH_SANDBOX_MIN_FREE_DISK_MB); 0: no watermark (and what an older worker says).
    min_free_disk_bytes: int = 0
    # host:port of the worker's direct access road ("" : none; accesses go through Redis).
    access_address: str = ""


class DrainRequest(Stored):
    """The value of a sandbox's drain key: who asked (api | signal) and whether its ready
    desktops are stopped too."""

    by: DrainBy = "api"
    stop_desktops: bool = False


class SandboxList(Stored):
    sandboxes: list[SandboxInfo]


class SandboxRetired(Strict):
    """What ``POST /v1/sandboxes/{id}/retire`` did: the sessions it ended (each now deleted,
    its volume left on the dead sandbox)."""

    id: str
    sessions: list[str]


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_data(obj: msgspec.Struct) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(obj)
    return data
