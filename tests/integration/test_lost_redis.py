"""H3 on the real Docker Engine: Redis comes back empty (or a worker reads another key prefix)
and nothing is removed; the alarm is raised; an operator re-adopts a kept volume by id and its
inner images survive. The test has a Redis db of its own (db 13), so its FLUSHDB touches no
other test's keys."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.events import EventBus
from orchestrator.keys import Keys
from orchestrator.names import desktop_name

from .conftest import TEST_IMAGE, TOKENS, adocker, count_objects, running_api, running_worker

SESSIONS = 5


async def inner_images(host: str, sid: str) -> list[str]:
    out = await adocker(
        "exec", desktop_name(sid), "docker", "images", "--format", "{{.Repository}}:{{.Tag}}", host=host
    )
    return out.split()


async def test_an_emptied_redis_removes_nothing_and_a_kept_volume_is_readopted(docker_settings: Settings) -> None:
    url = urlsplit(docker_settings.redis_url)._replace(path="/13").geturl()
    settings = replace(docker_settings, redis_url=url, orphan_grace_s=0.0)
    host = settings.docker_host
    assert host
    redis = aioredis.Redis.from_url(url)
    await redis.flushdb()
    try:
        async with (
            running_api(settings) as api,
            Client(api, token=TOKENS["admin"]) as client,
            running_worker(settings) as worker,
        ):
            sids = [(await client.create(labels={"n": str(n)})).id for n in range(SESSIONS)]
            for sid in sids:
                await client.wait_ready(sid, timeout=120)
            await worker.runtime.images.copy_into(sids[0], [TEST_IMAGE])
            assert TEST_IMAGE in await inner_images(host, sids[0])

            # (b) A worker of the same sandbox with a wrong key prefix: its start-up pass (and
            # another) sees none of these in "its" Redis, and removes nothing.
            foreign = replace(settings, key_prefix=f"wrong-{uuid.uuid4().hex[:8]}:")
            async with running_worker(foreign) as stranger:
                await stranger.reconciler.pass_once()
                assert stranger.reconciler.unknown_objects == 2 * SESSIONS
            for sid in sids:
                assert await count_objects(host, sid) == (1, 1)

            # (a) Redis loses everything; several passes with no grace at all.
            await redis.flushdb()
            for _ in range(3):
                await worker.reconciler.pass_once()
            for sid in sids:
                assert await count_objects(host, sid) == (1, 1), sid
            assert TEST_IMAGE in await inner_images(host, sids[0])
            assert worker.reconciler.unknown_objects == 2 * SESSIONS
            metrics = worker.metrics.render(await worker._snapshot()).decode()
            assert f'orchestrator_reconcile_unknown_objects{{sandbox="{settings.sandbox_id}"}} 10.0' in metrics
            bus = EventBus(redis, Keys(settings.key_prefix))
            [alarm] = [e for _, e in await bus.history(bus.keys.firehose) if e.type == "reconcile.unknown_objects"]
            assert alarm.data["count"] == 2 * SESSIONS and alarm.data["redis_looks_empty"] is True
            assert sorted(alarm.data["sessions"]) == sorted(sids)

            # Re-adoption by id, on the sandbox (its heartbeat re-registers it within a beat).
            async with asyncio.timeout(30):
                while not await redis.exists(Keys(settings.key_prefix).sandbox_alive(settings.sandbox_id)):
                    await asyncio.sleep(0.1)
            record = await client.create(sids[0], sandbox=settings.sandbox_id)
            assert record.id == sids[0]
            await client.wait_ready(sids[0], timeout=120)
            assert TEST_IMAGE in await inner_images(host, sids[0])
            await worker.reconciler.pass_once()
            assert worker.reconciler.unknown_objects == 2 * (SESSIONS - 1)
    finally:
        await redis.flushdb()
        await redis.aclose()
