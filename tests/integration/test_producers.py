"""The worker's side of the internal job layout (docs/jobs.md), proven by a client that is not
our Python code: `redis-cli` commands alone enqueue a create job, and the worker runs it to
dockerd.ready. (Producers send commands instead: tests/integration/test_commands.py.)"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from typing import Any

import httpx
import pytest

from orchestrator.client import ApiError, Client
from orchestrator.config import Settings
from orchestrator.keys import Keys
from workers.worker import SandboxWorker

from .conftest import ADMIN, count_objects, delivered_env, desktop_json


async def redis_cli(url: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "redis-cli", "-u", url, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def session_exists(client: Client, session: str, *, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                await client.get(session)
                return
            except ApiError as e:
                if e.status != 404:
                    raise
            await asyncio.sleep(0.1)


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

    # The worker stores the record when it takes the job; until then the session's stream is
    # unknown (404), so wait for the record, then read its events from the beginning.
    await session_exists(client, session, timeout=60)
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


async def put_job(url: str, queue: str, job_id: str, body: str | None) -> None:
    """What a producer writes (docs/jobs.md): the body (when there is one), then the queue entry."""
    if body is not None:
        assert await redis_cli(url, "SET", f"arq:job:{job_id}", body, "PX", "86400000") == "OK"
    await redis_cli(url, "ZADD", queue, str(int(time.time() * 1000)), job_id)


def envelope(k: Any, **changes: Any) -> str:
    return json.dumps({"t": 1, "f": "create_session", "a": [], "k": k, "et": int(time.time() * 1000), **changes})


async def left_queue(url: str, queue: str, job_ids: list[str], timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while any([await redis_cli(url, "ZSCORE", queue, j) for j in job_ids]):
            await asyncio.sleep(0.05)


async def test_malformed_jobs_leave_the_queue_and_the_worker_keeps_serving(
    client: Client, worker: SandboxWorker, docker_settings: Settings
) -> None:
    url = docker_settings.redis_url
    queue = Keys(docker_settings.key_prefix).queue(docker_settings.sandbox_id)
    good_k = {"session": "never-made", "generation": 1}
    bad = {
        "bad-try": envelope(good_k, t="1"),  # this one ended the worker on every start
        "bad-et": envelope(good_k, et="soon"),
        "bad-json": "{not json",
        "bad-list": "[1, 2, 3]",
        "bad-function": envelope(good_k, f="rm_rf"),
        "bad-args": envelope({"session": "never-made", "generation": "1"}),
        "bad-positional": envelope(good_k, a=["x"]),
        "no-body": None,
    }
    await client.create("meanwhile")
    for job_id, body in bad.items():
        await put_job(url, queue, job_id, body)

    events = await client.wait_for("meanwhile", {"session.ready", "session.failed"}, timeout=90)
    assert events[-1].type == "session.ready", [e.data for e in events]
    await left_queue(url, queue, list(bad))
    for job_id in bad:
        assert await redis_cli(url, "EXISTS", f"arq:job:{job_id}", f"arq:in-progress:{job_id}") == "0"
    sample = worker.metrics.registry.get_sample_value
    assert sample("orchestrator_jobs_rejected_total", {"reason": "bad_envelope"}) == 2
    assert sample("orchestrator_jobs_rejected_total", {"reason": "missing_body"}) == 1
    assert [r.id for r in await client.list()] == ["meanwhile"]

    # Still consuming: a stop job a producer writes for the ready session is run, and refused
    # (only the API, a drain or a TTL moves a session to stopping).
    stop_id = "stop_session:meanwhile:1"
    await put_job(url, queue, stop_id, envelope({"session": "meanwhile", "generation": 1}, f="stop_session"))
    await left_queue(url, queue, [stop_id])
    assert (await client.get("meanwhile")).state == "ready"
    assert await count_objects(docker_settings.docker_host or "", "meanwhile") == (1, 1)


MARKER = "ENV-MARKER-c0ffee"


async def test_a_sessions_env_reaches_its_desktop_and_nothing_else(
    client: Client, api: str, worker: SandboxWorker, docker_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = docker_settings.redis_url
    keys = Keys(docker_settings.key_prefix)
    queue = keys.queue(docker_settings.sandbox_id)
    await client.create("env-api", env={"SECRET": MARKER})
    spec = {"env": {"SECRET": MARKER}}
    await put_job(
        url, queue, "create_session:env-job:1", envelope({"session": "env-job", "generation": 1, "spec": spec})
    )
    # Refused by the function (a spec on generation 2) and screened out (msgspec would quote it).
    refused = {
        "create_session:env-refused:2": envelope({"session": "env-refused", "generation": 2, "spec": spec}),
        "create_session:env-bad:1": envelope(
            {"session": "env-bad", "generation": 1, "spec": {"env": {"N": 1, "S": MARKER}, "ttl_action": MARKER}}
        ),
    }
    for job_id, body in refused.items():
        await put_job(url, queue, job_id, body)
    async with httpx.AsyncClient(base_url=api, headers=ADMIN) as http:
        errors = [
            await http.post(
                "/v1/sessions", json={"id": "env-err", "env": {"SECRET": MARKER}, "resources": {"pids": 1}}
            ),
            await http.post("/v1/sessions", json={"id": "env-err", "env": {"bad key": MARKER}}),
            await http.post("/v1/sessions", json={"id": "env-api", "env": {"OTHER": MARKER}}),  # exists, other spec
        ]
        bodies: list[str] = []
        for session in ("env-api", "env-job"):
            events = await client.wait_for(session, {"session.ready", "session.failed"}, timeout=90)
            assert events[-1].type == "session.ready", [e.data for e in events]
            host = docker_settings.docker_host or ""
            # Delivered where it belongs (the processes the desktop's init starts), and not in
            # the container's configuration (docker inspect, the daemon's config.v2.json).
            assert (await delivered_env(host, session)).get("SECRET") == MARKER
            bodies.append(await desktop_json(host, session))
        await left_queue(url, queue, list(refused))
        bodies += [e.text for e in errors]
        bodies += [(await http.get(p)).text for p in ("/v1/sessions", "/v1/sessions/env-api")]
    assert [e.status_code for e in errors] == [400, 400, 409], bodies
    streams = [keys.firehose, keys.session_events("env-api"), keys.session_events("env-job")]
    bodies += [await redis_cli(url, "--no-raw", "XRANGE", stream, "-", "+") for stream in streams]
    for text in bodies:
        assert MARKER not in text
    formatter = logging.Formatter("%(name)s %(message)s")
    logged = [formatter.format(r) for r in caplog.records]
    assert any("rejected job 'create_session:env-bad:1': bad_arguments" in line for line in logged)
    assert any("refusing create_session for env-refused: invalid_job" in line for line in logged)
    assert [line for line in logged if MARKER in line] == []
