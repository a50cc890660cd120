"""The API's edge with a real Redis and no worker: validation, idempotency, queueing."""

from __future__ import annotations

import re

import httpx
import pytest
import redis.asyncio as aioredis

from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.keys import Keys
from tests.conftest import awaited

from .conftest import ADMIN

BAD_BODIES = [
    (b"{bad", "invalid_json", None),
    (b'{"id": "ok-id", "colour": "red"}', "invalid_request", "colour"),
    (b'{"id": "Not_Valid!"}', "invalid_request", "id"),
    (b'{"id": "ab"}', "invalid_request", "id"),
    (b'{"labels": {"team": 7}}', "invalid_request", "labels[...]"),
    (b'{"labels": "x"}', "invalid_request", "labels"),
    (b"[1, 2]", "invalid_request", None),
    (b'{"id": 12345}', "invalid_request", "id"),
]


async def nothing_stored(redis: aioredis.Redis, settings: Settings) -> None:
    keys = Keys(settings.key_prefix)
    assert await awaited(redis.scard(keys.session_index)) == 0
    assert await redis.zcard(keys.queue(settings.sandbox_id)) == 0
    assert await redis.xlen(keys.firehose) == 0


@pytest.mark.parametrize(("body", "code", "field"), BAD_BODIES)
async def test_bad_create_bodies_get_a_precise_4xx_and_create_nothing(
    api: str, redis: aioredis.Redis, settings: Settings, body: bytes, code: str, field: str | None
) -> None:
    async with httpx.AsyncClient(base_url=api, headers=ADMIN) as http:
        response = await http.post("/v1/sessions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["code"] == code
    assert error["message"]
    assert error["field"] == field
    await nothing_stored(redis, settings)


async def test_oversized_body_is_refused_with_413(api: str, redis: aioredis.Redis, settings: Settings) -> None:
    body = b'{"labels": {"a": "' + b"x" * (settings.max_body_bytes + 10) + b'"}}'
    async with httpx.AsyncClient(base_url=api, headers=ADMIN) as http:
        response = await http.post("/v1/sessions", content=body)
    assert response.status_code == 413
    assert response.json()["code"] == "body_too_large"
    await nothing_stored(redis, settings)


@pytest.mark.parametrize("path", ["/v1/sessions/BAD_ID", "/v1/sessions/a", "/v1/sessions/x%20y/events"])
async def test_invalid_session_id_in_path_is_400(api: str, path: str) -> None:
    async with httpx.AsyncClient(base_url=api, headers=ADMIN) as http:
        response = await http.get(path)
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_session_id"


async def test_unknown_session_is_404_for_every_verb(client: Client) -> None:
    for call in (client.get, client.stop, client.start, client.delete):
        with pytest.raises(Exception, match="404 session_not_found"):
            await call("no-such-session")


async def test_create_enqueues_one_json_job_and_is_idempotent_by_id(
    client: Client, redis: aioredis.Redis, settings: Settings
) -> None:
    first = await client.create("same-id", labels={"team": "a"})
    again = await client.create("same-id", labels={"team": "a"})
    assert first == again
    keys = Keys(settings.key_prefix)
    queued = await redis.zrange(keys.queue(settings.sandbox_id), 0, -1)
    assert queued == [b"create_session:same-id:1"]
    raw = await redis.get(b"arq:job:create_session:same-id:1")
    assert raw is not None
    import json

    job = json.loads(raw)  # JSON, not pickle: other languages can produce and read jobs
    assert job["f"] == "create_session"
    trace = job["k"].pop("trace")  # the request's trace id travels with the job
    assert re.fullmatch(r"[0-9a-f]{32}", trace), trace
    assert job["k"] == {"session": "same-id", "generation": 1}

    with pytest.raises(Exception, match="409 session_exists"):
        await client.create("same-id", labels={"team": "b"})


async def test_state_conflicts_are_409_and_change_nothing(client: Client) -> None:
    record = await client.create("conflict-me")
    with pytest.raises(Exception, match="409 invalid_state"):
        await client.start(record.id)  # pending cannot be started
    after = await client.get(record.id)
    assert after.state == "pending" and after.revision == record.revision


async def test_list_filters_by_state_and_label(client: Client) -> None:
    await client.create("lab-one", labels={"team": "a", "tier": "gold"})
    await client.create("lab-two", labels={"team": "b"})
    assert [s.id for s in await client.list(labels=["team=a"])] == ["lab-one"]
    assert [s.id for s in await client.list(labels=["team=a", "tier=gold"])] == ["lab-one"]
    assert [s.id for s in await client.list(labels=["team=c"])] == []
    assert {s.id for s in await client.list(state="pending")} == {"lab-one", "lab-two"}
    assert await client.list(state="ready") == []
    with pytest.raises(Exception, match="400"):
        await client.list(state="sleeping")


async def test_healthz_openapi_and_metrics(api: str, client: Client) -> None:
    await client.create("metric-me")
    async with httpx.AsyncClient(base_url=api, headers=ADMIN) as http:
        assert (await http.get("/healthz")).json()["status"] == "ok"
        spec = (await http.get("/openapi.json")).json()
        assert spec["openapi"].startswith("3.1")
        assert "/v1/sessions" in spec["paths"]
        assert "SessionCreate" in spec["components"]["schemas"]
        metrics = (await http.get("/metrics")).text
    assert 'orchestrator_sessions{state="pending"} 1' in metrics


async def test_repeated_lifecycle_requests_are_idempotent(
    client: Client, redis: aioredis.Redis, settings: Settings
) -> None:
    """Without a worker: a second delete re-enqueues nothing new and changes nothing."""
    record = await client.create("twice-del")
    first = await client.delete(record.id)
    second = await client.delete(record.id)
    assert first.state == second.state == "deleting"
    assert first.revision == second.revision
    queued = await redis.zrange(Keys(settings.key_prefix).queue(settings.sandbox_id), 0, -1)
    assert queued == [b"create_session:twice-del:1", b"delete_session:twice-del:1"]


async def test_every_endpoint_but_healthz_needs_a_token_with_the_right_scope(api: str) -> None:
    from .conftest import TOKENS

    def bearer(scope: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKENS[scope]}"}

    async with httpx.AsyncClient(base_url=api) as http:
        assert (await http.get("/healthz")).status_code == 200
        for path in (
            "/v1/sessions",
            "/v1/events?follow=false",
            "/v1/sandboxes",
            "/metrics",
            "/openapi.json",
            "/docs/openapi.json",
        ):
            missing = await http.get(path)
            assert missing.status_code == 401, path
            assert missing.json()["code"] == "unauthorized"
            assert missing.headers["www-authenticate"].startswith("Bearer")
            wrong = await http.get(path, headers={"Authorization": "Bearer not-a-token"})
            assert wrong.status_code == 401 and wrong.json()["message"] == "the token is not valid", path
        basic = await http.get("/v1/sessions", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert basic.status_code == 401

        # Dashboards read, they do not write; producers write; only operators see sandboxes.
        dashboard, producer = bearer("events:read"), bearer("sessions:write")
        assert (await http.get("/v1/sessions", headers=dashboard)).status_code == 200
        refused = await http.post("/v1/sessions", json={}, headers=dashboard)
        assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
        assert "sessions:write" in refused.json()["message"]
        assert (await http.post("/v1/sessions", json={"id": "by-producer"}, headers=producer)).status_code == 202
        assert (await http.get("/v1/sandboxes", headers=producer)).status_code == 403
        assert (await http.get("/v1/events?follow=false", headers=producer)).status_code == 403
        assert (await http.get("/v1/events?follow=false", headers=dashboard)).status_code == 200
        assert (await http.get("/v1/sandboxes", headers=bearer("admin"))).status_code == 200


async def test_idempotency_key_makes_a_retried_create_return_the_same_session(
    api: str, redis: aioredis.Redis, settings: Settings
) -> None:
    async with httpx.AsyncClient(base_url=api, headers=ADMIN) as http:
        first = await http.post("/v1/sessions", json={"labels": {"a": "b"}}, headers={"Idempotency-Key": "order-42"})
        again = await http.post("/v1/sessions", json={"labels": {"a": "b"}}, headers={"Idempotency-Key": "order-42"})
        other = await http.post("/v1/sessions", json={"labels": {"a": "b"}}, headers={"Idempotency-Key": "order-43"})
        clash = await http.post("/v1/sessions", json={"labels": {"a": "c"}}, headers={"Idempotency-Key": "order-42"})
        bad = await http.post("/v1/sessions", json={}, headers={"Idempotency-Key": "has space"})
    assert (first.status_code, again.status_code, other.status_code) == (202, 200, 202)
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    assert clash.status_code == 409
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_idempotency_key"
    assert await redis.zcard(Keys(settings.key_prefix).queue(settings.sandbox_id)) == 2


ENDPOINTS = [  # (method, path, scope that may call it)
    ("POST", "/v1/sessions", "sessions:write"),
    ("GET", "/v1/sessions", "events:read"),
    ("GET", "/v1/sessions/scope-probe", "events:read"),
    ("POST", "/v1/sessions/scope-probe/stop", "sessions:write"),
    ("POST", "/v1/sessions/scope-probe/start", "sessions:write"),
    ("DELETE", "/v1/sessions/scope-probe", "sessions:write"),
    ("GET", "/v1/events?follow=false", "events:read"),
    ("GET", "/v1/sessions/scope-probe/events?follow=false", "events:read"),
    ("GET", "/v1/sandboxes", "admin"),
    ("GET", "/metrics", "admin"),
    ("GET", "/openapi.json", "admin"),
    ("GET", "/docs/openapi.json", "admin"),
    ("GET", "/dashboard", "admin"),
    ("POST", "/v1/sessions/scope-probe/exec", "sessions:exec"),
    ("GET", "/v1/sessions/scope-probe/execs/x00000000000000000000", "sessions:exec"),
    ("GET", "/v1/sessions/scope-probe/execs/x00000000000000000000/output", "sessions:exec"),
    ("POST", "/v1/sessions/scope-probe/execs/x00000000000000000000/kill", "sessions:exec"),
]


@pytest.mark.parametrize(("method", "path", "scope"), ENDPOINTS)
async def test_each_endpoint_is_401_without_a_token_and_403_with_a_wrong_scope(
    api: str, method: str, path: str, scope: str
) -> None:
    from .conftest import TOKENS

    async with httpx.AsyncClient(base_url=api) as http:
        response = await http.request(method, path)
        assert response.status_code == 401, (method, path)
        assert response.json()["code"] == "unauthorized"
        wrong = {
            "sessions:write": "events:read",
            "events:read": None,
            "admin": "sessions:write",
            "sessions:exec": "sessions:write",
        }[scope]
        if wrong is not None:  # (every valid token may read; docs and dashboard need any valid token)
            response = await http.request(method, path, headers={"Authorization": f"Bearer {TOKENS[wrong]}"})
            if path in ("/openapi.json", "/docs/openapi.json", "/dashboard"):
                assert response.status_code == 200, (method, path)
            else:
                assert response.status_code == 403, (method, path)
                assert response.json()["code"] == "forbidden"


async def test_the_openapi_document_validates(api: str) -> None:
    from openapi_spec_validator import validate

    async with httpx.AsyncClient(base_url=api, headers=ADMIN) as http:
        spec = (await http.get("/openapi.json")).json()
    validate(spec)
    assert spec["openapi"].startswith("3.1")
    for path in ("/v1/sessions", "/v1/sessions/{session_id}", "/v1/events", "/v1/sandboxes"):
        assert path in spec["paths"], path
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_redis_away_is_a_503_in_the_error_shape_not_a_500(settings: Settings) -> None:
    from dataclasses import replace

    from .conftest import running_api

    away = replace(settings, redis_url="redis://127.0.0.1:1/0", redis_connect_timeout_s=0.5)
    async with running_api(away) as url, httpx.AsyncClient(base_url=url, headers=ADMIN) as http:
        response = await http.get("/v1/sessions")
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "redis_unavailable"
        assert "127.0.0.1" not in response.text  # no internal detail to the caller
