"""View-only for VNC, enforced where the stream crosses the API: the client-to-server half of an
RFB connection (RFC 6143) parsed, and only what asks for pixels let through. Sans I/O: bytes in,
bytes out, a verdict; orchestrator/api_display.py does the sockets.

The handshake first: the ProtocolVersion (12 bytes, ``RFB 003.00x\\n``), the security type the
client chose (one byte, 3.7 and 3.8 only; None, the one type the desktop's Xvnc offers:
docs/graphical.md), then ClientInit, whose shared flag is forced to 1 (a viewer never
disconnects the others). Then messages, by their first byte:

- passed: SetPixelFormat (0), SetEncodings (2), FramebufferUpdateRequest (3), and the two
  that only pace the updates, EnableContinuousUpdates (150) and ClientFence (248), which
  noVNC sends once the server supports them (TigerVNC does);
- dropped, whole (header and body): KeyEvent (4), PointerEvent (5), ClientCutText (6),
  the QEMU extended KeyEvent (255, subtype 0), SetDesktopSize (251) and XVP (250, a shutdown
  or reboot request);
- anything else, or a field out of its bounds: a violation. Nothing of that message or after it
  is passed, and the caller closes the connection: the parser cannot know the length of a
  message it does not know, so it cannot skip it.

The result does not depend on how the bytes were cut into pieces (tests/unit/test_rfb.py)."""

from __future__ import annotations

import enum
import re
import struct
from collections import Counter

VERSION_RE = re.compile(rb"RFB 003\.00[378]\n")
SECURITY_NONE = 1
MAX_ENCODINGS = 1024  # noVNC asks for about 25
MAX_FENCE_PAYLOAD = 64  # RFC 6143's extension registry: a fence carries at most 64 bytes
MAX_CUT_TEXT = 64 << 20  # a dropped clipboard is skipped, not held; past this it is malformed
PIXEL_SIZES = (8, 16, 32)


class DisplayMode(enum.StrEnum):
    VIEW = "view"  # the screen only: input never reaches the desktop
    CONTROL = "control"  # the screen, the keyboard and the pointer: bytes pass as they are


