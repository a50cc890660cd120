"""The graphical flavor against the minimal one, in the same run, through the API and a worker
(real processes): a cold start to display.ready (graphical) against a cold start to
dockerd.ready (minimal), and a warm claim of each flavor from its pool (POST → the record,
born ready; and POST → session.ready seen on the SSE stream). The image must be built
(scripts/build-images.sh --graphical); ORCH_GRAPHICAL_IMAGE names another."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import redis.asyncio as aioredis

from orchestrator.client import Client, ServerEvent
from orchestrator.keys import Keys
from orchestrator.schemas import Flavor

from .harness import Result, Services, Side, alternate, services
from .scenarios import Scenario, delete, ready_client

TIMEOUT_S = 180.0


def _data(events: list[ServerEvent], type: str) -> dict[str, Any]:
    found: dict[str, Any] = next(e for e in events if e.type == type).data["data"]
    return found


async def cold(n: int) -> list[Result]:
    """POST → display.ready seen (graphical) against POST → dockerd.ready seen (minimal), the pool
    off, alternating which goes first. The notes have what the worker measured from the
    desktop's start (the events' duration_ms) and the marker's own counts."""
    result = Result(
        "graphical cold", "s", Side("graphical: POST → display.ready"), Side("minimal: POST → dockerd.ready")
    )
    measured: dict[str, list[float]] = {
        "graphical dockerd.ready after start, ms": [],
        "graphical display.ready after start, ms": [],
        "minimal dockerd.ready after start, ms": [],
        "marker since_init_ms": [],
        "marker start_ms (Xvnc to an answer)": [],
    }
    with services() as svc:
        client = await ready_client(svc)
        async with client:

            async def one(flavor: Flavor) -> float:
                awaited = "display.ready" if flavor == "graphical" else "dockerd.ready"
                started = time.perf_counter()
                record = await client.create(flavor=flavor)
                events = await client.wait_for(record.id, {awaited, "session.failed"}, timeout=TIMEOUT_S)
                elapsed = time.perf_counter() - started
                try:
                    if events[-1].type != awaited:
                        raise RuntimeError(f"{flavor}: {events[-1].data.get('data')}")
                    dockerd = _data(events, "dockerd.ready")
                    if flavor == "graphical":
                        screen = _data(events, "display.ready")
                        measured["graphical dockerd.ready after start, ms"].append(dockerd["duration_ms"])
                        measured["graphical display.ready after start, ms"].append(screen["duration_ms"])
                        measured["marker since_init_ms"].append(screen.get("since_init_ms") or 0)
                        measured["marker start_ms (Xvnc to an answer)"].append(screen.get("start_ms") or 0)
                    else:
                        measured["minimal dockerd.ready after start, ms"].append(dockerd["duration_ms"])
                finally:
                    await client.wait_for(record.id, {"session.ready", "session.failed"}, timeout=TIMEOUT_S)
                    await delete(client, record.id)  # untimed, and done before the next round
                return elapsed

            await alternate(n, lambda: one("graphical"), lambda: one("minimal"), result)
    for name, values in measured.items():
        if values:
            result.notes[f"{name} (p50)"] = statistics.median(values)
    result.notes["ratio"] = "graphical to its screen against minimal to its dockerd"
    return [result]


async def warm(n: int) -> list[Result]:
    """A warm claim of each flavor, one desktop in each pool (ORCH_POOL_SIZE=1,
    ORCH_WARM_POOL_GRAPHICAL=1); the refill between claims is waited for, untimed."""
    record = Result("graphical warm (record)", "s", Side("graphical: POST → record"), Side("minimal: POST → record"))
    ready = Result(
        "graphical warm (ready)", "s", Side("graphical: POST → session.ready"), Side("minimal: POST → session.ready")
    )
    with services(ORCH_POOL_SIZE="1", ORCH_WARM_POOL_GRAPHICAL="1") as svc:
        client = await ready_client(svc)
        redis = aioredis.Redis.from_url(svc.redis_url)
        keys = Keys(svc.key_prefix)
        try:
            async with client:
                for i in range(n):
                    order: tuple[Flavor, ...] = ("graphical", "minimal") if i % 2 == 0 else ("minimal", "graphical")
                    for flavor in order:
                        sides = (
                            (record.project, ready.project)
                            if flavor == "graphical"
                            else (record.baseline, ready.baseline)
                        )
                        try:
                            took = await _claim(client, redis, keys.pool(svc.sandbox_id, flavor), flavor, svc)
                        except Exception as e:
                            for side in sides:
                                side.failures += 1
                            print(f"  warm {flavor}: failed: {type(e).__name__}: {e}", flush=True)
                            continue
                        sides[0].values.append(took[0])
                        sides[1].values.append(took[1])
                    print(f"  graphical warm {i + 1:3}/{n}", flush=True)
        finally:
            await redis.aclose()
    return [record, ready]


async def _claim(
    client: Client, redis: aioredis.Redis, pool: str, flavor: Flavor, svc: Services
) -> tuple[float, float]:
    async with asyncio.timeout(TIMEOUT_S):  # not timed: the pool refills between claims
        while await redis.llen(pool) < 1:  # type: ignore[misc]
            await asyncio.sleep(0.05)
    started = time.perf_counter()
    made = await client.create(flavor=flavor)
    returned = time.perf_counter() - started
    events = await client.wait_for(made.id, {"session.ready", "session.failed"}, timeout=TIMEOUT_S)
    seen = time.perf_counter() - started
    try:
        if made.state != "ready" or not events[-1].data["data"].get("warm"):
            raise RuntimeError(f"not a warm claim of {svc.sandbox_id}'s {flavor} pool: {events[-1].data}")
    finally:
        await delete(client, made.id)
    return returned, seen


SCENARIOS: dict[str, Scenario] = {"graphical-cold": cold, "graphical-warm": warm}
# Small: a graphical desktop is two cores' worth of work for a moment on this machine.
DEFAULT_N = {"graphical-cold": 5, "graphical-warm": 5}
