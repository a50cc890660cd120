"""File routes: write, read and list files in a ready session's desktop, streamed both ways.

``PUT /v1/sessions/{id}/files?path=/abs`` writes the body to the file (its directory must
exist), or with ``Content-Type: application/x-tar`` extracts it into the directory; ``GET`` the
same path answers the file (``application/octet-stream``, with its length) or a tar of the
directory; ``GET .../files/list?path=`` lists a directory. Scope ``sessions:exec``.

Nothing is buffered whole: the body goes to the desktop chunk by chunk over the access route
(orchestrator/access.py), with its flow control, and the worker writes it through desktop-enter
as the desktop's user. The worker says what it found before the first byte, so a missing file
is a 404, not a broken stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, put
from litestar.datastructures import State
from litestar.params import FromPath, QueryParameter
from litestar.response import Stream

from .access import AccessRouter, ready_record, ticket_for, worker_error
from .access_channel import Channel, ChannelClosed, FrameKind, decode_control
from .access_types import AccessKind
from .config import ApiSettings
from .desktop_io import FileEntry
from .desktop_paths import check_desktop_path
from .errors import ServiceError
from .guards import EXEC, caller

TAR = "application/x-tar"
PathQuery = Annotated[str, QueryParameter(description="an absolute path in the desktop")]
UserQuery = Annotated[str | None, QueryParameter(description="the desktop user it is done as (default: root)")]


class FileWritten(msgspec.Struct, kw_only=True):
    path: str
    bytes: int
    tar: bool


class FileListing(msgspec.Struct, kw_only=True):
    path: str
    entries: list[FileEntry]


async def _open(
    state: State, request: Request[Any, Any, Any], session_id: str, kind: AccessKind, path: str, **extra: Any
) -> tuple[Channel, str, Any]:
    token = caller(request)
    path = check_desktop_path(path)
    user = extra.pop("user", None)
    if user is not None and not (0 < len(user) <= 64 and user.isprintable() and ":" not in user):
        raise ServiceError(400, "invalid_request", f"user {user!r} is not a user name", "user")
    record = await ready_record(state.sessions, session_id, token.visible_tenant, "files")
    ticket = ticket_for(record, kind, by=token.name, path=path, user=user, **extra)
    router: AccessRouter = state.access
    channel, first = await router.open(ticket)
    return channel, path, first


async def _final(channel: Channel) -> Any:
    """The worker's last word on a write: ``done`` (with its size) or an error."""
    try:
        while True:
            kind, payload = await channel.receive()
            if kind is FrameKind.CONTROL:
                control = decode_control(payload)
                if control.type == "error":
                    raise worker_error(control)
                if control.type == "done":
                    return control
            elif kind is FrameKind.CLOSE:
                raise ServiceError(502, "access_failed", "the worker closed the write before it ended")
    except ChannelClosed as e:
        raise ServiceError(502, "access_failed", f"the write's route broke: {e}") from e


@put(
    "/v1/sessions/{session_id:str}/files",
    summary="Write a file (or extract a tar) in the session's desktop",
    guards=EXEC,
    status_code=201,
    request_max_body_size=None,  # streamed, and capped by ORCH_FILES_MAX_BYTES as it comes
)
async def put_file(
    session_id: FromPath[str],
    request: Request[Any, Any, Any],
    state: State,
    path: PathQuery,
    user: UserQuery = None,
) -> Response[FileWritten]:
    """The body is the file's content, written to a temporary name beside it, then renamed;
    with ``Content-Type: application/x-tar`` it is extracted into the directory ``path`` (made
    if missing). 404 ``file_not_found`` when the file's directory does not exist."""
    settings: ApiSettings = state.settings
    limit = settings.files_max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServiceError(
            413, "body_too_large", f"the file has {declared} bytes; at most {limit} (ORCH_FILES_MAX_BYTES)"
        )
    tar = (request.headers.get("content-type") or "").split(";")[0].strip().lower() == TAR
    channel, path, _ = await _open(state, request, session_id, AccessKind.FILE_WRITE, path, user=user, tar=tar)
    try:
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise ServiceError(413, "body_too_large", f"the file is over {limit} bytes (ORCH_FILES_MAX_BYTES)")
                if chunk:
                    await channel.send(chunk)
            await channel.send_eof()
        except ChannelClosed:
            pass  # the worker stopped taking bytes: its final word says why
        done = await _final(channel)
    finally:
        await channel.aclose()
    return Response(FileWritten(path=path, bytes=done.size or 0, tar=tar), status_code=201)


@get("/v1/sessions/{session_id:str}/files", summary="Read a file (or a directory, as a tar)", guards=EXEC)
async def get_file(
    session_id: FromPath[str], request: Request[Any, Any, Any], state: State, path: PathQuery, user: UserQuery = None
) -> Stream:
    """A file's bytes (``Content-Length`` set), or a directory as ``application/x-tar``."""
    channel, path, meta = await _open(state, request, session_id, AccessKind.FILE_READ, path, user=user)
    name = path.rstrip("/").rsplit("/", 1)[-1] or "root"
    headers = {
        "Content-Disposition": f'attachment; filename="{_quoted(name)}{".tar" if meta.kind == "directory" else ""}"'
    }
    if meta.kind != "directory" and meta.size is not None:
        headers["Content-Length"] = str(meta.size)
    return Stream(
        _content(channel),
        media_type=TAR if meta.kind == "directory" else "application/octet-stream",
        headers=headers,
    )


async def _content(channel: Channel) -> AsyncIterator[bytes]:
    try:
        while True:
            kind, payload = await channel.receive()
            if kind is FrameKind.DATA:
                yield payload
            elif kind in (FrameKind.EOF, FrameKind.CLOSE):
                return
            elif kind is FrameKind.CONTROL:
                control = decode_control(payload)
                if control.type == "error":
                    # Past the headers: all that is left is to cut the response short.
                    raise ChannelClosed(f"the read failed: {control.code}: {control.message}")
    finally:
        await channel.aclose()


@get("/v1/sessions/{session_id:str}/files/list", summary="List a directory of the session's desktop", guards=EXEC)
async def list_files(
    session_id: FromPath[str], request: Request[Any, Any, Any], state: State, path: PathQuery, user: UserQuery = None
) -> FileListing:
    """Its entries by name (at most 10,000), as ``lstat`` sees them: a symlink is itself."""
    channel, path, _ = await _open(state, request, session_id, AccessKind.FILE_LIST, path, user=user)
    raw = bytearray()
    try:
        async for chunk in _content(channel):
            raw += chunk
    except ChannelClosed as e:
        raise ServiceError(502, "access_failed", str(e)) from e
    return FileListing(path=path, entries=msgspec.json.decode(raw, type=list[FileEntry]))


def _quoted(name: str) -> str:
    return "".join(c if c.isprintable() and c not in '"\\' else "_" for c in name)


ROUTES = [put_file, get_file, list_files]
