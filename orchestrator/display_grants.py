"""Display grants: what lets a browser's noVNC, whose WebSocket cannot send a header, open one
session's screen once, in one mode (``view`` or ``control``).

Modelled on port grants (orchestrator/port_grants.py), with three differences:

- **one use**: the WebSocket that presents it takes it (GET and DEL in one transaction), since
  the token travels in a URL; a reconnection asks for a new one;
- **short**: ``TTL_S`` to be used, whatever the connection lasts after;
- **its own keys**: under ``port-grant:display:<sha256>`` (the API's Redis ACL already has
  ``port-grant:*``), where no port grant is looked for, nor a display grant under a port
  grant's key: a display token opens no ``/ports/5900`` road and a port token no display."""

from __future__ import annotations

import time

import msgspec
import redis.asyncio as aioredis

from .auth import AuthError
from .keys import Keys
from .port_grants import TOKEN_RE, digest, new_token
from .rfb import DisplayMode

TTL_S = 60


class DisplayGrant(msgspec.Struct, frozen=True, kw_only=True):
    session: str
    mode: DisplayMode
    by: str  # the name of the API token that asked for it
    tenant: str | None  # whose sessions that token saw (None: every tenant's)
    expires_at: float  # Unix seconds


def grant_key(keys: Keys, token: str) -> str:
    return keys.port_grant("display:" + digest(token))


def verify(grant: DisplayGrant | None, session_id: str, now: float) -> DisplayGrant:
    """The grant, if it opens ``session_id``'s display at ``now``; else 401
    ``invalid_display_token`` (unknown, used or expired) or 403 ``display_token_mismatch``."""
    if grant is None or grant.expires_at <= now:
        raise AuthError(
            401, "invalid_display_token", "the display token is unknown, used or expired; ask for a new display URL"
        )
    if grant.session != session_id:
        raise AuthError(403, "display_token_mismatch", "the display token is for another session")
    return grant


class DisplayGrants:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def issue(
        self, session_id: str, mode: DisplayMode, *, by: str, tenant: str | None, ttl_s: int = TTL_S
    ) -> tuple[str, DisplayGrant]:
        token = new_token()
        grant = DisplayGrant(session=session_id, mode=mode, by=by, tenant=tenant, expires_at=time.time() + ttl_s)
        await self._redis.set(grant_key(self._keys, token), msgspec.json.encode(grant), ex=ttl_s)
        return token, grant

    async def take(self, token: str, session_id: str) -> DisplayGrant:
        """The grant, used up: a second connection with the same token is refused."""
        grant = None
        if TOKEN_RE.fullmatch(token):
            key = grant_key(self._keys, token)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(key)
                pipe.delete(key)
                raw, _ = await pipe.execute()
            if raw is not None:
                try:
                    grant = msgspec.json.decode(raw, type=DisplayGrant)
                except msgspec.DecodeError:
                    grant = None  # not ours to trust: refused like an unknown one
        return verify(grant, session_id, time.time())
