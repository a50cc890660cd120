"""Commands run in a desktop (``POST /v1/sessions/{id}/exec``): the request, the record, the
output chunks and the job a worker runs, as wire types; and the request's checks, which need
the operator's limits and so cannot all be static.

An exec is at most once: a worker marks it running before it starts the process, and an
exec whose worker died is never run again (it ends ``failed`` with ``worker_lost``)."""

from __future__ import annotations

import base64
import binascii
import enum
import re
import secrets
from typing import Annotated

import msgspec

from .errors import ServiceError
from .schemas import Env, SessionId, Stored, Strict


class ExecState(enum.StrEnum):
    QUEUED = "queued"  # on the sandbox's exec stream, no worker has it yet
    RUNNING = "running"  # a worker holds it (and its lease)
    EXITED = "exited"  # the process ended: exit_code (timed_out / killed say why it ended early)
    FAILED = "failed"  # it did not run to its end for another reason: error.code says which

    @property
    def final(self) -> bool:
        return self in (ExecState.EXITED, ExecState.FAILED)


class OutputStream(enum.StrEnum):
    STDOUT = "stdout"
    STDERR = "stderr"


class ExecFailure(enum.StrEnum):
    """Why an exec failed (its ``error.code``)."""

    WORKER_LOST = "worker_lost"  # its worker stopped holding it (died, or lost Redis) mid-run
    NOT_STARTED = "not_started"  # no worker of the sandbox took it within its timeout
    SESSION_NOT_READY = "session_not_ready"  # the desktop was not running when its turn came
    KILLED_BEFORE_START = "killed_before_start"
    EXEC_FAILED = "exec_failed"  # Docker refused to start it (the reason is in the message)


# An argument is anything but NUL (the kernel's limit); the shell form is one such string.
Arg = Annotated[str, msgspec.Meta(max_length=131_072, pattern=r"^[^\x00]*$")]
AbsPath = Annotated[str, msgspec.Meta(max_length=4096, pattern=r"^/[^\x00]*$")]
# A user name of the desktop (Debian's NAME_REGEX, a little wider) or a numeric uid.
User = Annotated[str, msgspec.Meta(pattern=r"^(?:[a-z_][a-z0-9_.-]{0,31}|[0-9]{1,10})(?!\n)$")]
ExecId = Annotated[str, msgspec.Meta(pattern=r"^x[0-9a-f]{20}(?!\n)$")]
MAX_ARGS = 4096


def new_exec_id() -> str:
    return "x" + secrets.token_hex(10)


def check_exec_id(exec_id: str) -> None:
    if not re.fullmatch(r"x[0-9a-f]{20}", exec_id):
        raise ServiceError(404, "exec_not_found", f"exec {exec_id[:40]!r} does not exist", "exec_id")


class ExecRequest(Strict):
    """What to run: ``cmd`` (an argv, run as is) or ``shell`` (a script for /bin/sh -c)."""

    cmd: Annotated[list[Arg], msgspec.Meta(min_length=1, max_length=MAX_ARGS)] | None = None
    shell: Arg | None = None
    env: Env = msgspec.field(default_factory=dict)
    cwd: AbsPath | None = None
    user: User | None = None
    stdin: Annotated[str, msgspec.Meta(pattern=r"^[^\x00]*$")] | None = None
    stdin_base64: str | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    max_output_bytes: Annotated[int, msgspec.Meta(ge=0)] = 1_048_576
    wait: bool = False


class ExecLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_timeout_s: float
    max_output_bytes: int
    max_stdin_bytes: int


def exec_argv(request: ExecRequest) -> list[str]:
    if (request.cmd is None) == (request.shell is None):
        raise ServiceError(400, "invalid_request", "give exactly one of cmd (an argv) and shell (a script)", "cmd")
    return list(request.cmd) if request.cmd is not None else ["/bin/sh", "-c", request.shell or ""]


def exec_stdin(request: ExecRequest, limits: ExecLimits) -> bytes:
    if request.stdin is not None and request.stdin_base64 is not None:
        raise ServiceError(400, "invalid_request", "give stdin (text) or stdin_base64, not both", "stdin")
    if request.stdin_base64 is not None:
        try:
            data = base64.b64decode(request.stdin_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ServiceError(400, "invalid_request", "stdin_base64 is not base64", "stdin_base64") from None
    else:
        data = (request.stdin or "").encode()
    if len(data) > limits.max_stdin_bytes:
        raise ServiceError(
            413, "stdin_too_large", f"stdin has {len(data)} bytes; at most {limits.max_stdin_bytes}", "stdin"
        )
    return data


def check_limits(request: ExecRequest, limits: ExecLimits) -> None:
    if request.timeout_s > limits.max_timeout_s:
        raise ServiceError(
            400, "invalid_request", f"timeout_s {request.timeout_s} is above the limit {limits.max_timeout_s}",
            "timeout_s",
        )  # fmt: skip
    if request.max_output_bytes > limits.max_output_bytes:
        raise ServiceError(
            400,
            "invalid_request",
            f"max_output_bytes {request.max_output_bytes} is above the limit {limits.max_output_bytes}",
            "max_output_bytes",
        )


class ExecJob(Strict):
    """What the API puts on the sandbox's exec stream for its worker (never logged: env and
    stdin may hold secrets; removed from the stream once handled)."""

    id: ExecId
    session: SessionId
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    user: str | None
    stdin_base64: str
    timeout_s: float
    max_output_bytes: int


class ExecErrorInfo(Stored):
    code: str
    message: str


class ExecRecord(Stored):
    """An exec's status and outcome (never its command, env, stdin or output)."""

    id: str
    session: str
    sandbox: str
    state: ExecState
    by: str  # the token's name
    created_at: float  # epoch seconds
    timeout_s: float
    max_output_bytes: int
    tenant: str | None = None
    request_id: str | None = None  # the producer's, for an exec sent on the command stream
    started_at: float | None = None
    ended_at: float | None = None
    worker: str | None = None
    exit_code: int | None = None
    timed_out: bool = False
    killed: bool = False
    truncated: bool = False
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    duration_ms: int | None = None
    error: ExecErrorInfo | None = None


class ExecResult(Stored):
    """``wait: true``: the record with the output it kept (text, undecodable bytes replaced;
    the output stream has the exact bytes)."""

    id: str
    session: str
    state: ExecState
    exit_code: int | None
    timed_out: bool
    killed: bool
    truncated: bool
    duration_ms: int | None
    stdout: str
    stderr: str
    error: ExecErrorInfo | None = None
