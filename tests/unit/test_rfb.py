"""orchestrator/rfb.py: what view-only lets through of a client's RFB stream. Properties over
generated streams: any chunking gives what one chunk gives; dropped messages never come out;
an unknown or malformed message stops everything from there on."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.rfb import MAX_CUT_TEXT, ViewFilter

HANDSHAKE = b"RFB 003.008\n" + b"\x01" + b"\x00"  # version, security None, ClientInit (exclusive)
HANDSHAKE_OUT = b"RFB 003.008\n" + b"\x01" + b"\x01"  # ... forced shared


def set_pixel_format(bpp: int = 32) -> bytes:
    pixel_format = bytes([bpp, 24, 0, 1]) + struct.pack("!HHH", 255, 255, 255) + bytes([16, 8, 0]) + b"\0" * 3
    return b"\x00\x00\x00\x00" + pixel_format


def set_encodings(encodings: list[int]) -> bytes:
    return struct.pack("!BBH", 2, 0, len(encodings)) + b"".join(struct.pack("!i", e) for e in encodings)


def update_request(incremental: int, x: int, y: int, w: int, h: int) -> bytes:
    return struct.pack("!BBHHHH", 3, incremental, x, y, w, h)


def key_event(down: int, keysym: int) -> bytes:
    return struct.pack("!BBxxI", 4, down, keysym)


def pointer_event(mask: int, x: int, y: int) -> bytes:
    return struct.pack("!BBHH", 5, mask, x, y)


def cut_text(text: bytes, extended: bool = False) -> bytes:
    return struct.pack("!Bxxxi", 6, -len(text) if extended else len(text)) + text


def fence(flags: int, payload: bytes) -> bytes:
    return struct.pack("!BxxxIB", 248, flags, len(payload)) + payload


def continuous(enable: int) -> bytes:
    return struct.pack("!BBHHHH", 150, enable, 0, 0, 1280, 800)


def qemu_key(down: int, keysym: int, keycode: int) -> bytes:
    return struct.pack("!BBHII", 255, 0, down, keysym, keycode)


def set_desktop_size(screens: int) -> bytes:
    return struct.pack("!BxHHBx", 251, 640, 480, screens) + b"\x07" * (16 * screens)


u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
# (bytes, passes) pairs: every message type the filter knows.
passing = st.one_of(
    st.sampled_from([8, 16, 32]).map(set_pixel_format),
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=40).map(set_encodings),
    st.builds(update_request, st.integers(0, 1), u16, u16, u16, u16),
    st.builds(fence, u32, st.binary(max_size=64)),
    st.builds(continuous, st.integers(0, 1)),
).map(lambda m: (m, True))
dropped = st.one_of(
    st.builds(key_event, st.integers(0, 1), u32),
    st.builds(pointer_event, st.integers(0, 255), u16, u16),
    st.builds(cut_text, st.binary(max_size=300), st.booleans()),
    st.builds(qemu_key, u16, u32, u32),
    st.builds(set_desktop_size, st.integers(0, 4)),
).map(lambda m: (m, False))
messages = st.lists(st.one_of(passing, dropped), max_size=30)


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def run(pieces: list[bytes]) -> tuple[bytes, str | None]:
    f = ViewFilter()
    out = b"".join(f.feed(p) for p in pieces)
    return out, f.violation.code if f.violation else None


@settings(max_examples=300)
@given(messages, st.lists(st.integers(0, 10_000), max_size=40))
def test_any_chunking_passes_exactly_the_display_messages(msgs: list[tuple[bytes, bool]], points: list[int]) -> None:
    stream = HANDSHAKE + b"".join(m for m, _ in msgs)
    expected = HANDSHAKE_OUT + b"".join(m for m, passes in msgs if passes)
    assert run([stream]) == (expected, None)
    assert run(cuts(stream, points)) == (expected, None)
    assert run([bytes([b]) for b in stream]) == (expected, None)


@settings(max_examples=300)
@given(st.binary(max_size=200), st.lists(st.integers(0, 10_000), max_size=20))
def test_arbitrary_bytes_give_the_same_verdict_however_they_are_cut(tail: bytes, points: list[int]) -> None:
    for stream in (tail, HANDSHAKE + tail):
        assert run(cuts(stream, points)) == run([stream])


@settings(max_examples=200)
@given(messages, st.binary(min_size=1, max_size=50), st.lists(st.integers(0, 10_000), max_size=20))
def test_an_unknown_message_stops_everything_after_it(
    msgs: list[tuple[bytes, bool]], tail: bytes, points: list[int]
) -> None:
    before = HANDSHAKE + b"".join(m for m, _ in msgs)
    unknown = bytes([7]) + tail  # type 7 is no message of RFB's
    after = key_event(1, 0x61) + update_request(0, 0, 0, 10, 10)
    out, violation = run(cuts(before + unknown + after, points))
    assert violation == "rfb_unknown_message"
    assert out == HANDSHAKE_OUT + b"".join(m for m, passes in msgs if passes)


@given(st.lists(dropped, min_size=1, max_size=20))
def test_input_alone_yields_nothing_past_the_handshake(msgs: list[tuple[bytes, bool]]) -> None:
    f = ViewFilter()
    assert f.feed(HANDSHAKE) == HANDSHAKE_OUT
    for m, _ in msgs:
        assert f.feed(m) == b""
    assert (
        f.violation is None
        and sum(f.dropped.values()) == len(msgs)
        and set(f.passed)
        == {
            "ProtocolVersion",
            "SecurityType",
            "ClientInit",
        }
    )


def test_a_large_clipboard_is_skipped_as_it_comes_not_held() -> None:
    f = ViewFilter()
    f.feed(HANDSHAKE)
    assert f.feed(struct.pack("!Bxxxi", 6, 5_000_000)) == b""
    for _ in range(50):
        assert f.feed(b"k" * 100_000) == b""
        assert len(f._buffer) == 0  # nothing of a dropped body is kept
    assert f.feed(update_request(1, 0, 0, 1, 1)) == update_request(1, 0, 0, 1, 1)
    assert f.dropped == {"ClientCutText": 1}


def test_handshake_refusals() -> None:
    cases = {
        b"GET / HTTP/1.1\r\n": "rfb_bad_version",
        b"RFB 003.009\n": "rfb_bad_version",
        b"RFB 003.008\n\x02": "rfb_bad_security",  # VNC authentication: not what the desktop offers
        HANDSHAKE + set_pixel_format(24): "rfb_malformed",
        HANDSHAKE + struct.pack("!BBH", 2, 0, 5000): "rfb_malformed",
        HANDSHAKE + struct.pack("!Bxxxi", 6, MAX_CUT_TEXT + 1): "rfb_malformed",
        HANDSHAKE + struct.pack("!BxxxIB", 248, 0, 65): "rfb_malformed",
        HANDSHAKE + b"\xff\x01": "rfb_unknown_message",
        HANDSHAKE + b"\x01": "rfb_unknown_message",
    }
    for stream, code in cases.items():
        f = ViewFilter()
        f.feed(stream)
        assert f.violation is not None and f.violation.code == code, stream
        assert f.feed(update_request(0, 0, 0, 1, 1)) == b""  # broken for good


def test_version_3_3_has_no_security_choice() -> None:
    f = ViewFilter()
    assert f.feed(b"RFB 003.003\n\x00" + pointer_event(1, 5, 5) + update_request(0, 0, 0, 2, 2)) == (
        b"RFB 003.003\n\x01" + update_request(0, 0, 0, 2, 2)
    )
    assert f.dropped == {"PointerEvent": 1}
