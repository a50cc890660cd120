"""Per-session leases in Redis: at most one lifecycle operation per session runs at a time,
across every worker of every sandbox. A lease lapses by itself when its holder dies.

A lease is also a fence. ``hold`` runs its block under a cancel scope that the renewer
cancels as soon as the lease is lost (a renewal answered 0, or renewals failed for as long
as the lease lasts), so a holder that lost its lease stops at its next await; and its token
is a fencing token: the store refuses a transition that carries it once the lock key holds
another value (store.CAS_LUA), which covers the moment between the loss and the cancel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import redis.asyncio as aioredis

from .errors import CodedError
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


class LeaseLost(CodedError):
    """The session's lease lapsed or was taken while its holder was acting: the holder was
    stopped (or one of its transitions refused) so that it does not race the next holder."""

    def __init__(self, session_id: str, why: str) -> None:
        super().__init__("lease_lost", f"lost the lease of session {session_id!r}: {why}")
        self.session_id = session_id


@dataclass
class Lease:
    """A held lease: ``token`` is the fencing token the store checks transitions against."""

    session_id: str
    key: str
    token: str
    lost: str | None = None  # why, once lost
    released: bool = False  # the block ended: the renewer stops, whatever became of a cancel
    _scope: anyio.CancelScope = field(default_factory=anyio.CancelScope, repr=False)


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
    async def hold(self, session_id: str, operation: str) -> AsyncIterator[Lease]:
        """Hold the session's lease for the block, renewing it; raise Busy if someone else has
        it. A lost lease cancels the block, which then raises LeaseLost."""
        key = self.keys.lock(session_id)
        lease = Lease(session_id, key, f"{self.owner}/{operation}:{secrets.token_hex(4)}")
        acquired_at = time.monotonic()
        if not await self._redis.set(key, lease.token, nx=True, px=self.lease_ms):
            raise Busy(f"session {session_id!r} is busy ({await self.holder(session_id)})")
        # A task, not a task group: a group would wrap the block's own exceptions in a group.
        renewer = asyncio.create_task(self._keep(lease, acquired_at))
        try:
            with lease._scope:
                yield lease
        except Exception as e:
            if lease.lost is not None:  # e.g. a transition the store refused for the fence
                raise LeaseLost(session_id, lease.lost) from e
            raise
        finally:
            # Never wait on the renewer unbounded: a cancellation racing one of its timeouts
            # can be absorbed, and a renewer that lives on keeps the lease forever (seen: a
            # create that never returned and a delete Busy behind it for minutes).
            lease.released = True
            renewer.cancel()
            await asyncio.wait({renewer}, timeout=self.lease_ms / 1000)
            # Shielded (a cancelled block still releases) and bounded; an unreleased lease lapses.
            bounded = anyio.move_on_after(self.lease_ms / 1000)
            with contextlib.suppress(Exception), anyio.CancelScope(shield=True), bounded:
                await self._release(keys=[key], args=[lease.token])
        if lease.lost is not None:
            # The block was cancelled (its CancelledError ends in the scope): say why.
            raise LeaseLost(session_id, lease.lost)

    async def _keep(self, lease: Lease, renewed_at: float) -> None:
        """Renew every third of the lease; cancel the block once the lease is lost. A renewal
        waits no longer than the lease has left (a paused Redis answers nothing at all), or a
        tenth of the lease when none is left (the loop was busy): a 1 from Redis still proves
        the lease held, since the script extends only the token it finds."""
        lease_s = self.lease_ms / 1000
        while True:
            await asyncio.sleep(lease_s / 3)
            if lease.released:
                return
            sent = time.monotonic()
            answer: int | None = None
            try:
                # asyncio's own timeout (not anyio's scope inside a plain task): an external
                # cancel arriving as it expires still ends the task.
                async with asyncio.timeout(max(lease_s / 10, renewed_at + lease_s - sent)):
                    answer = int(await self._renew(keys=[lease.key], args=[lease.token, self.lease_ms]))
            except TimeoutError:
                pass
            except Exception:
                log.exception("renewing %s failed; retrying", lease.key)
            if lease.released:
                return
            if answer == 1:
                renewed_at = sent  # Redis's expiry is at least this far out
            elif answer == 0:
                self._lose(lease, "another holder has it or it lapsed")
                return
            elif time.monotonic() >= renewed_at + lease_s:
                self._lose(lease, f"no renewal succeeded for {lease_s:g} s")
                return

    def _lose(self, lease: Lease, why: str) -> None:
        log.error("lost the lease %s (%s): %s; stopping its operation", lease.key, lease.token, why)
        lease.lost = why
        lease._scope.cancel()
