"""Computer-use routes: a graphical session's screen read and driven (docs/graphical.md).

``GET /v1/sessions/{id}/screenshot?format=png|jpeg&quality=&scale=&max_width=&max_height=``
answers the image's bytes, with ``X-Screen-Width``/``-Height`` (the screen), ``X-Image-Width``/
``-Height`` (the image) and ``X-Scale`` (the factor it was taken at). ``POST .../input`` takes
one action (orchestrator/screen_types.py: move, click, double_click, drag, scroll, type, key),
in screen pixels or, with ``scale`` or ``image``, in the scaled screenshot's; it answers where
the pointer is after it. Scope ``sessions:exec``, a ready graphical session of the caller's tenant.

Both travel the access route (orchestrator/access.py) as a ``screen`` ticket: the worker runs
orch-screen through desktop-enter and hands back its bytes, as a file's. Scaling is decided
here (the session's display size is on its record), so the image's size and a click's
conversion come from one rule; orch-screen only shrinks to the size it is given."""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody, QueryParameter

from .access import AccessRouter, ticket_for, worker_error
from .access_channel import Channel, ChannelClosed, FrameKind, decode_control
from .access_types import AccessKind, AccessTicket
from .errors import ServiceError
from .guards import EXEC, caller
from .schemas import DEFAULT_DISPLAY_HEIGHT, DEFAULT_DISPLAY_WIDTH, SessionRecord
from .screen_types import (
    MEDIA_TYPES,
    STATUS_OF,
    Captured,
    Format,
    InputAction,
    InputDone,
    ScreenRefused,
    Screenshot,
    Size,
    action_name,
    on_screen,
    scaled_size,
    screenshot_scale,
    to_image,
)
from .service import Sessions
from .states import SessionState

MAX_ANSWER = 160 * 1024 * 1024  # the worker's own cap on an image, and its Captured line


async def graphical_record(state: State, session_id: str, tenant: str | None) -> SessionRecord:
    """The session, graphical and ready: 404 unknown (or another tenant's), 409 ``not_graphical``
    for a minimal one (whatever its state: it never will be), 409 ``session_not_ready``."""
    sessions: Sessions = state.sessions
    record = await sessions.get(session_id, tenant)
    if record.spec.flavor != "graphical":
        raise ServiceError(
            409,
            "not_graphical",
            f"session {session_id} is a {record.spec.flavor} desktop: it has no screen (flavor graphical has)",
        )
    if record.state is not SessionState.READY or record.sandbox is None:
        raise ServiceError(
            409, "session_not_ready", f"session {session_id} is {record.state.value}; the screen needs a ready session"
        )
    return record


def screen_of(record: SessionRecord) -> Size:
    display = record.spec.display
    if display is None:  # new_record always sets it for a graphical session; the default if not
        return Size(DEFAULT_DISPLAY_WIDTH, DEFAULT_DISPLAY_HEIGHT)
    return Size(display.width, display.height)


def refused(e: ScreenRefused) -> ServiceError:
    return ServiceError(STATUS_OF.get(e.code, 422), e.code, e.message)


def remapped(e: ServiceError) -> ServiceError:
    """A worker's error: orch-screen's codes get their statuses (access.py knows the route's)."""
    if e.code in STATUS_OF:
        return ServiceError(STATUS_OF[e.code], e.code, e.message, e.field)
    return e


async def _exchange(router: AccessRouter, ticket: AccessTicket) -> bytes:
    """The worker's answer to a screen ticket: its bytes until EOF, or its error."""
    try:
        channel, _ = await router.open(ticket)
    except ServiceError as e:
        raise remapped(e) from None
    try:
        return await _answer(channel)
    finally:
        await channel.aclose()


async def _answer(channel: Channel) -> bytes:
    raw = bytearray()
    try:
        while True:
            kind, payload = await channel.receive()
            if kind is FrameKind.DATA:
                raw += payload
                if len(raw) > MAX_ANSWER:
                    raise ServiceError(502, "screen_failed", f"the worker sent over {MAX_ANSWER} bytes")
            elif kind is FrameKind.EOF:
                return bytes(raw)
            elif kind is FrameKind.CLOSE:
                raise ServiceError(502, "access_failed", "the worker closed the exchange before its answer")
            elif kind is FrameKind.CONTROL:
                control = decode_control(payload)
                if control.type == "error":
                    raise remapped(worker_error(control))
    except ChannelClosed as e:
        raise ServiceError(502, "access_failed", f"the screen's route broke: {e}") from e


