"""Computer use, the pure parts: the input body (a strict tagged union), the scaled image's size,
points between the image and the screen (checked against orch-screen's own resize), the actions
as orch-screen argv, what the audit says, and how refusals become statuses."""

from __future__ import annotations

import importlib.util
import os
from array import array
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest

from orchestrator.api_screen import graphical_record, remapped
from orchestrator.errors import ServiceError
from orchestrator.schemas import SessionCreate, SessionRecord
from orchestrator.screen_types import (
    Click,
    Drag,
    InputAction,
    Key,
    Move,
    ScreenRefused,
    Screenshot,
    Scroll,
    Size,
    Type,
    audit,
    input_argv,
    on_screen,
    parse_refusal,
    scaled_size,
    screenshot_argv,
    screenshot_scale,
    to_image,
    to_screen,
)
from orchestrator.states import SessionState
from workers.runtime.screen import _failure

SCREEN = Size(1280, 800)
ORCH_SCREEN = Path(__file__).resolve().parents[2] / "desktop_image" / "orch-screen.py"


def body(**fields: Any) -> InputAction:
    return msgspec.json.decode(msgspec.json.encode(fields), type=InputAction)


def test_the_body_is_a_strict_union_on_action() -> None:
    assert body(action="click", x=1, y=2) == Click(x=1, y=2)
    assert body(action="drag", x=1, y=2, to_x=3, to_y=4, button="right") == Drag(
        x=1, y=2, to_x=3, to_y=4, button="right"
    )
    assert body(action="key", keys=["ctrl+c"]) == Key(keys=["ctrl+c"])
    assert body(action="move", x=3, y=4, image={"width": 10, "height": 5}) == Move(x=3, y=4, image=Size(10, 5))
    for bad in (
        {"action": "teleport", "x": 1, "y": 1},  # no such action
        {"action": "click", "x": 1},  # y missing
        {"action": "click", "x": 1, "y": 1, "colour": "red"},  # unknown field
        {"action": "click", "x": 1, "y": 1, "button": "fourth"},
        {"action": "type", "text": ""},
        {"action": "type", "text": "x" * 10_001},
        {"action": "type", "text": "x", "x": 1},  # type has no point
        {"action": "key", "keys": []},
        {"action": "key", "keys": ["a"] * 33},
        {"action": "scroll", "x": 1, "y": 1, "dy": 101},
        {"action": "move", "x": 1, "y": 1, "scale": 0},
        {"action": "move", "x": 1, "y": 1, "scale": 1.5},
        {"action": "move", "x": "1", "y": 1},
    ):
        with pytest.raises(msgspec.ValidationError):
            body(**bad)


def test_the_scale_is_the_smallest_asked_and_never_above_one() -> None:
    assert screenshot_scale(SCREEN) == 1.0
    assert screenshot_scale(SCREEN, scale=0.5) == 0.5
    assert screenshot_scale(SCREEN, max_width=640) == 0.5
    assert screenshot_scale(SCREEN, max_width=2000) == 1.0  # never up
    assert screenshot_scale(SCREEN, scale=0.9, max_height=400) == 0.5
    with pytest.raises(ScreenRefused) as refused:
        screenshot_scale(SCREEN, scale=0.01)
    assert refused.value.code == "bad_argument"


def test_the_image_size_rounds_half_up() -> None:
    assert scaled_size(SCREEN, 1.0) == SCREEN
    assert scaled_size(SCREEN, 0.5) == Size(640, 400)
    assert scaled_size(SCREEN, 500 / 1280) == Size(500, 313)  # 312.5
    assert scaled_size(Size(1000, 3), 0.1) == Size(100, 1)  # 0.3: at least a pixel
    assert scaled_size(Size(1366, 768), 0.3) == Size(410, 230)  # 409.8, 230.4


def test_points_go_through_pixel_centres_both_ways() -> None:
    assert to_screen(10, 20, SCREEN, None) == (10, 20)
    assert to_screen(100, 50, SCREEN, Size(640, 400)) == (201, 101)
    assert to_screen(639, 399, SCREEN, Size(640, 400)) == (1279, 799)
    for image in (Size(640, 400), Size(500, 313), Size(97, 61), SCREEN):
        for i in range(image.width):
            x, _ = to_screen(i, 0, SCREEN, image)
            assert 0 <= x < SCREEN.width and to_image(x, 0, SCREEN, image)[0] == i
    off: list[tuple[int, int, Size | None]] = [(1280, 0, None), (0, 800, None), (-1, 0, None), (640, 0, Size(640, 400))]
    for x, y, frame in off:
        with pytest.raises(ScreenRefused) as refused:
            to_screen(x, y, SCREEN, frame)
        assert refused.value.code == "out_of_screen"