class RfbViolation(Exception):
    """The client sent what view-only does not let through: the connection is to be closed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Phase(enum.Enum):
    VERSION = enum.auto()
    SECURITY = enum.auto()
    CLIENT_INIT = enum.auto()
    MESSAGES = enum.auto()
    SKIP = enum.auto()  # inside a dropped message's body (a clipboard), not held
    BROKEN = enum.auto()


# Fixed-size messages: their type, their name, their length, whether they pass.
_FIXED: dict[int, tuple[str, int, bool]] = {
    0: ("SetPixelFormat", 20, True),
    3: ("FramebufferUpdateRequest", 10, True),
    4: ("KeyEvent", 8, False),
    5: ("PointerEvent", 6, False),
    150: ("EnableContinuousUpdates", 10, True),
    250: ("XVP", 4, False),
}


class ViewFilter:
    """One connection's client-to-server bytes for a view token. ``feed`` returns what may go on
    to the server; once ``violation`` is set, nothing more ever passes."""

    def __init__(self) -> None:
        self._phase = _Phase.VERSION
        self._buffer = bytearray()
        self._skip = 0
        self.passed: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.violation: RfbViolation | None = None

    def feed(self, data: bytes) -> bytes:
        if self._phase is _Phase.BROKEN:
            return b""
        self._buffer += data
        out = bytearray()
        try:
            while self._step(out):
                pass
        except RfbViolation as e:
            self.violation = e
            self._phase = _Phase.BROKEN
            self._buffer.clear()
        return bytes(out)

    def _step(self, out: bytearray) -> bool:
        """One unit (a handshake step, a message, a piece of a skipped body) taken from the
        buffer; False when the buffer holds too little for the next one."""
        buf = self._buffer
        match self._phase:
            case _Phase.VERSION:
                if len(buf) < 12:
                    if not VERSION_RE.fullmatch(bytes(buf) + b"RFB 003.008\n"[len(buf) :]):
                        raise RfbViolation("rfb_bad_version", "not an RFB 3.3/3.7/3.8 ProtocolVersion")
                    return False
                version = bytes(buf[:12])
                if not VERSION_RE.fullmatch(version):
                    raise RfbViolation("rfb_bad_version", f"not an RFB 3.3/3.7/3.8 ProtocolVersion: {version!r}")
                # 3.3: the server names the security type, the client sends no choice.
                self._phase = _Phase.CLIENT_INIT if version == b"RFB 003.003\n" else _Phase.SECURITY
                return self._emit(out, 12, "ProtocolVersion")
            case _Phase.SECURITY:
                if not buf:
                    return False
                if buf[0] != SECURITY_NONE:
                    raise RfbViolation("rfb_bad_security", f"security type {buf[0]}: the desktop offers None (1) only")
                self._phase = _Phase.CLIENT_INIT
                return self._emit(out, 1, "SecurityType")
            case _Phase.CLIENT_INIT:
                if not buf:
                    return False
                buf[0] = 1  # shared: a viewer never takes the screen from the others
                self._phase = _Phase.MESSAGES
                return self._emit(out, 1, "ClientInit")
            case _Phase.SKIP:
                if not buf:
                    return False
                n = min(self._skip, len(buf))
                del buf[:n]
                self._skip -= n
                if self._skip == 0:
                    self._phase = _Phase.MESSAGES
                return True
            case _:
                return self._message(out) if buf else False

    def _message(self, out: bytearray) -> bool:
        buf = self._buffer
        kind = buf[0]
        fixed = _FIXED.get(kind)
        if fixed is not None:
            name, size, passes = fixed
            if len(buf) < size:
                return False
            if kind == 0 and buf[4] not in PIXEL_SIZES:
                raise RfbViolation("rfb_malformed", f"SetPixelFormat with {buf[4]} bits per pixel")
            return self._emit(out, size, name) if passes else self._drop(size, name)
        match kind:
            case 2:  # SetEncodings: type, padding, count (u16), count x s32
                if len(buf) < 4:
                    return False
                count = struct.unpack_from("!H", buf, 2)[0]
                if count > MAX_ENCODINGS:
                    raise RfbViolation("rfb_malformed", f"SetEncodings with {count} encodings")
                size = 4 + 4 * count
                return self._emit(out, size, "SetEncodings") if len(buf) >= size else False
            case 6:  # ClientCutText: type, 3 padding, length (s32; negative: the extended format)
                if len(buf) < 8:
                    return False
                length = abs(struct.unpack_from("!i", buf, 4)[0])
                if length > MAX_CUT_TEXT:
                    raise RfbViolation("rfb_malformed", f"ClientCutText of {length} bytes")
                self._drop(8, "ClientCutText")
                if length:
                    self._skip = length
                    self._phase = _Phase.SKIP
                return True
            case 248:  # ClientFence: type, 3 padding, flags (u32), length (u8), payload
                if len(buf) < 9:
                    return False
                length = buf[8]
                if length > MAX_FENCE_PAYLOAD:
                    raise RfbViolation("rfb_malformed", f"ClientFence with {length} bytes of payload")
                size = 9 + length
                return self._emit(out, size, "ClientFence") if len(buf) >= size else False
            case 251:  # SetDesktopSize: type, padding, w, h (u16), screens (u8), padding, 16 each
                if len(buf) < 8:
                    return False
                size = 8 + 16 * buf[6]
                return self._drop(size, "SetDesktopSize") if len(buf) >= size else False
            case 255:  # QEMU client messages: subtype 0 is the extended KeyEvent (12 bytes)
                if len(buf) < 2:
                    return False
                if buf[1] != 0:
                    raise RfbViolation("rfb_unknown_message", f"QEMU client message subtype {buf[1]}")
                return self._drop(12, "QemuKeyEvent") if len(buf) >= 12 else False
        raise RfbViolation("rfb_unknown_message", f"client message type {kind} is not let through in view mode")

    def _emit(self, out: bytearray, size: int, name: str) -> bool:
        out += self._buffer[:size]
        del self._buffer[:size]
        self.passed[name] += 1
        return True

    def _drop(self, size: int, name: str) -> bool:
        if len(self._buffer) < size:
            return False
        del self._buffer[:size]
        self.dropped[name] += 1
        return True
