"""An async client of the HTTP API, used by the CLI and the tests. Responses are decoded into
the msgspec structs the server sends (orchestrator/schemas.py)."""

from __future__ import annotations

import builtins
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import anyio
import httpx
import msgspec

from . import client_files
from .exec_types import ExecRecord, ExecResult
from .schemas import SandboxInfo, SandboxList, SandboxRetired, SessionList, SessionRecord
from .screen_types import InputDone

T = TypeVar("T")


class SessionFailed(Exception):
    def __init__(self, session_id: str, code: str, message: str) -> None:
        super().__init__(f"session {session_id} failed: {code}: {message}")
        self.session_id = session_id
        self.code = code
        self.message = message


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ScreenImage:
    """A screenshot: its bytes, and the sizes to aim on it (``scale`` goes back with a click)."""

    data: bytes
    format: str
    screen_width: int
    screen_height: int
    image_width: int
    image_height: int
    scale: float


@dataclass(frozen=True)
class ServerEvent:
    id: str
    type: str
    data: dict[str, Any]


class SseParser:
    """Incremental text/event-stream parser (the parts of the spec the API uses)."""

    def __init__(self) -> None:
        self._id: str | None = None
        self._type = "message"
        self._data: list[str] = []
        self.last_id: str | None = None

    def feed(self, line: str) -> ServerEvent | None:
        if line == "":
            if not self._data:
                self._type = "message"
                return None
            event = ServerEvent(self._id or "", self._type, json.loads("\n".join(self._data)))
            self.last_id = self._id or self.last_id
            self._type, self._data = "message", []
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id":
            self._id = value
        elif field == "event":
            self._type = value
        elif field == "data":
            self._data.append(value)
        return None


