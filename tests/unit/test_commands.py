"""The command stream's pure parts: the ids a command derives, the codes a bad one gets, and
which events claim a command's request id."""

from __future__ import annotations

import msgspec
import pytest

from orchestrator.commands import _decode, _decode_error, exec_id_for, session_id_for
from orchestrator.events import command_request, command_request_of, command_trace, make_event
from orchestrator.names import is_valid_session_id
from orchestrator.service import id_from_idempotency_key


def test_a_create_commands_session_id_is_its_tenants_and_request_ids_alone() -> None:
    one = session_id_for("default", "r-1")
    assert is_valid_session_id(one) and one.startswith("c-")
    assert one == session_id_for("default", "r-1")  # a retry finds the first
    assert len({one, session_id_for("default", "r-2"), session_id_for("acme", "r-1")}) == 3
    # Never an HTTP Idempotency-Key's session, nor an exec's id.
    assert one != id_from_idempotency_key("r-1") and exec_id_for("default", "r-1") != one


def test_only_the_job_a_command_enqueued_claims_its_request_id() -> None:
    trace = command_trace("default", "r-1")
    assert command_request_of("r-1", "default", trace) == "r-1"
    assert command_request_of("r-1", "default", "0" * 32) is None  # an HTTP request's job, a TTL's
    assert command_request_of("r-1", "default", None) is None  # a reconcile pass's
    assert command_request_of("r-1", "acme", trace) is None
    assert command_request_of(None, "default", trace) is None


def test_events_made_while_a_command_acts_carry_its_request_id() -> None:
    assert "request_id" not in make_event("session.pending", sandbox="s", data={"a": 1}).data
    token = command_request.set("r-9")
    try:
        assert make_event("session.pending", sandbox="s", data={"a": 1}).data == {"a": 1, "request_id": "r-9"}
        assert make_event("desktop.started", sandbox="s").data == {"request_id": "r-9"}
        # An event that names its own (an exec's) keeps it.
        assert make_event("exec.exited", sandbox="s", data={"request_id": "mine"}).data == {"request_id": "mine"}
    finally:
        command_request.reset(token)


@pytest.mark.parametrize(
    ("raw", "code", "field"),
    [
        (b"{nope", "invalid_json", None),
        (b"[1]", "invalid_request", None),
        (b'{"op": "resize", "request_id": "r", "session": "abc"}', "unknown_op", "op"),
        (b'{"request_id": "r"}', "invalid_request", "op"),
        (b'{"op": "stop", "request_id": "r"}', "invalid_request", "session"),
        (b'{"op": "stop", "request_id": "r", "session": "Not-An-Id"}', "invalid_session_id", "session"),
        (b'{"op": "delete", "request_id": " r", "session": "abc"}', "invalid_request_id", "request_id"),
        (b'{"op": "create", "request_id": "r", "ttl_seconds": 0}', "invalid_request", "ttl_seconds"),
        (b'{"op": "create", "request_id": "r", "colour": "red"}', "invalid_request", "colour"),
    ],
)
def test_a_bad_command_gets_a_precise_code(raw: bytes, code: str, field: str | None) -> None:
    with pytest.raises(msgspec.DecodeError) as caught:
        _decode(raw)
    assert _decode_error(raw, caught.value) == (code, field)
