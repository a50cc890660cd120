"""Bearer tokens with scopes. Pure: parsing, hashing, checking; the API wires it in.

Tokens are configured by their SHA-256 (never in clear): ``ORCH_TOKENS`` holds entries
``name:sha256hex:scope+scope`` separated by ``;`` or newlines (``ORCH_TOKENS_FILE`` the same,
in a file). ``orchestrator token new`` makes one. Comparisons run in constant time, over every
configured token, and neither tokens nor their hashes are logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

SESSIONS_WRITE = "sessions:write"  # producers: create, stop, start, delete, read sessions
EVENTS_READ = "events:read"  # dashboards: event streams, read sessions
ADMIN = "admin"  # operators: everything, sandboxes, metrics
SCOPES = frozenset({SESSIONS_WRITE, EVENTS_READ, ADMIN})


@dataclass(frozen=True)
class Token:
    name: str
    digest: bytes
    scopes: frozenset[str]

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


def parse_tokens(spec: str) -> tuple[Token, ...]:
    tokens = []
    for number, raw_entry in enumerate(spec.replace("\n", ";").split(";"), start=1):
        entry = raw_entry.strip()
        if not entry or entry.startswith("#"):
            continue
        parts = entry.split(":", 2)  # scopes contain ':' themselves
        if len(parts) != 3:
            # Never quote the entry: a raw token pasted here would land in the startup log.
            raise ValueError(f"ORCH_TOKENS entry {number} must look like name:sha256hex:scope+scope")
        name, digest, scopes = parts
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"token {name!r}: the hash must be 64 lowercase hex digits (sha256)")
        wanted = frozenset(s for s in scopes.replace(",", "+").split("+") if s)
        unknown = wanted - SCOPES
        if unknown or not wanted:
            raise ValueError(f"token {name!r}: unknown or missing scopes {sorted(unknown)}; use {sorted(SCOPES)}")
        tokens.append(Token(name, bytes.fromhex(digest), wanted))
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
