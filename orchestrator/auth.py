"""Bearer tokens with scopes. Pure: parsing, hashing, checking; the API wires it in.

Tokens are configured by their SHA-256 (never in clear): ``ORCH_TOKENS`` holds entries
``name:sha256hex:scope+scope[:tenant=NAME]`` separated by ``;`` or newlines (``ORCH_TOKENS_FILE``
the same, in a file). ``orchestrator token new`` makes one. Comparisons run in constant time,
over every configured token, and neither tokens nor their hashes are logged.

Tenancy: a token belongs to a tenant (``default`` when its entry names none). Its sessions are
its tenant's; it sees and acts on no other tenant's. ``admin`` sees and acts on every tenant's.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from .names import DEFAULT_TENANT, TENANT_RE

SESSIONS_WRITE = "sessions:write"  # producers: create, stop, start, delete, read sessions
EVENTS_READ = "events:read"  # dashboards: event streams, read sessions
ADMIN = "admin"  # operators: everything, sandboxes, metrics
SESSIONS_EXEC = "sessions:exec"  # reach inside a desktop: exec (later terminals, files, ports)
SCOPES = frozenset({SESSIONS_WRITE, EVENTS_READ, ADMIN, SESSIONS_EXEC})


@dataclass(frozen=True)
class Token:
    name: str
    digest: bytes
    scopes: frozenset[str]
    tenant: str = DEFAULT_TENANT

    @property
    def sees_all(self) -> bool:
        """Admin tokens are fleet-wide: every tenant's sessions and events, and sandbox events."""
        return ADMIN in self.scopes

    @property
    def visible_tenant(self) -> str | None:
        """The one tenant whose sessions and events this token sees; None: every tenant's."""
        return None if self.sees_all else self.tenant

    def allows(self, *any_of: str) -> bool:
        return ADMIN in self.scopes or any(s in self.scopes for s in any_of)


class AuthError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def new_token() -> str:
    return "orch_" + secrets.token_urlsafe(32)


def token_entry(name: str, raw: str, scopes: list[str], tenant: str | None = None) -> str:
    """The ORCH_TOKENS entry for ``raw`` (its hash, never itself)."""
    entry = f"{name}:{hash_token(raw)}:{'+'.join(scopes)}"
    return entry if tenant is None else f"{entry}{_TENANT_FIELD}{tenant}"


# The optional last field of an entry. Scopes contain ':' themselves (``sessions:write``), so
# the tenant is named, not positional: no scope contains "tenant=", so this marker is unambiguous
# and every entry written before tenancy parses as it did (into the default tenant).
_TENANT_FIELD = ":tenant="


def parse_tokens(spec: str) -> tuple[Token, ...]:
    tokens = []
    for number, raw_entry in enumerate(spec.replace("\n", ";").split(";"), start=1):
        entry = raw_entry.strip()
        if not entry or entry.startswith("#"):
            continue
        parts = entry.split(":", 2)  # scopes contain ':' themselves
        if len(parts) != 3:
            # Never quote the entry: a raw token pasted here would land in the startup log.
            raise ValueError(f"ORCH_TOKENS entry {number} must look like name:sha256hex:scope+scope[:tenant=NAME]")
        name, digest, rest = parts
        scopes, named, tenant = rest.partition(_TENANT_FIELD)
        if not named:
            tenant = DEFAULT_TENANT
        elif not TENANT_RE.fullmatch(tenant):
            # Not quoted either: whatever was pasted there stays out of the log.
            raise ValueError(f"token {name!r}: the tenant must match {TENANT_RE.pattern}")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"token {name!r}: the hash must be 64 lowercase hex digits (sha256)")
        wanted = frozenset(s for s in scopes.replace(",", "+").split("+") if s)
        unknown = wanted - SCOPES
        if unknown or not wanted:
            raise ValueError(f"token {name!r}: unknown or missing scopes {sorted(unknown)}; use {sorted(SCOPES)}")
        tokens.append(Token(name, bytes.fromhex(digest), wanted, tenant))
    return tuple(tokens)


def authenticate(authorization: str | None, tokens: tuple[Token, ...]) -> Token:
    if not tokens:
        raise AuthError(401, "unauthorized", "no API tokens are configured on this server (ORCH_TOKENS)")
    if not authorization:
        raise AuthError(401, "unauthorized", "missing Authorization: Bearer <token>")
    scheme, _, raw = authorization.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise AuthError(401, "unauthorized", "the Authorization header must be 'Bearer <token>'")
    presented = hashlib.sha256(raw.strip().encode()).digest()
    found = None
    for token in tokens:  # no early exit: the time taken does not tell which entry matched
        if hmac.compare_digest(presented, token.digest):
            found = token
    if found is None:
        raise AuthError(401, "unauthorized", "the token is not valid")
    return found


def authorize(token: Token, *any_of: str) -> None:
    if not token.allows(*any_of):
        raise AuthError(
            403, "forbidden", f"token {token.name!r} lacks the scope for this (needs one of: {', '.join(any_of)})"
        )
