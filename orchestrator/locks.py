"""Per-session leases in Redis: at most one lifecycle operation per session runs at a time,
across every worker of every sandbox. A lease lapses by itself when its holder dies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from .keys import Keys

log = logging.getLogger("orchestrator.locks")

# Extend or release only a lease we still hold (compare the token first).
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Busy(Exception):
    """Another operation holds the session's lease."""


class SessionLocks:
    def __init__(self, redis: aioredis.Redis, keys: Keys, lease_s: float, owner: str) -> None:
        self._redis = redis
        self.keys = keys
        self.lease_ms = max(1000, int(lease_s * 1000))
        self.owner = owner
        self._renew = redis.register_script(_RENEW_LUA)
        self._release = redis.register_script(_RELEASE_LUA)

    async def holder(self, session_id: str) -> str | None:
        raw = await self._redis.get(self.keys.lock(session_id))
        return None if raw is None else raw.decode().rsplit(":", 1)[0]

    async def held(self, session_ids: list[str]) -> set[str]:
        """Which of these sessions someone holds the lease of."""
        if not session_ids:
            return set()
        values = await self._redis.mget([self.keys.lock(i) for i in session_ids])
        return {i for i, v in zip(session_ids, values, strict=True) if v is not None}

    @contextlib.asynccontextmanager
    async def hold(self, session_id: str, operation: str) -> AsyncIterator[None]:
        """Hold the session's lease for the block, renewing it; raise Busy if someone else has it."""
        key = self.keys.lock(session_id)
        token = f"{self.owner}/{operation}:{secrets.token_hex(4)}"
        if not await self._redis.set(key, token, nx=True, px=self.lease_ms):
            raise Busy(f"session {session_id!r} is busy ({await self.holder(session_id)})")
        renewer = asyncio.create_task(self._keep(key, token))
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            with contextlib.suppress(Exception):  # an unreleased lease lapses on its own
                await self._release(keys=[key], args=[token])

    async def _keep(self, key: str, token: str) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                if not await self._renew(keys=[key], args=[token, self.lease_ms]):
                    log.error("lost the lease %s (%s); another worker may act on this session", key, token)
                    return
            except Exception:
                log.exception("renewing %s failed; retrying", key)
