#!/usr/bin/python3
"""orch-screen: screenshots of and input into the graphical desktop's display (:0).

The worker runs it through desktop-enter (as workers/runtime/files.py runs its scripts), so it
acts as the desktop's user, who owns the screen. Debian's python3 (the image has it for
docker-compose) with the standard library only: the capture reads the screen through Xlib
(ctypes, XGetImage), the PNG is encoded here with zlib, a JPEG by cjpeg; input goes through
xdotool (XTEST). Key names are checked against Xlib's keysym table before anything is sent.

    orch-screen geometry [--plain]               {"width","height","depth"} (--plain: "W H D")
    orch-screen screenshot [--format png|jpeg] [--quality 1..100] [--size WxH]
                                                 the image on stdout (--size: scaled down to
                                                 WxH, nearest neighbour); a JSON line on stderr
    orch-screen cursor                           {"x","y"}
    orch-screen move X Y
    orch-screen click X Y [--button left|middle|right]
    orch-screen double-click X Y [--button B]
    orch-screen drag X1 Y1 X2 Y2 [--button B]
    orch-screen type TEXT | type --stdin         typed into the focused window
    orch-screen key COMBO [COMBO...]             e.g. ctrl+c Return alt+F4
    orch-screen scroll X Y [--dy N] [--dx N]     N wheel steps, positive down / right

Every error is one line on stderr, ``orch-screen: CODE: message``, and exit status 3.
Input actions print a JSON line on stdout: the action and where the pointer is after it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import operator
import os
import struct
import subprocess
import sys
import time
import zlib
from array import array

DISPLAY = os.environ.get("DISPLAY") or ":0"
os.environ["DISPLAY"] = DISPLAY  # xdotool's too
MAX_TEXT = 10_000  # characters of one `type`
MAX_COMBOS = 32
MAX_SCROLL = 100
BUTTONS = {"left": 1, "middle": 2, "right": 3}
# Friendly names (what agents and the Anthropic/OpenAI tools send) onto X keysym names; anything
# else must be a keysym name Xlib knows (case as X spells it: Return, BackSpace, F5, a, A).
ALIASES = {
    "enter": "Return",
    "return": "Return",
    "esc": "Escape",
    "escape": "Escape",
    "tab": "Tab",
    "backspace": "BackSpace",
    "delete": "Delete",
    "del": "Delete",
    "insert": "Insert",
    "space": "space",
    "up": "Up",
    "down": "Down",
    "left": "Left",
    "right": "Right",
    "home": "Home",
    "end": "End",
    "pageup": "Prior",
    "page_up": "Prior",
    "pagedown": "Next",
    "page_down": "Next",
    "menu": "Menu",
    "print": "Print",
}
MODIFIERS = {
    "ctrl": "ctrl",
    "control": "ctrl",
    "alt": "alt",
    "shift": "shift",
    "super": "super",
    "win": "super",
    "cmd": "super",
    "meta": "meta",
}


class Failure(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- Xlib through ctypes -------------------------------------------------------------------------


class XImage(ctypes.Structure):
    # The leading fields of Xlib's XImage (Xlib.h), as far as the pixels need.
    _fields_ = [
        ("width", ctypes.c_int),
        ("height", ctypes.c_int),
        ("xoffset", ctypes.c_int),
        ("format", ctypes.c_int),
        ("data", ctypes.c_void_p),
        ("byte_order", ctypes.c_int),
        ("bitmap_unit", ctypes.c_int),
        ("bitmap_bit_order", ctypes.c_int),
        ("bitmap_pad", ctypes.c_int),
        ("depth", ctypes.c_int),
        ("bytes_per_line", ctypes.c_int),
        ("bits_per_pixel", ctypes.c_int),
        ("red_mask", ctypes.c_ulong),
        ("green_mask", ctypes.c_ulong),
        ("blue_mask", ctypes.c_ulong),
    ]


ZPIXMAP = 2
ALL_PLANES = ctypes.c_ulong(-1).value


def xlib() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("X11") or "libX11.so.6")
    lib.XOpenDisplay.restype = ctypes.c_void_p
    lib.XOpenDisplay.argtypes = [ctypes.c_char_p]
    for name in ("XDefaultScreen",):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    for name in ("XDisplayWidth", "XDisplayHeight", "XDefaultDepth"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.XRootWindow.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.XRootWindow.restype = ctypes.c_ulong
    lib.XGetImage.argtypes = [
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_ulong,
        ctypes.c_int,
    ]
    lib.XGetImage.restype = ctypes.POINTER(XImage)
    lib.XStringToKeysym.argtypes = [ctypes.c_char_p]
    lib.XStringToKeysym.restype = ctypes.c_ulong
    lib.XCloseDisplay.argtypes = [ctypes.c_void_p]
    return lib


class Screen:
    def __init__(self) -> None:
        self.lib = xlib()
        self.dpy = self.lib.XOpenDisplay(DISPLAY.encode())
        if not self.dpy:
            raise Failure("display_unavailable", f"cannot open display {DISPLAY} (is it the graphical flavor, and up?)")
        self.screen = self.lib.XDefaultScreen(self.dpy)
        self.width = self.lib.XDisplayWidth(self.dpy, self.screen)
        self.height = self.lib.XDisplayHeight(self.dpy, self.screen)
        self.depth = self.lib.XDefaultDepth(self.dpy, self.screen)

    def rgb(self, size: tuple[int, int] | None = None) -> bytes:
        """The whole screen as packed 8-bit RGB rows, scaled down to ``size`` if given."""
        root = self.lib.XRootWindow(self.dpy, self.screen)
        image = self.lib.XGetImage(self.dpy, root, 0, 0, self.width, self.height, ALL_PLANES, ZPIXMAP)
        if not image:
            raise Failure("capture_failed", "XGetImage returned nothing")
        im = image.contents
        if im.bits_per_pixel != 32 or (im.red_mask, im.green_mask, im.blue_mask) != (0xFF0000, 0xFF00, 0xFF):
            raise Failure("capture_failed", f"unsupported visual: {im.bits_per_pixel} bpp, masks {im.red_mask:x}")
        raw = ctypes.string_at(im.data, im.bytes_per_line * im.height)
        stride, w = im.bytes_per_line, im.width
        if stride != w * 4:
            raw = b"".join(raw[y * stride : y * stride + w * 4] for y in range(im.height))
        h = im.height
        if size is not None and size != (w, h):
            raw, (w, h) = shrink(raw, w, h, *size), size
        # LSBFirst 32 bpp TrueColor is B, G, R, X in memory; MSBFirst X, R, G, B.
        order = (2, 1, 0) if im.byte_order == 0 else (1, 2, 3)
        out = bytearray(w * h * 3)
        for channel, offset in enumerate(order):
            out[channel::3] = raw[offset::4]  # slices: C speed, no per-pixel Python
        return bytes(out)

    def keysym_known(self, name: str) -> bool:
        return bool(self.lib.XStringToKeysym(name.encode()))


def shrink(raw: bytes, width: int, height: int, to_width: int, to_height: int) -> bytes:
    """32-bit pixels scaled down by nearest neighbour: image pixel (i, j) is the screen's pixel
    at its centre, (floor((i + 0.5) * W / w), floor((j + 0.5) * H / h)), the mapping the API
    inverts for clicks. Whole pixels picked with itemgetter, one call a row: C speed (1280x800
    to 640x400 in about 10 ms), where a box filter would cost a Python loop per pixel."""
    pixels = memoryview(raw).cast("I")
    pick = operator.itemgetter(*[(2 * i + 1) * width // (2 * to_width) for i in range(to_width)])
    out = array("I")
    for j in range(to_height):
        y = (2 * j + 1) * height // (2 * to_height)
        row = pick(pixels[y * width : (y + 1) * width])
        out.extend((row,) if to_width == 1 else row)  # itemgetter of one index: a bare value
    return out.tobytes()


# -- encoders --------------------------------------------------------------------------------


def png(width: int, height: int, rgb: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = width * 3
    # Filter type 0 (none) on every row: screens compress well as they are, and it is fast.
    raw = b"".join(b"\x00" + rgb[y * row : (y + 1) * row] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 3)) + chunk(b"IEND", b"")


def jpeg(width: int, height: int, rgb: bytes, quality: int) -> bytes:
    ppm = b"P6\n%d %d\n255\n" % (width, height) + rgb
    try:
        done = subprocess.run(["cjpeg", "-quality", str(quality)], input=ppm, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Failure("capture_failed", f"cjpeg: {e}") from e
    if done.returncode != 0:
        raise Failure("capture_failed", f"cjpeg: {done.stderr.decode(errors='replace').strip()[:200]}")
    return done.stdout


# -- argument parsing (strict: every option is named per action, every value checked) ----------


def parse(args: list[str], positional: int, options: dict[str, str | None]) -> tuple[list[str], dict[str, str]]:
    """``positional`` values, then ``--name value`` options from ``options`` (None: a flag)."""
    values: list[str] = []
    given: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and len(arg) > 2:
            name = arg[2:]
            if name not in options:
                raise Failure(
                    "bad_argument", f"unknown option {arg!r} (known: {', '.join('--' + o for o in options) or 'none'})"
                )
            if name in given:
                raise Failure("bad_argument", f"{arg} given twice")
            if options[name] is None:
                given[name] = ""
            else:
                if i + 1 >= len(args):
                    raise Failure("bad_argument", f"{arg} needs a value ({options[name]})")
                given[name] = args[i + 1]
                i += 1
        else:
            values.append(arg)
        i += 1
    if len(values) != positional:
        raise Failure("bad_argument", f"expected {positional} argument(s), got {len(values)}")
    return values, given


def integer(text: str, what: str, low: int, high: int) -> int:
    if not text.lstrip("-").isdigit() or len(text) > 7:
        raise Failure("bad_argument", f"{what} must be an integer, got {text[:40]!r}")
    value = int(text)
    if not low <= value <= high:
        raise Failure("bad_argument", f"{what} {value} is out of {low}..{high}")
    return value


def point(screen: Screen, x: str, y: str) -> tuple[int, int]:
    for text, what in ((x, "x"), (y, "y")):
        if not text.lstrip("-").isdigit() or len(text) > 7:
            raise Failure("bad_argument", f"{what} must be an integer, got {text[:40]!r}")
    px, py = int(x), int(y)
    if not (0 <= px < screen.width and 0 <= py < screen.height):
        raise Failure("out_of_screen", f"({px}, {py}) is outside the {screen.width}x{screen.height} screen")
    return px, py


def button(given: dict[str, str]) -> str:
    name = given.get("button", "left")
    if name not in BUTTONS:
        raise Failure("bad_argument", f"--button must be left, middle or right, got {name[:40]!r}")
    return str(BUTTONS[name])


def combo(screen: Screen, text: str) -> str:
    """A key combination (``ctrl+shift+t``) as xdotool spells it; unknown names are refused."""
    parts = text.split("+")
    if not text or any(not part for part in parts) or len(parts) > 6:
        raise Failure("unknown_key", f"{text[:60]!r} is not a key combination such as ctrl+c")
    out = [MODIFIERS[p.lower()] for p in parts[:-1] if p.lower() in MODIFIERS]
    if len(out) != len(parts) - 1:
        bad = next(p for p in parts[:-1] if p.lower() not in MODIFIERS)
        raise Failure("unknown_key", f"{bad[:40]!r} is not a modifier (ctrl, alt, shift, super, meta)")
    last = parts[-1]
    name = MODIFIERS.get(last.lower()) or ALIASES.get(last.lower()) or last
    if name not in MODIFIERS.values() and not screen.keysym_known(name):
        raise Failure("unknown_key", f"{last[:40]!r} is not a key name (X keysyms: Return, BackSpace, F5, a...)")
    return "+".join([*out, name])


# -- actions ---------------------------------------------------------------------------------


def xdotool(*args: str) -> None:
    try:
        done = subprocess.run(["xdotool", *args], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Failure("input_failed", f"xdotool: {e}") from e
    said = done.stderr.decode(errors="replace").strip()
    if done.returncode != 0 or "No such key" in said or "Invalid" in said:
        raise Failure("input_failed", f"xdotool {args[0]} failed (exit {done.returncode}): {said[:200]}")


def cursor() -> dict[str, int]:
    try:
        done = subprocess.run(["xdotool", "getmouselocation", "--shell"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Failure("input_failed", f"xdotool: {e}") from e
    fields = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    if done.returncode != 0 or "X" not in fields or "Y" not in fields:
        raise Failure("input_failed", f"xdotool getmouselocation failed: {done.stderr.strip()[:200]}")
    return {"x": int(fields["X"]), "y": int(fields["Y"])}


def run(argv: list[str]) -> int:
    if not argv:
        raise Failure("bad_argument", "usage: orch-screen ACTION [ARGS] (see its header)")
    action, args = argv[0], argv[1:]
    if action not in ACTIONS:
        raise Failure("unknown_action", f"{action[:40]!r} is not one of {', '.join(ACTIONS)}")
    screen = Screen()
    done = ACTIONS[action](screen, args)
    if done is not None:
        sys.stdout.write(json.dumps(done) + "\n")
    return 0


def do_geometry(screen: Screen, args: list[str]) -> dict[str, object] | None:
    _, given = parse(args, 0, {"plain": None})
    if "plain" in given:
        sys.stdout.write(f"{screen.width} {screen.height} {screen.depth}\n")
        return None
    return {"width": screen.width, "height": screen.height, "depth": screen.depth, "display": DISPLAY}


def image_size(screen: Screen, text: str) -> tuple[int, int]:
    """``--size WxH``: at least 1x1, at most the screen (scaling is down only)."""
    w, x, h = text.partition("x")
    if not x:
        raise Failure("bad_argument", f"--size must be WIDTHxHEIGHT, got {text[:40]!r}")
    return integer(w, "--size width", 1, screen.width), integer(h, "--size height", 1, screen.height)


def do_screenshot(screen: Screen, args: list[str]) -> None:
    _, given = parse(args, 0, {"format": "png or jpeg", "quality": "1..100", "size": "WIDTHxHEIGHT"})
    kind = given.get("format", "png")
    if kind not in ("png", "jpeg"):
        raise Failure("bad_argument", f"--format must be png or jpeg, got {kind[:40]!r}")
    if "quality" in given and kind != "jpeg":
        raise Failure("bad_argument", "--quality is for --format jpeg")
    quality = integer(given.get("quality", "80"), "--quality", 1, 100)
    size = image_size(screen, given["size"]) if "size" in given else (screen.width, screen.height)
    began = time.monotonic()
    rgb = screen.rgb(size)
    data = png(*size, rgb) if kind == "png" else jpeg(*size, rgb, quality)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    info = {
        "format": kind,
        "width": screen.width,
        "height": screen.height,
        "image_width": size[0],
        "image_height": size[1],
        "bytes": len(data),
        "ms": round((time.monotonic() - began) * 1000),
    }
    sys.stderr.write(json.dumps(info) + "\n")


def do_cursor(screen: Screen, args: list[str]) -> dict[str, object]:
    parse(args, 0, {})
    return {**cursor()}


def do_move(screen: Screen, args: list[str]) -> dict[str, object]:
    (x, y), _ = parse(args, 2, {})
    px, py = point(screen, x, y)
    xdotool("mousemove", str(px), str(py))
    return {"action": "move", **cursor()}


def do_click(screen: Screen, args: list[str], repeat: int = 1) -> dict[str, object]:
    (x, y), given = parse(args, 2, {"button": "left, middle or right"})
    px, py = point(screen, x, y)
    b = button(given)
    xdotool("mousemove", str(px), str(py), "click", "--repeat", str(repeat), "--delay", "80", b)
    return {"action": "click" if repeat == 1 else "double-click", **cursor()}


def do_double_click(screen: Screen, args: list[str]) -> dict[str, object]:
    return do_click(screen, args, repeat=2)


def do_drag(screen: Screen, args: list[str]) -> dict[str, object]:
    (x1, y1, x2, y2), given = parse(args, 4, {"button": "left, middle or right"})
    a, b = point(screen, x1, y1), point(screen, x2, y2)
    n = button(given)
    mid = ((a[0] + b[0]) // 2, (a[1] + b[1]) // 2)  # a motion between: toolkits see a drag, not a jump
    xdotool(
        "mousemove",
        *map(str, a),
        "mousedown",
        n,
        "sleep",
        "0.05",
        "mousemove",
        *map(str, mid),
        "sleep",
        "0.05",
        "mousemove",
        *map(str, b),
        "sleep",
        "0.05",
        "mouseup",
        n,
    )
    return {"action": "drag", **cursor()}


def do_type(screen: Screen, args: list[str]) -> dict[str, object]:
    if args == ["--stdin"]:
        text = sys.stdin.read(MAX_TEXT + 1)
    else:
        if len(args) != 1:
            raise Failure("bad_argument", "type takes one TEXT argument, or --stdin")
        text = args[0]
    if not text:
        raise Failure("bad_argument", "nothing to type")
    if len(text) > MAX_TEXT:
        raise Failure("bad_argument", f"text longer than {MAX_TEXT} characters: type it in parts")
    xdotool("type", "--delay", "12", "--", text)
    return {"action": "type", "characters": len(text), **cursor()}


def do_key(screen: Screen, args: list[str]) -> dict[str, object]:
    if not args or len(args) > MAX_COMBOS:
        raise Failure("bad_argument", f"key takes 1..{MAX_COMBOS} combinations")
    combos = [combo(screen, a) for a in args]  # all checked before any is sent
    xdotool("key", "--delay", "20", *combos)
    return {"action": "key", "keys": combos, **cursor()}


def do_scroll(screen: Screen, args: list[str]) -> dict[str, object]:
    (x, y), given = parse(args, 2, {"dy": "wheel steps, positive down", "dx": "wheel steps, positive right"})
    px, py = point(screen, x, y)
    dy = integer(given.get("dy", "0"), "--dy", -MAX_SCROLL, MAX_SCROLL)
    dx = integer(given.get("dx", "0"), "--dx", -MAX_SCROLL, MAX_SCROLL)
    if not dx and not dy:
        raise Failure("bad_argument", "scroll needs --dy or --dx")
    steps = ["mousemove", str(px), str(py)]
    if dy:
        steps += ["click", "--repeat", str(abs(dy)), "--delay", "20", "5" if dy > 0 else "4"]
    if dx:
        steps += ["click", "--repeat", str(abs(dx)), "--delay", "20", "7" if dx > 0 else "6"]
    xdotool(*steps)
    return {"action": "scroll", **cursor()}


ACTIONS = {
    "geometry": do_geometry,
    "screenshot": do_screenshot,
    "cursor": do_cursor,
    "move": do_move,
    "click": do_click,
    "double-click": do_double_click,
    "drag": do_drag,
    "type": do_type,
    "key": do_key,
    "scroll": do_scroll,
}

if __name__ == "__main__":
    try:
        sys.exit(run(sys.argv[1:]))
    except Failure as e:
        sys.stderr.write(f"orch-screen: {e.code}: {e}\n")
        sys.exit(3)
