"""Port URLs' grants: what lets a browser (an iframe, a link) that cannot send a header reach
one port of one session for a short while.

A grant is a random 128-bit token, given once in the URL ``POST .../ports/{port}/url`` returns
(``?port_token=``), then carried by an HttpOnly cookie whose Path is that port's prefix. Redis
holds it under the token's SHA-256 (never the token), with the grant's TTL: an expired grant is
no key at all. It opens that session's that port and nothing else; no other route reads it."""

from __future__ import annotations

import hashlib
import re
import secrets
import time

import msgspec
import redis.asyncio as aioredis

from .auth import AuthError
from .keys import Keys

TOKEN_BYTES = 16  # 128 bits
# What token_urlsafe(16) makes: 22 characters of the URL-safe alphabet. Anything else is refused
# before any lookup (a made-up value costs no Redis trip and lands in no key).
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")


class PortGrant(msgspec.Struct, frozen=True, kw_only=True):
    session: str
    port: int
    by: str  # the name of the API token that asked for it
    tenant: str | None  # whose sessions that token saw (None: every tenant's, an admin's)
    expires_at: float  # Unix seconds


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def verify(grant: PortGrant | None, session_id: str, port: int, now: float) -> PortGrant:
    """The grant, if it opens ``port`` of ``session_id`` at ``now``; else the refusal: 401
    ``invalid_port_token`` (unknown or expired), 403 ``port_token_mismatch`` (another session's
    or another port's)."""
    if grant is None or grant.expires_at <= now:
        raise AuthError(401, "invalid_port_token", "the port token is unknown or has expired; ask for a new port URL")
    if grant.session != session_id or grant.port != port:
        raise AuthError(403, "port_token_mismatch", "the port token is for another session or port")
    return grant


class PortGrants:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def issue(
        self, session_id: str, port: int, *, by: str, tenant: str | None, ttl_s: int
    ) -> tuple[str, PortGrant]:
        token = new_token()
        grant = PortGrant(session=session_id, port=port, by=by, tenant=tenant, expires_at=time.time() + ttl_s)
        await self._redis.set(self._keys.port_grant(digest(token)), msgspec.json.encode(grant), ex=ttl_s)
        return token, grant

    async def check(self, token: str, session_id: str, port: int) -> PortGrant:
        grant = None
        if TOKEN_RE.fullmatch(token):
            raw = await self._redis.get(self._keys.port_grant(digest(token)))
            if raw is not None:
                try:
                    grant = msgspec.json.decode(raw, type=PortGrant)
                except msgspec.DecodeError:
                    grant = None  # not ours to trust: refused like an unknown one
        return verify(grant, session_id, port, time.time())