@pytest.fixture
def orch_screen() -> Iterator[ModuleType]:
    """desktop_image/orch-screen.py as a module (it sets DISPLAY on import: put back after)."""
    saved = os.environ.get("DISPLAY")
    spec = importlib.util.spec_from_file_location("orch_screen", ORCH_SCREEN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        yield module
    finally:
        if saved is None:
            os.environ.pop("DISPLAY", None)
        else:
            os.environ["DISPLAY"] = saved


@pytest.mark.parametrize("image", [Size(640, 400), Size(500, 313), Size(1, 1), Size(1279, 799)])
def test_a_click_on_the_image_lands_on_the_pixel_it_shows(orch_screen: ModuleType, image: Size) -> None:
    """orch-screen's resize, of a screen whose every pixel is its own index: the image pixel
    at (i, j) holds the index of the screen pixel the API sends a click at (i, j) to."""
    screen = Size(1280, 800)
    pixels = array("I", range(screen.width * screen.height)).tobytes()
    shrunk = array("I", orch_screen.shrink(pixels, screen.width, screen.height, image.width, image.height))
    assert len(shrunk) == image.width * image.height
    for j in sorted({0, image.height // 3, image.height - 1}):
        for i in sorted({0, image.width // 2, image.width - 1}):
            x, y = to_screen(i, j, screen, image)
            assert shrunk[j * image.width + i] == y * screen.width + x, (i, j)


def test_actions_are_converted_to_screen_pixels_once() -> None:
    action, image = on_screen(Click(x=100, y=50, scale=0.5), SCREEN)
    assert action == Click(x=201, y=101) and image == Size(640, 400)
    action, image = on_screen(Drag(x=0, y=0, to_x=639, to_y=399, image=Size(640, 400)), SCREEN)
    assert action == Drag(x=1, y=1, to_x=1279, to_y=799) and image == Size(640, 400)
    assert on_screen(Type(text="hi"), SCREEN) == (Type(text="hi"), None)
    for bad, code in (
        (Move(x=1, y=1, scale=0.5, image=Size(2, 2)), "bad_argument"),
        (Scroll(x=1, y=1), "bad_argument"),
        (Drag(x=1, y=1, to_x=1, to_y=800), "out_of_screen"),
    ):
        with pytest.raises(ScreenRefused) as refused:
            on_screen(bad, SCREEN)
        assert refused.value.code == code


def test_orch_screen_argv_keeps_typed_text_on_stdin() -> None:
    assert input_argv(Move(x=1, y=2)) == (["move", "1", "2"], None)
    assert input_argv(Click(x=1, y=2, button="right")) == (["click", "1", "2", "--button", "right"], None)
    assert input_argv(Drag(x=1, y=2, to_x=3, to_y=4))[0] == ["drag", "1", "2", "3", "4", "--button", "left"]
    assert input_argv(Scroll(x=5, y=6, dy=-3)) == (["scroll", "5", "6", "--dy", "-3", "--dx", "0"], None)
    assert input_argv(Type(text="secret")) == (["type", "--stdin"], b"secret")
    assert input_argv(Key(keys=["ctrl+c", "Return"])) == (["key", "ctrl+c", "Return"], None)
    assert screenshot_argv(Screenshot()) == ["screenshot", "--format", "png"]
    assert screenshot_argv(Screenshot(format="jpeg", quality=70, size=Size(640, 400))) == [
        "screenshot",
        "--format",
        "jpeg",
        "--quality",
        "70",
        "--size",
        "640x400",
    ]


def test_the_audit_never_says_what_was_typed() -> None:
    assert audit(Type(text="hunter2")) == {"characters": 7}
    assert audit(Key(keys=["h", "ctrl+c", "Return", "A"])) == {"keys": ["*", "ctrl+c", "Return", "*"]}
    assert audit(Click(x=1, y=2)) == {"x": 1, "y": 2, "button": "left"}


def test_refusals_become_codes_and_statuses() -> None:
    said = b"some noise\norch-screen: unknown_key: 'nosuch' is not a key name\n"
    assert parse_refusal(said) == ("unknown_key", "'nosuch' is not a key name")
    assert parse_refusal(b"orch-screen: made_up: x\n") is None
    assert _failure(3, said, "key").code == "unknown_key"
    assert _failure(125, b"desktop-enter: not up\n", "move").code == "desktop_gone"
    assert _failure(127, b"sh: orch-screen: not found\n", "move").code == "display_unavailable"
    assert _failure(1, b"Traceback...\n", "move").code == "screen_failed"
    for code, status in (("out_of_screen", 422), ("display_unavailable", 503), ("input_failed", 502)):
        assert remapped(ServiceError(502, code, "m")).status == status
    assert remapped(ServiceError(409, "session_not_ready", "m")).status == 409


class _Sessions:
    def __init__(self, record: SessionRecord) -> None:
        self.record = record

    async def get(self, session_id: str, tenant: str | None) -> SessionRecord:
        return self.record


class _State:
    def __init__(self, record: SessionRecord) -> None:
        self.sessions = _Sessions(record)


def _record(flavor: str, state: SessionState) -> SessionRecord:
    from orchestrator.config import SharedSettings
    from orchestrator.records import new_record

    record = new_record(msgspec.convert({"flavor": flavor}, SessionCreate), "sb", SharedSettings())
    return msgspec.structs.replace(record, state=state)


@pytest.mark.parametrize(
    ("flavor", "state", "code"),
    [
        ("minimal", SessionState.READY, "not_graphical"),
        ("minimal", SessionState.PENDING, "not_graphical"),  # the flavor first: it never will have one
        ("graphical", SessionState.PENDING, "session_not_ready"),
        ("graphical", SessionState.READY, None),
    ],
)
async def test_only_a_ready_graphical_session_has_a_screen(flavor: str, state: SessionState, code: str | None) -> None:
    record = _record(flavor, state)
    if code is None:
        assert await graphical_record(_State(record), record.id, None) is record  # type: ignore[arg-type]
        return
    with pytest.raises(ServiceError) as refused:
        await graphical_record(_State(record), record.id, None)  # type: ignore[arg-type]
    assert (refused.value.status, refused.value.code) == (409, code)