class Client:
    def __init__(
        self, base_url: str, *, timeout: float = 30.0, token: str | None = None, max_connections: int = 100
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._base_url = base_url.rstrip("/")
        self._headers = headers
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=20)
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=headers, limits=limits)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, type: builtins.type[T], method: str, path: str, **kwargs: Any) -> T:
        """The response decoded into ``type``, the struct the server sends; ApiError for a refusal."""
        response = _checked(await self._http.request(method, path, **kwargs))
        return msgspec.json.decode(response.content, type=type)

    async def create(
        self,
        session_id: str | None = None,
        labels: dict[str, str] | None = None,
        sandbox: str | None = None,
        **options: Any,
    ) -> SessionRecord:
        """``options``: the other fields of ``POST /v1/sessions`` (resources, env, ttl_seconds,
        ttl_action, preload_images), sent as given; the server validates them."""
        body: dict[str, Any] = {"labels": labels or {}, **options}
        if session_id:
            body["id"] = session_id
        if sandbox:
            body["sandbox"] = sandbox
        return await self._call(SessionRecord, "POST", "/v1/sessions", json=body)

    async def get(self, session_id: str) -> SessionRecord:
        return await self._call(SessionRecord, "GET", f"/v1/sessions/{session_id}")

    async def list(self, state: str | None = None, labels: Iterable[str] = ()) -> builtins.list[SessionRecord]:
        params: builtins.list[tuple[str, str]] = [("label", item) for item in labels]
        if state:
            params.append(("state", state))
        return (await self._call(SessionList, "GET", "/v1/sessions", params=params)).sessions

    async def stop(self, session_id: str) -> SessionRecord:
        return await self._call(SessionRecord, "POST", f"/v1/sessions/{session_id}/stop")

    async def start(self, session_id: str) -> SessionRecord:
        return await self._call(SessionRecord, "POST", f"/v1/sessions/{session_id}/start")

    async def delete(self, session_id: str) -> SessionRecord:
        return await self._call(SessionRecord, "DELETE", f"/v1/sessions/{session_id}")

    @contextlib.asynccontextmanager
    async def terminal(
        self, session_id: str, *, cols: int = 80, rows: int = 24, user: str | None = None, cwd: str | None = None
    ) -> AsyncIterator[Terminal]:
        """An interactive terminal in the session's desktop (the WebSocket route): send it
        keystrokes, iterate over what it shows; ``exit_code`` once it ended. ApiError when the
        server refused it (the close code's HTTP status and the error's code)."""
        params: dict[str, str] = {"cols": str(cols), "rows": str(rows)}
        if user:
            params["user"] = user
        if cwd:
            params["cwd"] = cwd
        url = self._base_url.replace("http", "ws", 1) + f"/v1/sessions/{session_id}/terminal"
        async with (
            aiohttp.ClientSession(headers=self._headers) as http,
            http.ws_connect(url, params=params, max_msg_size=0) as ws,
        ):
            yield Terminal(ws)

    async def upload(
        self,
        session_id: str,
        path: str,
        content: bytes | AsyncIterable[bytes],
        *,
        tar: bool = False,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Write a file of the desktop (or, ``tar``, extract a tar into the directory ``path``);
        ``content`` may be an async iterable of chunks, sent as they come."""
        params = {"path": path, **({"user": user} if user else {})}
        headers = {"Content-Type": "application/x-tar" if tar else "application/octet-stream"}
        response = await self._http.put(
            f"/v1/sessions/{session_id}/files", params=params, content=content, headers=headers, timeout=None
        )
        return _checked(response).json()  # type: ignore[no-any-return]

    async def download(self, session_id: str, path: str, *, user: str | None = None) -> AsyncIterator[bytes]:
        """A file's bytes (or a directory's tar) as they come; ApiError before the first one
        when the server refused."""
        params = {"path": path, **({"user": user} if user else {})}
        async with _streamed(self._http, f"/v1/sessions/{session_id}/files", params) as r:
            async for chunk in r.aiter_raw():
                yield chunk

    async def upload_path(self, session_id: str, local: str, path: str) -> dict[str, Any]:
        """``sessions cp``'s upload: a local file to the file ``path`` (into it when it ends
        with /), or a local directory's contents into the directory ``path`` (streamed as a tar)."""
        path, content, tar = await client_files.upload_source(local, path)
        return await self.upload(session_id, path, content, tar=tar)

    async def download_to(self, session_id: str, path: str, local: str) -> int:
        """``sessions cp``'s download: a file to ``local`` (into it when it is a directory), or
        a directory's contents into the directory ``local`` (made if missing). The bytes read."""
        async with _streamed(self._http, f"/v1/sessions/{session_id}/files", {"path": path}) as r:
            tar = r.headers.get("content-type", "").startswith("application/x-tar")
            return await client_files.save(r.aiter_raw(), local, tar=tar, remote_path=path)

    async def port_url(self, session_id: str, port: int) -> dict[str, Any]:
        """A short-lived URL of the session's ``port`` for a browser or an iframe (``url``,
        ``expires_at``): it opens that session's port and nothing else."""
        response = await self._http.post(f"/v1/sessions/{session_id}/ports/{port}/url")
        body: dict[str, Any] = _checked(response).json()
        return body

    async def list_files(self, session_id: str, path: str) -> builtins.list[dict[str, Any]]:
        response = await self._http.get(f"/v1/sessions/{session_id}/files/list", params={"path": path})
        entries: builtins.list[dict[str, Any]] = _checked(response).json()["entries"]
        return entries

    # -- the screen of a graphical session ---------------------------------------------------

    async def screenshot(
        self,
        session_id: str,
        *,
        format: str = "png",
        quality: int | None = None,
        scale: float | None = None,
        max_width: int | None = None,
        max_height: int | None = None,
    ) -> ScreenImage:
        asked = {"format": format, "quality": quality, "scale": scale, "max_width": max_width, "max_height": max_height}
        params = {name: str(value) for name, value in asked.items() if value is not None}
        response = _checked(await self._http.get(f"/v1/sessions/{session_id}/screenshot", params=params))
        headers = response.headers
        return ScreenImage(
            data=response.content,
            format=response.headers.get("content-type", "").removeprefix("image/"),
            screen_width=int(headers["x-screen-width"]),
            screen_height=int(headers["x-screen-height"]),
            image_width=int(headers["x-image-width"]),
            image_height=int(headers["x-image-height"]),
            scale=float(headers["x-scale"]),
        )

    async def input(self, session_id: str, action: str, **fields: Any) -> InputDone:
        """One input action (``move``, ``click``, ``double_click``, ``drag``, ``scroll``, ``type``,
        ``key``) with its fields as ``POST .../input`` takes them, e.g. ``input(sid, "click",
        x=10, y=20, scale=0.5)``; where the pointer is after it."""
        body = {"action": action, **{name: value for name, value in fields.items() if value is not None}}
        timeout = 300.0 if action == "type" else None  # 10,000 characters take two minutes to type
        kwargs: dict[str, Any] = {"timeout": timeout} if timeout else {}
        return await self._call(InputDone, "POST", f"/v1/sessions/{session_id}/input", json=body, **kwargs)

    async def sandboxes(self) -> builtins.list[SandboxInfo]:
        return (await self._call(SandboxList, "GET", "/v1/sandboxes")).sandboxes

    async def drain(self, sandbox_id: str, *, stop_desktops: bool = False) -> SandboxInfo:
        params = {"stop_desktops": "true"} if stop_desktops else {}
        return await self._call(SandboxInfo, "POST", f"/v1/sandboxes/{sandbox_id}/drain", params=params)

    async def undrain(self, sandbox_id: str) -> SandboxInfo:
        return await self._call(SandboxInfo, "DELETE", f"/v1/sandboxes/{sandbox_id}/drain")

    async def retire(self, sandbox_id: str) -> SandboxRetired:
        return await self._call(SandboxRetired, "POST", f"/v1/sandboxes/{sandbox_id}/retire")

    # -- execs ------------------------------------------------------------------------------

    async def exec(
        self, session_id: str, cmd: builtins.list[str] | None = None, *, shell: str | None = None, **options: Any
    ) -> ExecResult:
        """Run a command and wait for its end (``wait: true``). ``options``: env, cwd, user,
        stdin, stdin_base64, timeout_s, max_output_bytes, as the API takes them."""
        body = _exec_body(cmd, shell, options) | {"wait": True}
        timeout = httpx.Timeout(30.0, read=float(options.get("timeout_s", 60.0)) + 60.0)
        return await self._call(ExecResult, "POST", f"/v1/sessions/{session_id}/exec", json=body, timeout=timeout)

    async def exec_start(
        self, session_id: str, cmd: builtins.list[str] | None = None, *, shell: str | None = None, **options: Any
    ) -> ExecRecord:
        """Start a command (202); follow it with ``exec_stream`` or ``exec_status``."""
        body = _exec_body(cmd, shell, options)
        return await self._call(ExecRecord, "POST", f"/v1/sessions/{session_id}/exec", json=body)

    async def exec_status(self, session_id: str, exec_id: str) -> ExecRecord:
        return await self._call(ExecRecord, "GET", f"/v1/sessions/{session_id}/execs/{exec_id}")

    async def exec_kill(self, session_id: str, exec_id: str) -> ExecRecord:
        return await self._call(ExecRecord, "POST", f"/v1/sessions/{session_id}/execs/{exec_id}/kill")

    def exec_stream(self, session_id: str, exec_id: str, after: str | None = None) -> AsyncIterator[ServerEvent]:
        """The exec's output events (``stdout`` / ``stderr`` / ``exit``), resuming after a
        dropped connection from the last id seen; ends after ``exit``."""
        path = f"/v1/sessions/{session_id}/execs/{exec_id}/output"
        return _resuming(self._http, path, after, {}, follow=True, until="exit")

    async def metrics(self) -> str:
        response = await self._http.get("/metrics")
        response.raise_for_status()
        return response.text

    def events(
        self, session_id: str | None = None, after: str | None = None, follow: bool = True
    ) -> AsyncIterator[ServerEvent]:
        """Events as they come; resumes after a dropped connection from the last id seen."""
        path = f"/v1/sessions/{session_id}/events" if session_id else "/v1/events"
        return _resuming(self._http, path, after, {} if follow else {"follow": "false"}, follow=follow)

    async def wait_ready(self, session_id: str, *, timeout: float = 180.0) -> SessionRecord:
        """Wait until the session is ready; returns its record. Raises SessionFailed or TimeoutError."""
        events = await self.wait_for(session_id, {"session.ready", "session.failed"}, timeout=timeout)
        last = events[-1]
        if last.type == "session.failed":
            data = last.data.get("data", {})
            raise SessionFailed(session_id, data.get("code", ""), data.get("message", ""))
        return await self.get(session_id)

    async def wait_for(
        self, session_id: str, types: set[str], *, timeout: float, after: str | None = None
    ) -> builtins.list[ServerEvent]:
        """Follow a session's events until one of ``types`` arrives; returns all seen, in order.
        Raises TimeoutError naming what was awaited and what was seen."""
        seen: builtins.list[ServerEvent] = []
        try:
            with anyio.fail_after(timeout):
                async for event in self.events(session_id, after=after):
                    seen.append(event)
                    if event.type in types:
                        return seen
        except TimeoutError:
            # A failure says why (its code and message): what a CI log needs to be read.
            got = ", ".join(_described(e) for e in seen) or "nothing"
            raise TimeoutError(
                f"no {' or '.join(sorted(types))} for {session_id} within {timeout:g} s (saw: {got})"
            ) from None
        raise RuntimeError("event stream ended")


