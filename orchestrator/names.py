"""Deterministic names: every step can be retried and every object re-adopted by name."""

from __future__ import annotations

import re
import secrets

SESSION_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")
SANDBOX_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

LABEL_SESSION = "orchestrator.session"
LABEL_GENERATION = "orchestrator.generation"
LABEL_SANDBOX = "orchestrator.sandbox"
LABEL_DEPTH = "orchestrator.depth"
LABEL_ROLE = "orchestrator.role"

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def is_valid_session_id(value: str) -> bool:
    return SESSION_ID_RE.fullmatch(value) is not None


def new_session_id() -> str:
    # "s-" keeps generated ids apart from most client-chosen ones; 16 chars ~ 82 bits.
    return "s-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(16))


def volume_name(session_id: str) -> str:
    return f"docker-data-{session_id}"


def desktop_name(session_id: str) -> str:
    return f"desktop-{session_id}"


def address_pool(depth: int) -> str:
    """The /16 the dockerd at ``depth`` cuts its networks from (in /24s)."""
    if not 0 <= depth <= 43:
        raise ValueError(f"depth {depth} is outside 0..43 (10.(212+depth) must stay a valid octet)")
    return f"10.{212 + depth}.0.0/16"


def job_id(operation: str, session_id: str, generation: int) -> str:
    """The same (operation, session, generation) enqueued twice runs once."""
    return f"{operation}:{session_id}:{generation}"


class Keys:
    """Redis keys, all under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def session(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def session_env(self, session_id: str) -> str:
        return f"{self.prefix}session-env:{session_id}"

    def lock(self, session_id: str) -> str:
        return f"{self.prefix}lock:{session_id}"

    @property
    def session_index(self) -> str:
        return f"{self.prefix}sessions"

    @property
    def firehose(self) -> str:
        return f"{self.prefix}events"

    def session_events(self, session_id: str) -> str:
        return f"{self.prefix}events:session:{session_id}"

    def sandbox(self, sandbox_id: str) -> str:
        return f"{self.prefix}sandbox:{sandbox_id}"

    @property
    def sandbox_index(self) -> str:
        return f"{self.prefix}sandboxes"

    def queue(self, sandbox_id: str) -> str:
        return f"{self.prefix}queue:{sandbox_id}"

    def pool(self, sandbox_id: str) -> str:
        """The sandbox's warm desktops, ready and unclaimed: a list of their (pre-chosen) session ids."""
        return f"{self.prefix}pool:{sandbox_id}"

    def placed(self, sandbox_id: str) -> str:
        """Ids of the sessions placed on the sandbox and not deleted: what its cap counts."""
        return f"{self.prefix}placed:{sandbox_id}"

    def sandbox_alive(self, sandbox_id: str) -> str:
        """Set by every heartbeat with the sandbox's lost_after_s as expiry (Redis's clock)."""
        return f"{self.prefix}sandbox-alive:{sandbox_id}"

    def sandbox_drain(self, sandbox_id: str) -> str:
        """Present while the sandbox drains: "api" (stays drained until undrained) or "signal"."""
        return f"{self.prefix}sandbox-drain:{sandbox_id}"

    def sandbox_lost(self, sandbox_id: str) -> str:
        """Set once a silent sandbox has been declared unavailable (one declaration per outage)."""
        return f"{self.prefix}sandbox-lost:{sandbox_id}"