def _dimension(name: str) -> Any:
    return QueryParameter(ge=1, le=7680, description=f"at most this many pixels {name} (the image is scaled to fit)")


@get(
    "/v1/sessions/{session_id:str}/screenshot",
    summary="A screenshot of a graphical session's screen",
    guards=EXEC,
    media_type="image/png",
)
async def screenshot(
    session_id: FromPath[str],
    request: Request[Any, Any, Any],
    state: State,
    format: Annotated[Format, QueryParameter(description="png (lossless, the default) or jpeg")] = "png",
    quality: Annotated[int | None, QueryParameter(ge=1, le=100, description="jpeg only; default 80")] = None,
    scale: Annotated[float | None, QueryParameter(gt=0, le=1, description="0.05 to 1: the image's size")] = None,
    max_width: Annotated[int | None, _dimension("wide")] = None,
    max_height: Annotated[int | None, _dimension("high")] = None,
) -> Response[bytes]:
    """The image (``image/png`` or ``image/jpeg``), scaled down by the smallest factor asked
    (``scale``, or what fits ``max_width``/``max_height``; never up). The headers say the
    screen's size, the image's and the scale: clicks on the image go back with that ``scale``
    (or the image's size) in the input's body."""
    token = caller(request)
    if quality is not None and format != "jpeg":
        raise ServiceError(400, "invalid_request", "quality is for format=jpeg", "quality")
    record = await graphical_record(state, session_id, token.visible_tenant)
    screen = screen_of(record)
    try:
        factor = screenshot_scale(screen, scale=scale, max_width=max_width, max_height=max_height)
    except ScreenRefused as e:
        raise refused(e) from None
    size = scaled_size(screen, factor)
    shot = Screenshot(format=format, quality=quality, size=None if size == screen else size)
    answer = await _exchange(state.access, ticket_for(record, AccessKind.SCREEN, by=token.name, screen=shot))
    line, _, image = answer.partition(b"\n")
    try:
        captured = msgspec.json.decode(line, type=Captured)
    except msgspec.DecodeError as e:
        raise ServiceError(502, "screen_failed", f"the worker's answer did not say what it captured: {e}") from e
    headers = {
        "X-Screen-Width": str(captured.width),
        "X-Screen-Height": str(captured.height),
        "X-Image-Width": str(captured.image_width),
        "X-Image-Height": str(captured.image_height),
        "X-Scale": _scale_text(factor),
        "X-Capture-Ms": str(captured.ms),
        "Cache-Control": "no-store",
    }
    return Response(image, media_type=MEDIA_TYPES[captured.format], headers=headers)


def _scale_text(factor: float) -> str:
    return format(factor, ".6g")


@post("/v1/sessions/{session_id:str}/input", summary="An input action on a graphical session's screen", guards=EXEC)
async def screen_input(
    session_id: FromPath[str], request: Request[Any, Any, Any], state: State, data: JSONBody[InputAction]
) -> Response[InputDone]:
    """One action; 200 with the pointer after it (and on the scaled image, when the action's
    coordinates were), and how long it took. An ``input.<action>`` event on the session's
    stream says who did what where (a ``type``'s length, never its text). Refused with 422
    before anything reaches the screen: ``out_of_screen``, ``unknown_key``, ``bad_argument``."""
    token = caller(request)
    record = await graphical_record(state, session_id, token.visible_tenant)
    screen = screen_of(record)
    try:
        action, image = on_screen(data, screen)
    except ScreenRefused as e:
        raise refused(e) from None
    began = time.monotonic()
    answer = await _exchange(state.access, ticket_for(record, AccessKind.SCREEN, by=token.name, screen=action))
    try:
        said = msgspec.json.decode(answer, type=_Said)
    except msgspec.DecodeError as e:
        raise ServiceError(502, "screen_failed", f"the worker's answer was not orch-screen's: {e}") from e
    done = InputDone(
        action=action_name(action),
        x=said.x,
        y=said.y,
        duration_ms=said.duration_ms if said.duration_ms is not None else round((time.monotonic() - began) * 1000),
    )
    if image is not None:
        done.image_x, done.image_y = to_image(said.x, said.y, screen, image)
    return Response(done, status_code=200)


class _Said(msgspec.Struct, kw_only=True):
    """orch-screen's answer as the worker relays it (its other fields are not the API's)."""

    x: int
    y: int
    duration_ms: int | None = None


ROUTES = [screenshot, screen_input]