class Terminal:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self.exit_code: int | None = None

    async def send(self, data: bytes) -> None:
        await self._ws.send_bytes(data)

    async def resize(self, cols: int, rows: int) -> None:
        await self._ws.send_str(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """What the terminal shows, until it ends; ApiError when the server refused or closed it."""
        error: dict[str, Any] | None = None
        async for message in self._ws:
            if message.type is aiohttp.WSMsgType.BINARY:
                yield message.data
            elif message.type is aiohttp.WSMsgType.TEXT:
                body = json.loads(message.data)
                if body.get("type") == "exit":
                    self.exit_code = body.get("exit_code")
                elif body.get("type") == "error":
                    error = body
        code = self._ws.close_code or 1006
        if error is not None or code >= 4000:
            body = error or {}
            raise ApiError(code - 4000 if code >= 4000 else 502, body.get("code", "closed"), body.get("message", ""))


async def _resuming(
    http: httpx.AsyncClient,
    path: str,
    after: str | None,
    params: dict[str, str],
    *,
    follow: bool,
    until: str | None = None,
) -> AsyncGenerator[ServerEvent]:
    """A stream's events, through one connection after another when ``follow`` (each resumes
    after the last id seen); ends after an event of type ``until``, or with the connection
    when not following."""
    last_id = after
    while True:
        try:
            async with contextlib.aclosing(_sse(http, path, last_id, params)) as feed:
                async for event in feed:
                    last_id = event.id
                    yield event
                    if event.type == until:
                        return
            if not follow:
                return
        except (httpx.TransportError, httpx.RemoteProtocolError):
            if not follow:
                raise
            await anyio.sleep(0.5)  # the API restarts: reconnect and resume after last_id


async def _sse(
    http: httpx.AsyncClient, path: str, last_id: str | None, params: dict[str, str]
) -> AsyncGenerator[ServerEvent]:
    """One connection's events; ApiError for a refusal."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    async with http.stream(
        "GET", path, headers=headers, params=params, timeout=httpx.Timeout(30.0, read=None)
    ) as response:
        if response.status_code >= 400:
            await response.aread()
            body = response.json()
            raise ApiError(response.status_code, body.get("code", ""), body.get("message", ""))
        parser = SseParser()
        async for line in response.aiter_lines():
            event = parser.feed(line)
            if event is not None:
                yield event


@contextlib.asynccontextmanager
async def _streamed(http: httpx.AsyncClient, path: str, params: dict[str, str]) -> AsyncIterator[httpx.Response]:
    """A GET whose body is read as it comes; ApiError (the body read first) for a refusal."""
    async with http.stream("GET", path, params=params, timeout=None) as response:
        if response.status_code >= 400:
            await response.aread()
            _checked(response)
        yield response


def _checked(response: httpx.Response) -> httpx.Response:
    """The response, unless it is a refusal: then ApiError with the error's code and message
    (or, for a body that is not the API's error, the start of its text)."""
    if response.status_code >= 400:
        try:
            body = response.json()
            code, message = body.get("code", "error"), body.get("message", "")
        except (ValueError, AttributeError):
            raise ApiError(response.status_code, "error", response.text[:200]) from None
        raise ApiError(response.status_code, code, message)
    return response


def _exec_body(cmd: builtins.list[str] | None, shell: str | None, options: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = dict(options)
    if cmd is not None:
        body["cmd"] = cmd
    if shell is not None:
        body["shell"] = shell
    return body


def _described(event: ServerEvent) -> str:
    if event.type != "session.failed":
        return event.type
    data = event.data.get("data")
    if not isinstance(data, dict):
        return event.type
    return f"{event.type} ({data.get('code')}: {data.get('message')})"
