"""The warm pool on a real dockerd and Redis: desktops made ahead, claimed atomically by creates
that take the defaults, refilled in the background, never mistaken for orphans, never reused."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import redis.asyncio as aioredis

from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.keys import Keys
from orchestrator.names import desktop_name, volume_name
from tests.conftest import awaited
from workers.worker import SandboxWorker

from .conftest import TOKENS, adocker, count_objects, running_api, running_worker


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
