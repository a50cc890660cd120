"""Display grants' checks (orchestrator/display_grants.py), pure: expiry, session binding, the
mode they carry, and keys apart from port grants'."""

from __future__ import annotations

import pytest

from orchestrator.auth import AuthError
from orchestrator.display_grants import DisplayGrant, grant_key, verify
from orchestrator.keys import Keys
from orchestrator.port_grants import digest
from orchestrator.rfb import DisplayMode

GRANT = DisplayGrant(session="s-a", mode=DisplayMode.VIEW, by="alice", tenant=None, expires_at=1000.0)


def test_a_live_grant_opens_its_own_session_in_its_mode() -> None:
    assert verify(GRANT, "s-a", 999.0).mode is DisplayMode.VIEW


@pytest.mark.parametrize(
    ("grant", "session", "now", "status", "code"),
    [
        (None, "s-a", 0.0, 401, "invalid_display_token"),
        (GRANT, "s-a", 1000.0, 401, "invalid_display_token"),  # expired at its second
        (GRANT, "s-b", 999.0, 403, "display_token_mismatch"),
    ],
)
def test_refusals(grant: DisplayGrant | None, session: str, now: float, status: int, code: str) -> None:
    with pytest.raises(AuthError) as refused:
        verify(grant, session, now)
    assert (refused.value.status, refused.value.code) == (status, code)


def test_a_display_grant_lives_where_no_port_grant_is_looked_for() -> None:
    keys = Keys("orchestrator:")
    token = "A" * 22
    assert grant_key(keys, token) != keys.port_grant(digest(token))
    assert grant_key(keys, token).startswith(keys.port_grant(""))  # inside the API's ACL pattern
