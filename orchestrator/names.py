"""Deterministic names: ids, Docker object names and labels, the depth → address pool rule.
Every step can be retried and every object re-adopted by name. Redis keys: keys.py."""

from __future__ import annotations

import re
import secrets

SESSION_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")
SANDBOX_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# A tenant names a Redis key (its session set) and goes into events unescaped: keep it plain.
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# Whose sessions are those of a token without a tenant, of a record written before tenancy
# and of a producer's create job (it bypasses the API and its tokens).
DEFAULT_TENANT = "default"

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
