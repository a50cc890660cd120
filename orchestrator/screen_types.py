"""Computer use, the vocabulary: a screenshot asked for and what it was, an input action (a tagged
union on ``action``), and the pure rules both sides share: a scaled image's size, a point on
that image back onto the screen, an action as ``orch-screen``'s argv, orch-screen's codes as
HTTP statuses. The API (orchestrator/api_screen.py) converts and checks, the worker
(workers/runtime/screen.py) runs orch-screen (desktop_image/orch-screen.py) with what it is handed.

Scaling is nearest neighbour, and a point maps through pixel centres both ways: image pixel
``i`` of an image ``w`` wide shows screen pixel ``(2i + 1) * W // (2w)``, which is the one a
click at ``i`` lands on, so an agent that aims at what it sees on the scaled image hits it."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import msgspec

Format = Literal["png", "jpeg"]
Button = Literal["left", "middle", "right"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg"}
MAX_TEXT = 10_000  # characters of one ``type`` (orch-screen's own cap)
MAX_KEYS = 32
MAX_SCROLL = 100
MIN_SCALE = 0.05
# Coordinates are checked against the screen (out_of_screen), not by the schema: a point off
# the screen is a stable 422, whatever its sign.
Coordinate = Annotated[int, msgspec.Meta(ge=-1_000_000, le=1_000_000)]
Scale = Annotated[float, msgspec.Meta(gt=0, le=1)]
Steps = Annotated[int, msgspec.Meta(ge=-MAX_SCROLL, le=MAX_SCROLL)]
KeyCombo = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class ScreenRefused(Exception):
    """A request the screen cannot take (``code``: out_of_screen, bad_argument), said before
    anything reaches the desktop."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Size(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    width: Annotated[int, msgspec.Meta(ge=1, le=7680)]
    height: Annotated[int, msgspec.Meta(ge=1, le=4320)]


# -- input actions (the body of POST /v1/sessions/{id}/input) --------------------------------


class _Action(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True, tag_field="action"):
    pass


class _Pointed(_Action, kw_only=True, frozen=True):
    """An action at a point. ``x``/``y`` are screen pixels, or the pixels of a scaled screenshot
    when ``scale`` (as the screenshot's ``X-Scale`` said) or ``image`` (its size) is given."""

    x: Coordinate
    y: Coordinate
    scale: Scale | None = None
    image: Size | None = None


class Move(_Pointed, tag="move", kw_only=True, frozen=True):
    pass


class Click(_Pointed, tag="click", kw_only=True, frozen=True):
    button: Button = "left"


class DoubleClick(_Pointed, tag="double_click", kw_only=True, frozen=True):
    button: Button = "left"


class Drag(_Pointed, tag="drag", kw_only=True, frozen=True):
    """From (x, y) to (to_x, to_y), the button held."""

    to_x: Coordinate
    to_y: Coordinate
    button: Button = "left"


class Scroll(_Pointed, tag="scroll", kw_only=True, frozen=True):
    """Wheel steps at (x, y): ``dy`` positive down, ``dx`` positive right."""

    dx: Steps = 0
    dy: Steps = 0


class Type(_Action, tag="type", kw_only=True, frozen=True):
    """Text typed into the focused window (never echoed in events: its length only)."""

    text: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT)]


class Key(_Action, tag="key", kw_only=True, frozen=True):
    """Key combinations pressed in turn: ``ctrl+c``, ``Return``, ``alt+F4``."""

    keys: Annotated[list[KeyCombo], msgspec.Meta(min_length=1, max_length=MAX_KEYS)]


InputAction = Move | Click | DoubleClick | Drag | Scroll | Type | Key


class Screenshot(_Action, tag="screenshot", kw_only=True, frozen=True):
    """A screenshot as the worker takes it: the image's size decided by the API already."""

    format: Format = "png"
    quality: Annotated[int, msgspec.Meta(ge=1, le=100)] | None = None
    size: Size | None = None  # None: the screen's own


ScreenOp = Screenshot | InputAction  # what a ``screen`` access ticket carries


def action_name(op: ScreenOp) -> str:
    """``click``, ``double_click``, ``screenshot``...: the op's tag."""
    return str(op.__struct_config__.tag)


class Captured(msgspec.Struct, kw_only=True):
    """What orch-screen says of a screenshot it took (its JSON line on stderr)."""

    format: Format
    width: int
    height: int
    image_width: int
    image_height: int
    bytes: int
    ms: int


