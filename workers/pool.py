"""The warm pool: desktops made ahead of demand, dockerd ready, for creates that take the
sandbox's defaults (see ``orchestrator.service.warm_eligible``). One pool per flavor, each with
its own target and list (``Keys.pool``): minimal desktops, and graphical ones with the default
screen (display.ready seen too), so a claim gets the flavor it asked for.

Each pooled desktop is made under a session id chosen in advance, with a fresh volume named
for it, so a claim renames nothing: the API pops the id from its flavor's pool list and
stores that session's record in the same Lua script (``SessionStore.place``), and every
later operation finds the desktop and volume by the usual names. A pooled desktop never served
anyone before: each is made new, and a claimed one leaves the pool for good.

The plan is pure (``plan_pool``); ``WarmPool`` is the thin loop that carries it out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis

from orchestrator.keys import Keys
from orchestrator.names import new_session_id
from orchestrator.schemas import DisplaySize, Flavor

from .runtime import DesktopError, Runtime

log = logging.getLogger("workers.pool")


@dataclass(frozen=True)
class PoolPlan:
    make: int
    # Pooled ids to drop: their desktop is gone or stopped, or the pool is over its target.
    drop: tuple[str, ...]


# The flavors the pool keeps, in the order a pass serves them.
FLAVORS: tuple[Flavor, ...] = ("minimal", "graphical")


def plan_pool(target: int, pooled: list[str], running: set[str] | None, making: int) -> PoolPlan:
    """One flavor's plan. ``pooled``: its pool list, oldest first; ``running``: session ids
    whose desktop runs (None: not looked at this time); ``making``: its desktops being made now."""
    dead = [i for i in pooled if running is not None and i not in running]
    alive = [i for i in pooled if i not in dead]
    # Over target (it was lowered): drop the newest, keep the oldest (first to be claimed).
    extra = alive[target:] if len(alive) > target else []
    return PoolPlan(make=max(0, target - len(alive) - making), drop=tuple(dead + extra))


class WarmPool:
    def __init__(
        self,
        runtime: Runtime,
        redis: aioredis.Redis,
        keys: Keys,
        sandbox_id: str,
        *,
        targets: Mapping[Flavor, int],
        ready_timeout_s: float,
        check_interval_s: float = 0.1,
        audit_interval_s: float = 5.0,
        prepare: Callable[[Flavor], Awaitable[None]] | None = None,
    ) -> None:
        self.runtime = runtime
        self.redis = redis
        self.keys = {flavor: keys.pool(sandbox_id, flavor) for flavor in FLAVORS}
        # One making set for every flavor: the reconciler's evidence, whatever was being made.
        self.making_key = keys.pool_making(sandbox_id)
        self.targets: dict[Flavor, int] = {flavor: targets.get(flavor, 0) for flavor in FLAVORS}
        self.ready_timeout_s = ready_timeout_s
        self.check_interval_s = check_interval_s
        self.audit_interval_s = audit_interval_s
        # Run before making a desktop (the worker's: image ensured, privilege profile decided).
        self.prepare = prepare
        self.making: dict[str, Flavor] = {}
        self.removing: set[str] = set()
        self.made = 0
        self.failures = 0
        # Per flavor, after a failed make: when it may try again, and the wait it got.
        self._retry_at: dict[Flavor, float] = {}
        self._backoff: dict[Flavor, float] = {}

    @property
    def target(self) -> int:
        """Every flavor's target together (what the heartbeat reports)."""
        return sum(self.targets.values())

    def stop_refilling(self) -> None:
        """Targets to 0 (a drain: pooled desktops can no longer be claimed); the loop removes them."""
        self.targets = dict.fromkeys(FLAVORS, 0)

    async def pooled(self, flavor: Flavor | None = None) -> list[str]:
        """The ready ids of ``flavor``'s pool, oldest first (None: of every pool)."""
        flavors = FLAVORS if flavor is None else (flavor,)
        found: list[str] = []
        for f in flavors:
            found += [i.decode() if isinstance(i, bytes) else i for i in await self.redis.lrange(self.keys[f], 0, -1)]  # type: ignore[misc]
        return found

    async def ready_by_flavor(self) -> dict[Flavor, int]:
        return {flavor: len(await self.pooled(flavor)) for flavor in FLAVORS}

    async def known(self) -> set[str]:
        """Ids the pool owns (ready or being made): the reconciler must not take them for orphans.
        Read this before the session records: a claim moves an id from here to a record atomically."""
        return self.owned(await self.pooled())

    async def leftovers(self, present: set[str]) -> set[str]:
        """Ids in the making set that no make of this process is on: an earlier run's (or a
        failed cleanup's) half-made desktops, never handed out, so the reconciler may remove
        their objects. ``present``: the sessions with objects now; the rest are forgotten."""
        ids = {i.decode() if isinstance(i, bytes) else i for i in await self.redis.smembers(self.making_key)}  # type: ignore[misc]
        ids -= self.making.keys() | self.removing
        gone = ids - present
        if gone:
            await self.redis.srem(self.making_key, *gone)  # type: ignore[misc]
        return ids - gone

    def owned(self, pooled: list[str]) -> set[str]:
        """``pooled`` (a read of the lists) plus the desktops being made or removed."""
        return set(pooled) | self.making.keys() | self.removing

    async def run_forever(self) -> None:
        last_audit = 0.0
        backoff = self.check_interval_s
        while True:
            try:
                audit = time.monotonic() - last_audit >= self.audit_interval_s
                running = None
                if audit:
                    last_audit = time.monotonic()
                    running = {d.session for d in await self.runtime.desktops.list_desktops() if d.running}
                wanting: Flavor | None = None
                now = time.monotonic()
                for flavor in FLAVORS:
                    making = sum(1 for f in self.making.values() if f == flavor)
                    plan = plan_pool(self.targets[flavor], await self.pooled(flavor), running, making)
                    for session_id in plan.drop:
                        await self._drop(flavor, session_id)
                    if plan.make and wanting is None and self._retry_at.get(flavor, 0.0) <= now:
                        wanting = flavor
                if wanting is not None:
                    # One at a time: refilling should not starve the creates that emptied the pool.
                    try:
                        await self._make_one(wanting)
                    except DesktopError as e:
                        self._hold(wanting, e)
                        continue
                    self._retry_at.pop(wanting, None)
                    self._backoff.pop(wanting, None)
                    backoff = self.check_interval_s
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failures += 1
                log.exception("warm pool: pass failed; retrying in %.1f s", backoff)
                backoff = min(30.0, backoff * 4)
                await asyncio.sleep(backoff)
                continue
            # With the pool off, only the (rare) audit has work: dropping what an earlier run left.
            await asyncio.sleep(self.check_interval_s if self.target else self.audit_interval_s)

    def _hold(self, flavor: Flavor, error: DesktopError) -> None:
        """A coded failure (the graphical image missing, a dockerd too slow) holds back that
        flavor's pool alone, with its own backoff: the other flavor's refills go on."""
        self.failures += 1
        wait = min(30.0, self._backoff.get(flavor, self.check_interval_s) * 4)
        self._backoff[flavor] = wait
        self._retry_at[flavor] = time.monotonic() + wait
        log.warning("warm pool: making a %s desktop failed (%s); that pool retries in %.1f s", flavor, error, wait)

    async def _make_one(self, flavor: Flavor) -> None:
        if self.prepare is not None:
            await self.prepare(flavor)
        # A pooled graphical desktop has the default screen: only a request for it claims one.
        display = DisplaySize() if flavor == "graphical" else None
        session_id = new_session_id()
        self.making[session_id] = flavor
        try:
            # In Redis before any object exists: the only evidence that lets the reconciler
            # remove what a crash here leaves (a wiped Redis leaves none, so nothing is removed).
            await self.redis.sadd(self.making_key, session_id)  # type: ignore[misc]
            await self.runtime.desktops.ensure_volume(session_id)
            await self.runtime.desktops.create(session_id, 1, display=display)
            started = time.monotonic()
            await self.runtime.desktops.start(session_id)
            info = await self.runtime.inner.wait_ready(session_id, started, self.ready_timeout_s)
            screen = ""
            if display is not None:
                shown = await self.runtime.inner.wait_display(session_id, started, self.ready_timeout_s)
                screen = f", display {shown.duration_ms} ms"
            async with self.redis.pipeline(transaction=True) as pipe:  # made: from one set to the list
                pipe.rpush(self.keys[flavor], session_id)
                pipe.srem(self.making_key, session_id)
                await pipe.execute()
            self.made += 1
            log.info("warm pool: %s %s ready (dockerd %d ms%s)", flavor, session_id, info.duration_ms, screen)
        except BaseException:
            # Never leave a half-made desktop behind (the reconciler would, after its grace).
            with contextlib.suppress(Exception):
                await asyncio.shield(self._remove(session_id))
            raise
        finally:
            self.making.pop(session_id, None)

    async def shrink(self) -> int:
        """Remove every warm desktop now (a drain: they can no longer be claimed)."""
        self.stop_refilling()
        removed = 0
        for flavor in FLAVORS:
            ids = await self.pooled(flavor)
            for session_id in ids:
                await self._drop(flavor, session_id)
            removed += len(ids)
        return removed

    async def _drop(self, flavor: Flavor, session_id: str) -> None:
        # Only if still unclaimed: LREM says whether this id was in the list.
        if await self.redis.lrem(self.keys[flavor], 1, session_id):  # type: ignore[misc]
            log.info("warm pool: dropping %s %s", flavor, session_id)
            await self._remove(session_id)

    async def _remove(self, session_id: str) -> None:
        self.removing.add(session_id)  # still ours until gone: not an orphan for the reconciler
        try:
            await self.runtime.desktops.remove(session_id, stop_timeout=2)
            await self.runtime.desktops.remove_volume(session_id)
            await self.redis.srem(self.making_key, session_id)  # type: ignore[misc]
        except DesktopError:
            log.exception("warm pool: could not remove %s; the reconciler will", session_id)
        finally:
            self.removing.discard(session_id)
        self.runtime.desktops.remove_socket_dir(session_id)
