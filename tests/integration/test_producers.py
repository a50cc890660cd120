"""The producers' contract, proven by a client that is not our Python code: `redis-cli`
commands alone enqueue a create job (docs/jobs.md), and the worker runs it to dockerd.ready."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import pytest

from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.keys import Keys
from workers.worker import SandboxWorker

from .conftest import count_objects


async def redis_cli(url: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "redis-cli", "-u", url, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def test_redis_cli_alone_enqueues_a_create_that_reaches_dockerd_ready(
    client: Client, worker: SandboxWorker, docker_settings: Settings
) -> None:
    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli is missing (scripts/env.sh installs redis-tools)")
    session, url = "from-redis-cli", docker_settings.redis_url
    job_id = f"create_session:{session}:1"
    now = str(int(time.time() * 1000))
    body = {
        "t": 1,
        "f": "create_session",
        "a": [],
        "k": {"session": session, "generation": 1, "spec": {"labels": {"producer": "redis-cli"}}},
        "et": int(now),
    }
    assert await redis_cli(url, "SET", f"arq:job:{job_id}", json.dumps(body), "PX", "86400000", "NX") == "OK"
    queue = Keys(docker_settings.key_prefix).queue(docker_settings.sandbox_id)
    assert await redis_cli(url, "ZADD", queue, now, job_id) == "1"

    events = await client.wait_for(session, {"session.ready", "session.failed"}, timeout=90)
    assert events[-1].type == "session.ready", [e.data for e in events]
    assert "dockerd.ready" in [e.type for e in events]
    record = await client.get(session)
    assert record.spec.labels == {"producer": "redis-cli"}
    assert record.sandbox == docker_settings.sandbox_id
    assert await count_objects(docker_settings.docker_host or "", session) == (1, 1)

    # Events can be read the same way: XRANGE on the session's stream, JSON in field "event".
    raw = await redis_cli(url, "--no-raw", "XRANGE", Keys(docker_settings.key_prefix).session_events(session), "-", "+")
    assert '"dockerd.ready"' in raw.replace('\\"', '"')


async def test_a_job_with_bad_arguments_is_refused_and_creates_nothing(
    client: Client, worker: SandboxWorker, docker_settings: Settings
) -> None:
    url = docker_settings.redis_url
    queue = Keys(docker_settings.key_prefix).queue(docker_settings.sandbox_id)
    now = str(int(time.time() * 1000))
    for job_id, kwargs in [
        ("create_session:BAD!:1", {"session": "BAD!", "generation": 1, "spec": {}}),
        ("create_session:ok-name:1", {"session": "ok-name", "generation": 1, "spec": {"colour": "red"}}),
        ("create_session:ok-name2:0", {"session": "ok-name2", "generation": 0}),
    ]:
        body = {"t": 1, "f": "create_session", "a": [], "k": kwargs, "et": int(now)}
        await redis_cli(url, "SET", f"arq:job:{job_id}", json.dumps(body), "PX", "86400000")
        await redis_cli(url, "ZADD", queue, now, job_id)
    async with asyncio.timeout(30):
        while await redis_cli(url, "ZCARD", queue) != "0":
            await asyncio.sleep(0.05)
    assert await client.list() == []