class InputDone(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The answer to an input action: where the pointer is after it (screen pixels, and the
    scaled image's when the action gave a scale or an image size), and how long it took."""

    action: str
    x: int
    y: int
    image_x: int | None = None
    image_y: int | None = None
    duration_ms: int = 0


# -- scaling ------------------------------------------------------------------------------------


def screenshot_scale(
    screen: Size, *, scale: float | None = None, max_width: int | None = None, max_height: int | None = None
) -> float:
    """The factor a screenshot is taken at: the smallest of those asked (never above 1)."""
    factors = [1.0]
    if scale is not None:
        factors.append(scale)
    if max_width is not None:
        factors.append(max_width / screen.width)
    if max_height is not None:
        factors.append(max_height / screen.height)
    chosen = min(factors)
    if chosen < MIN_SCALE:
        raise ScreenRefused("bad_argument", f"a scale of {chosen:.3g} is below {MIN_SCALE}: the image would be a smear")
    return chosen


def scaled_size(screen: Size, scale: float) -> Size:
    """The image's size at ``scale``: each side rounded, at least a pixel."""
    if scale >= 1:
        return screen
    return Size(max(1, _round(screen.width * scale)), max(1, _round(screen.height * scale)))


def _round(value: float) -> int:
    # Half up, not Python's half to even, and a hair of tolerance so that 640 / 1280 * 1280 is 640.
    return math.floor(value + 0.5 + 1e-9)


def to_screen(x: int, y: int, screen: Size, image: Size | None) -> tuple[int, int]:
    """A point given on ``image`` (None: on the screen itself) as screen pixels; out_of_screen
    when it is not on the image (or the screen)."""
    frame = image or screen
    if not (0 <= x < frame.width and 0 <= y < frame.height):
        what = "image" if image is not None else "screen"
        raise ScreenRefused("out_of_screen", f"({x}, {y}) is outside the {frame.width}x{frame.height} {what}")
    if image is None or image == screen:
        return x, y
    return (2 * x + 1) * screen.width // (2 * image.width), (2 * y + 1) * screen.height // (2 * image.height)


def to_image(x: int, y: int, screen: Size, image: Size) -> tuple[int, int]:
    """A screen point on the scaled image: the image pixel whose area holds it."""
    ix = min(image.width - 1, x * image.width // screen.width)
    return ix, min(image.height - 1, y * image.height // screen.height)


def image_of(action: _Pointed, screen: Size) -> Size | None:
    """The image an action's coordinates are on, from its ``scale`` or ``image`` (not both)."""
    if action.scale is not None and action.image is not None:
        raise ScreenRefused("bad_argument", "give scale or image, not both")
    if action.image is not None:
        return action.image
    if action.scale is not None:
        return scaled_size(screen, action.scale)
    return None


def on_screen(action: InputAction, screen: Size) -> tuple[InputAction, Size | None]:
    """The action in screen pixels (its scale and image dropped), and the image it was given on."""
    if not isinstance(action, _Pointed):
        return action, None
    image = image_of(action, screen)
    x, y = to_screen(action.x, action.y, screen, image)
    if isinstance(action, Drag):
        to_x, to_y = to_screen(action.to_x, action.to_y, screen, image)
        return msgspec.structs.replace(action, x=x, y=y, to_x=to_x, to_y=to_y, scale=None, image=None), image
    if isinstance(action, Scroll) and not (action.dx or action.dy):
        raise ScreenRefused("bad_argument", "scroll needs dx or dy")
    return msgspec.structs.replace(action, x=x, y=y, scale=None, image=None), image


# -- orch-screen --------------------------------------------------------------------------------


def screenshot_argv(shot: Screenshot) -> list[str]:
    argv = ["screenshot", "--format", shot.format]
    if shot.quality is not None and shot.format == "jpeg":
        argv += ["--quality", str(shot.quality)]
    if shot.size is not None:
        argv += ["--size", f"{shot.size.width}x{shot.size.height}"]
    return argv


def input_argv(action: InputAction) -> tuple[list[str], bytes | None]:
    """orch-screen's argv for an action in screen pixels, and its stdin: the text of a ``type``
    goes there, never into an argv (which ``docker inspect`` of the exec and ps show)."""
    match action:
        case Move():
            return ["move", str(action.x), str(action.y)], None
        case Click() | DoubleClick():
            name = "click" if isinstance(action, Click) else "double-click"
            return [name, str(action.x), str(action.y), "--button", action.button], None
        case Drag():
            points = map(str, (action.x, action.y, action.to_x, action.to_y))
            return ["drag", *points, "--button", action.button], None
        case Scroll():
            return ["scroll", str(action.x), str(action.y), "--dy", str(action.dy), "--dx", str(action.dx)], None
        case Type():
            return ["type", "--stdin"], action.text.encode()
        case Key():
            return ["key", *action.keys], None
    raise AssertionError(f"not an input action: {action!r}")


def audit(action: InputAction) -> dict[str, object]:
    """What an ``input.<action>`` event says of an action: where, which button, how many
    characters; never what was typed. A key that is a bare character (``a``) is a letter of
    text by another road, so it shows as ``*``; combinations and named keys show as they are."""
    match action:
        case Type():
            return {"characters": len(action.text)}
        case Key():
            return {"keys": ["*" if len(k) == 1 else k for k in action.keys]}
        case Drag():
            return {"x": action.x, "y": action.y, "to_x": action.to_x, "to_y": action.to_y, "button": action.button}
        case Click() | DoubleClick():
            return {"x": action.x, "y": action.y, "button": action.button}
        case Scroll():
            return {"x": action.x, "y": action.y, "dx": action.dx, "dy": action.dy}
        case Move():
            return {"x": action.x, "y": action.y}
    raise AssertionError(f"not an input action: {action!r}")


# orch-screen's codes (and the worker's own) as HTTP statuses: the caller's mistakes are 422,
# a display restarting 503 (retry), a capture or an input that failed in the desktop 502.
STATUS_OF: dict[str, int] = {
    "bad_argument": 422,
    "unknown_action": 422,
    "unknown_key": 422,
    "out_of_screen": 422,
    "display_unavailable": 503,
    "capture_failed": 502,
    "input_failed": 502,
    "screen_failed": 502,
}
CODES: frozenset[str] = frozenset(STATUS_OF)


def parse_refusal(stderr: bytes) -> tuple[str, str] | None:
    """orch-screen's ``orch-screen: CODE: message`` line (its last), if it said one."""
    for line in reversed(stderr.decode(errors="replace").splitlines()):
        if line.startswith("orch-screen: "):
            code, _, message = line.removeprefix("orch-screen: ").partition(": ")
            if code in CODES:
                return code, message.strip()
    return None
