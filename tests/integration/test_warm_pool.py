"""The warm pool on a real dockerd and Redis: desktops made ahead, claimed atomically by creates
that take the defaults, refilled in the background, never mistaken for orphans, never reused;
a pool per flavor, each claimed by its own flavor only."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.keys import Keys
from orchestrator.names import desktop_name, volume_name
from tests.conftest import awaited
from workers.worker import SandboxWorker

from .conftest import TOKENS, adocker, count_objects, running_api, running_worker

GRAPHICAL_IMAGE = os.environ.get("ORCH_GRAPHICAL_IMAGE", "orchestrator/desktop-graphical:dev")


async def pool_ready(worker: SandboxWorker, size: int, timeout: float = 90) -> list[str]:
    """Until the pool holds ``size`` ready desktops; returns their ids (the heartbeat says the same)."""
    async with asyncio.timeout(timeout):
        while len(pooled := await worker.pool.pooled()) != size or worker.pool.making or worker.pool.removing:
            await asyncio.sleep(0.05)
    info = await worker.heartbeat.beat()
    assert (info.pool_target, info.pool_ready) == (worker.pool.target, size)
    return pooled


async def running(host: str, session_id: str) -> bool:
    return await adocker("inspect", "--format", "{{.State.Running}}", desktop_name(session_id), host=host) == "true"


async def test_creates_claim_distinct_warm_desktops_and_the_pool_refills(
    docker_settings: Settings, redis: aioredis.Redis
) -> None:
    # grace 0: any desktop without a record would be removed at once, were it not the pool's.
    settings = replace(docker_settings, pool_size=3, orphan_grace_s=0.0, reconcile_interval_s=0.5)
    host = settings.docker_host
    assert host
    async with running_worker(settings) as worker, running_api(settings) as url:
        pooled = await pool_ready(worker, 3)
        # Several reconcile passes ran meanwhile; none touched the pooled desktops.
        assert worker.reconciler is not None
        await worker.reconciler.pass_once()
        assert all([await running(host, i) for i in pooled])

        async with Client(url, token=TOKENS["admin"]) as client:
            # Three at once, from a full pool: each is ready in the response, none shared.
            records = await asyncio.gather(*(client.create(labels={"n": str(n)}) for n in range(3)))
            ids = [r.id for r in records]
            assert all(r.state == "ready" for r in records)
            assert sorted(ids) == sorted(pooled) and len(set(ids)) == 3
            for r in records:
                events = await client.wait_for(r.id, {"session.ready"}, timeout=10)
                assert events[-1].data["data"] == {"warm": True}
                assert (await client.get(r.id)).spec.labels == r.spec.labels
                assert await count_objects(host, r.id) == (1, 1) and await running(host, r.id)
            # A claimed desktop carries nothing from anyone: a fresh volume, an empty inner daemon.
            inner = await adocker("exec", desktop_name(ids[0]), "docker", "ps", "-aq", host=host)
            assert (
                inner == "" and await adocker("exec", desktop_name(ids[0]), "docker", "images", "-q", host=host) == ""
            )

            # The pool is empty now: the next create is made cold (and still works).
            cold = await client.create()
            if cold.state != "ready":  # unless the refill already won the race
                assert (await client.wait_ready(cold.id, timeout=90)).state == "ready"

            # Requests the pool cannot serve go cold even with warm desktops waiting.
            refilled = await pool_ready(worker, 3)
            assert not set(refilled) & set(ids)
            with_env = await client.create(env={"GREETING": "hi"})
            assert with_env.state == "pending" and with_env.id not in refilled
            assert (await client.wait_ready(with_env.id, timeout=90)).state == "ready"

            # A warm session is an ordinary session afterwards: stop, start, delete.
            sid = ids[1]
            await client.stop(sid)
            await client.wait_for(sid, {"session.stopped"}, timeout=60)
            await client.start(sid)
            await client.wait_ready(sid, timeout=90)
            await client.delete(sid)
            await client.wait_for(sid, {"session.deleted"}, timeout=60)
            assert await count_objects(host, sid) == (0, 0)

    # Pool size lowered to 0: the next worker drops the unclaimed desktops, volumes included.
    async with running_worker(replace(settings, pool_size=0)) as worker:
        await pool_ready(worker, 0)
        # The list empties first (a drop is LREM, then the removal): wait for the removals.
        async with asyncio.timeout(60):
            while not all([await count_objects(host, i) == (0, 0) for i in refilled]):
                await asyncio.sleep(0.2)
        assert await awaited(redis.llen(Keys(settings.key_prefix).pool(settings.sandbox_id))) == 0
        assert await adocker("volume", "ls", "-q", "--filter", f"name={volume_name(refilled[0])}", host=host) == ""


async def test_a_graphical_create_claims_a_warm_graphical_desktop_and_a_minimal_one_never_does(
    docker_settings: Settings,
) -> None:
    host = docker_settings.docker_host
    assert host
    if not await adocker("image", "inspect", "--format", "{{.Id}}", GRAPHICAL_IMAGE, host=host, check=False):
        pytest.skip(f"no graphical image {GRAPHICAL_IMAGE}: scripts/build-images.sh --graphical builds it")
    settings = replace(docker_settings, pool_size=0, pool_graphical_size=1, graphical_image=GRAPHICAL_IMAGE)
    async with running_worker(settings) as worker, running_api(settings) as url:
        [warm_id] = await pool_ready(worker, 1, timeout=120)
        assert await worker.pool.pooled("graphical") == [warm_id]
        async with Client(url, token=TOKENS["admin"]) as client:
            # A minimal create finds no minimal desktop pooled: made cold, never the graphical one.
            minimal = await client.create()
            assert minimal.state == "pending" and minimal.id != warm_id
            assert await worker.pool.pooled("graphical") == [warm_id]

            # Another screen size than the pool's: cold too.
            other = await client.create(flavor="graphical", display={"width": 800, "height": 600})
            assert other.state == "pending" and other.id != warm_id

            started = time.perf_counter()
            record = await client.create(flavor="graphical")
            events = await client.wait_for(record.id, {"session.ready"}, timeout=10)
            took = time.perf_counter() - started
            assert (record.id, record.state, record.spec.flavor) == (warm_id, "ready", "graphical")
            assert events[-1].data["data"] == {"warm": True}
            assert took < 5, f"a warm claim took {took:.1f} s"
            # Its screen is up (the pool waited for display.ready) at the default size.
            geometry = await client.exec(warm_id, ["orch-screen", "geometry"])
            assert geometry.exit_code == 0, geometry
            assert (json.loads(geometry.stdout)["width"], json.loads(geometry.stdout)["height"]) == (1280, 800)

            for cold in (minimal.id, other.id):
                assert (await client.wait_ready(cold, timeout=120)).state == "ready"
            inspected = json.loads(await adocker("inspect", desktop_name(minimal.id), host=host))[0]
            assert inspected["Config"]["Image"] == settings.desktop_image
