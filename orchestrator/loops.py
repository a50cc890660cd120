"""One way to run a background duty: ``every(interval, fn)``, under the caller's task group.

A failing run is logged and the duty goes on at the next tick: a duty never dies of one bad
pass (the reconciler, the heartbeat, the monitor all retry by simply running again)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn

import anyio
from redis.exceptions import RedisError

log = logging.getLogger("orchestrator.loops")


async def every(interval_s: float, duty: Callable[[], Awaitable[object]], name: str) -> NoReturn:
    """Run ``duty`` every ``interval_s`` seconds (the first after one interval), forever. The
    rate is fixed, start to start: a slow run (a heartbeat waiting on a busy dockerd) does not
    push the next one back, which matters when a peer judges liveness by the beats. Runs never
    overlap: one that overruns its interval is followed by the next at once."""
    next_run = anyio.current_time() + interval_s
    while True:
        await anyio.sleep(max(0.0, next_run - anyio.current_time()))
        next_run = max(next_run + interval_s, anyio.current_time())
        try:
            await duty()
        except (RedisError, OSError) as e:  # a dependency is away: expected, no traceback
            log.warning("%s failed (%s); next in %.1f s", name, e, interval_s)
        except Exception:
            log.exception("%s failed; next in %.1f s", name, interval_s)
