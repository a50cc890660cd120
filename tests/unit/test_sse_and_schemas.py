from __future__ import annotations

import msgspec
import pytest

from orchestrator.client import SseParser
from orchestrator.errors import ServiceError
from orchestrator.hub import frame
from orchestrator.schemas import LifecycleJob, SessionCreate
from orchestrator.sse import MAX_FILTERS, EventFilter, parse_after


def test_frames_round_trip_through_the_parser() -> None:
    raw = frame("1-0", "session.ready", b'{"a": 1}') + b": keep-alive\n\n" + frame("2-5", "x", b"{}")
    parser = SseParser()
    events = [e for line in raw.decode().split("\n") if (e := parser.feed(line)) is not None]
    assert [(e.id, e.type, e.data) for e in events] == [("1-0", "session.ready", {"a": 1}), ("2-5", "x", {})]
    assert parser.last_id == "2-5"


def test_parse_after_prefers_the_header_and_validates() -> None:
    assert parse_after("5-1", "9-9") == "5-1"
    assert parse_after(None, "7") == "7-0"
    assert parse_after(None, None) is None
    with pytest.raises(ServiceError) as e:
        parse_after("abc", None)
    assert e.value.code == "invalid_event_id" and e.value.field == "Last-Event-ID"


def test_create_body_refuses_unknown_fields_and_bad_ids() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `x`"):
        msgspec.json.decode(b'{"x": 1}', type=SessionCreate)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.id"):
        msgspec.json.decode(b'{"id": "NO"}', type=SessionCreate)
    assert msgspec.json.decode(b"{}", type=SessionCreate) == SessionCreate()


def test_job_payload_is_validated() -> None:
    assert msgspec.convert({"session": "abc", "generation": 2}, LifecycleJob).generation == 2
    for bad in ({"session": "abc"}, {"session": "abc", "generation": 0}, {"session": "A", "generation": 1}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, LifecycleJob)


def test_tokens_parse_hash_and_check_scopes() -> None:
    from orchestrator.auth import AuthError, authenticate, authorize, hash_token, parse_tokens

    tokens = parse_tokens(f"ci:{hash_token('abc')}:sessions:write+events:read; ops:{hash_token('xyz')}:admin")
    assert [t.name for t in tokens] == ["ci", "ops"]
    ci = authenticate("Bearer abc", tokens)
    authorize(ci, "events:read")
    with pytest.raises(AuthError) as e:
        authorize(ci, "admin")
    assert e.value.status == 403
    authorize(authenticate("bearer xyz", tokens), "anything")  # admin may do everything
    for header in (None, "", "Bearer", "Basic abc", "Bearer wrong"):
        with pytest.raises(AuthError) as e:
            authenticate(header, tokens)
        assert e.value.status == 401
    for bad in ("x:nothex:admin", f"x:{hash_token('a')}:root", f"x:{hash_token('a')}", f"x:{hash_token('a')}:"):
        with pytest.raises(ValueError):
            parse_tokens(bad)


def test_an_oversized_event_keeps_its_envelope_and_says_its_data_was_dropped() -> None:
    import msgspec

    from orchestrator.events import MAX_EVENT_BYTES, encode_event, make_event
    from orchestrator.schemas import Event

    small = make_event("x.y", sandbox="s", session="abc", data={"k": "v"})
    assert msgspec.json.decode(encode_event(small), type=Event).data == {"k": "v"}
    big = make_event("x.y", sandbox="s", session="abc", data={"k": "v" * MAX_EVENT_BYTES})
    raw = encode_event(big)
    assert len(raw) < 1024
    decoded = msgspec.json.decode(raw, type=Event)
    assert decoded.type == "x.y" and decoded.session == "abc"
    assert decoded.data["truncated"] is True and decoded.data["bytes"] > MAX_EVENT_BYTES


def test_trace_ids_come_from_valid_traceparent_headers_only() -> None:
    from orchestrator.tracing import from_traceparent, traceparent

    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert from_traceparent(f"00-{trace}-00f067aa0ba902b7-01") == trace
    assert from_traceparent(f"00-{trace.upper()}-00f067aa0ba902b7-01") == trace
    for bad in (None, "", "garbage", f"00-{'0' * 32}-00f067aa0ba902b7-01", f"00-{trace}-short-01"):
        assert from_traceparent(bad) is None
    assert from_traceparent(traceparent(trace)) == trace


@pytest.mark.parametrize(
    "bad", ["\u0661\u0662\u0663", "1-\u0661", str(2**64), f"1-{2**64}", "1" * 21, "1-2-3", "-1", "1-"]
)
def test_event_ids_are_ascii_digits_within_uint64(bad: str) -> None:
    with pytest.raises(ServiceError) as e:
        parse_after(None, bad)
    assert e.value.code == "invalid_event_id" and e.value.field == "after"


def test_the_largest_event_id_is_accepted() -> None:
    top = str(2**64 - 1)
    assert parse_after(top, None) == f"{top}-0"
    assert parse_after(None, f"{top}-{top}") == f"{top}-{top}"


def test_filter_lists_are_bounded() -> None:
    EventFilter(types=tuple(f"t{i}" for i in range(MAX_FILTERS)))
    for too_many in (
        {"types": tuple(f"t{i}" for i in range(MAX_FILTERS + 1))},
        {"sessions": frozenset(f"s{i}" for i in range(MAX_FILTERS + 1))},
        {"labels": {f"k{i}": "v" for i in range(MAX_FILTERS + 1)}},
    ):
        with pytest.raises(ServiceError) as e:
            EventFilter(**too_many)
        assert e.value.code == "too_many_filters" and e.value.status == 400
