"""The port proxy over the real API (uvicorn, h11 and wsproto as `orchestrator api` serves) and a
real Redis, to a real upstream (aiohttp on 127.0.0.1) through real channels: ``LoopbackAccess``
stands in for the route into a desktop, its far end bridged to the upstream by the bridge the
worker uses. No worker, no Docker: a session is made ready by hand through the store, as its
worker would."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import pytest
import redis.asyncio as aioredis

from orchestrator.api import create_app
from orchestrator.auth import token_entry
from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.events import EventBus
from orchestrator.keys import Keys
from orchestrator.port_grants import digest
from orchestrator.port_proxy import GRANT_COOKIE
from orchestrator.states import SessionState as S
from orchestrator.store import SessionStore
from tests.port_support import LoopbackAccess, Upstream, big_sha256, running_upstream, with_ports

from .conftest import running_api

# name: (scopes, tenant)
TOKENS = {
    "exec": (["sessions:exec"], None),
    "writer": (["sessions:write"], None),
    "reader": (["events:read"], None),
    "beta-exec": (["sessions:exec"], "beta"),
    "admin": (["admin"], None),
}
RAW = {name: f"raw-port-token-of-{name}" for name in TOKENS}
MAX_BODY = 4 * 2**20


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {RAW[name]}"}


@dataclasses.dataclass
class Ports:
    url: str
    http: httpx.AsyncClient  # no token of its own
    upstream: Upstream
    access: LoopbackAccess
    store: SessionStore
    bus: EventBus
    keys: Keys
    redis: aioredis.Redis
    writer: Client
    session: str  # ready, the default tenant's

    def at(self, path: str = "", session: str | None = None, port: int | None = None) -> str:
        port = self.upstream.port if port is None else port
        return f"{self.url}/v1/sessions/{session or self.session}/ports/{port}{path}"

    async def ready_session(self) -> str:
        record = await self.writer.create()
        for target in (S.CREATING, S.STARTING, S.READY):
            await self.store.transition(record.id, target)
        return record.id

    async def grant(self, session: str | None = None, port: int | None = None) -> dict[str, Any]:
        answer = await self.http.post(self.at("/url", session, port), headers=bearer("exec"))
        assert answer.status_code == 201, answer.text
        body: dict[str, Any] = answer.json()
        return body


@pytest.fixture
def port_url_ttl() -> int:
    return 300


@pytest.fixture
def port_keepalive() -> float:
    return 30.0


@pytest.fixture
async def ports(
    settings: Settings, redis: aioredis.Redis, port_url_ttl: int, port_keepalive: float
) -> AsyncIterator[Ports]:
    tokens = ";".join(token_entry(name, RAW[name], scopes, tenant) for name, (scopes, tenant) in TOKENS.items())
    settings = dataclasses.replace(
        settings,
        tokens=tokens,
        port_url_ttl_s=port_url_ttl,
        port_max_body_bytes=MAX_BODY,
        port_timeout_s=10.0,
        port_keepalive_s=port_keepalive,
    )
    access = LoopbackAccess()
    app = with_ports(create_app(settings), access)  # the port routes, as api.ROUTES will have them
    keys = Keys(settings.key_prefix)
    bus = EventBus(redis, keys)
    async with (
        running_upstream() as upstream,
        running_api(settings, app) as url,
        httpx.AsyncClient(timeout=30) as http,
        Client(url, token=RAW["writer"]) as writer,
    ):
        ports = Ports(url, http, upstream, access, SessionStore(redis, bus), bus, keys, redis, writer, "")
        ports.session = await ports.ready_session()
        yield ports
    await access.aclose()


async def error_of(answer: httpx.Response) -> tuple[int, str]:
    return answer.status_code, answer.json()["code"]


# -- HTTP ------------------------------------------------------------------------------------


async def test_a_get_reaches_the_upstream_with_its_path_query_and_rewritten_headers(ports: Ports) -> None:
    answer = await ports.http.get(
        ports.at("/echo/a%2Fb/c?x=1&y=%20two"),
        headers={
            **bearer("exec"),
            "X-Custom": "kept",
            "Cookie": "app=1",
            "Connection": "keep-alive, X-Drop",
            "X-Drop": "1",
        },
    )
    assert answer.status_code == 200, answer.text
    seen = answer.json()
    assert seen["method"] == "GET"
    assert seen["path_qs"] == "/echo/a%2Fb/c?x=1&y=%20two"  # raw, as sent
    headers = seen["headers"]
    assert headers["host"] == f"127.0.0.1:{ports.upstream.port}"
    assert "authorization" not in headers, "the caller's API token reached the desktop"
    assert "x-drop" not in headers, "a header the Connection header names was forwarded"
    assert headers["x-custom"] == "kept" and headers["cookie"] == "app=1"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == ports.url.removeprefix("http://")
    assert headers["x-forwarded-prefix"] == f"/v1/sessions/{ports.session}/ports/{ports.upstream.port}"
    # The upstream's answer, not the API's: none of the API's page policy on it.
    assert answer.headers["content-type"].startswith("application/json")
    assert "content-security-policy" not in answer.headers and "x-frame-options" not in answer.headers
    assert ports.access.ports_opened[-1] == (ports.session, ports.upstream.port, "exec")


async def test_the_bare_prefix_is_the_upstreams_root(ports: Ports) -> None:
    # The upstream has no "/" route: its 404 comes back as its own (plain text), not ours (JSON).
    answer = await ports.http.get(ports.at(""), headers=bearer("exec"))
    assert answer.status_code == 404
    assert "json" not in answer.headers.get("content-type", "")
    assert (await ports.http.get(ports.at("/echo"), headers=bearer("exec"))).json()["path_qs"] == "/echo"
    # POST .../url issues port URLs; the upstream's own /url takes every other method.
    for method in ("GET", "PUT", "DELETE"):
        answer = await ports.http.request(method, ports.at("/url?q=1"), headers=bearer("exec"))
        assert answer.status_code == 200, (method, answer.text)
        assert answer.json()["path_qs"] == "/url?q=1" and answer.json()["method"] == method


async def test_a_post_body_larger_than_the_apis_json_limit_arrives_whole(ports: Ports) -> None:
    body = os.urandom(3 * 2**20)  # the API's own bodies stop at ORCH_MAX_BODY_BYTES (64 KiB)
    answer = await ports.http.post(ports.at("/echo/upload"), headers=bearer("exec"), content=body)
    assert answer.status_code == 200, answer.text
    seen = answer.json()
    assert seen["method"] == "POST" and seen["body_bytes"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_a_chunked_request_body_streams_through(ports: Ports) -> None:
    parts = [os.urandom(100_000) for _ in range(5)]

    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    answer = await ports.http.put(ports.at("/echo/chunked"), headers=bearer("exec"), content=chunks())
    assert answer.status_code == 200, answer.text
    assert answer.json()["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    assert answer.json()["method"] == "PUT"


async def test_a_body_over_the_port_cap_is_refused(ports: Ports) -> None:
    too_big = b"x" * (MAX_BODY + 1)
    answer = await ports.http.post(ports.at("/echo/big"), headers=bearer("exec"), content=too_big)
    assert await error_of(answer) == (413, "body_too_large")
    assert not ports.upstream.requests, "an announced oversized body was sent on"

    async def unannounced() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"y" * (MAX_BODY // 4)

    answer = await ports.http.post(ports.at("/echo/big"), headers=bearer("exec"), content=unannounced())
    assert await error_of(answer) == (413, "body_too_large")


async def test_a_20_mb_response_streams_back_whole(ports: Ports) -> None:
    digest_ = hashlib.sha256()
    received = 0
    started = time.monotonic()
    first_byte_after: float | None = None
    async with ports.http.stream("GET", ports.at("/big?mb=20"), headers=bearer("exec")) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/octet-stream"
        async for chunk in answer.aiter_raw():
            if first_byte_after is None:
                first_byte_after = time.monotonic() - started
            digest_.update(chunk)
            received += len(chunk)
    assert received == 20 * 2**20
    assert digest_.hexdigest() == big_sha256(20)
    assert first_byte_after is not None


async def test_a_caller_that_leaves_mid_body_stops_the_reading(ports: Ports) -> None:
    async with ports.http.stream("GET", ports.at("/big?mb=4000"), headers=bearer("exec")) as answer:
        async for _ in answer.aiter_raw():
            break  # 4 GB would take the upstream far longer than the wait below
    async with asyncio.timeout(10):
        while ports.access.bridges:
            await asyncio.sleep(0.05)


async def test_redirects_and_cookies_stay_under_the_ports_prefix(ports: Ports) -> None:
    prefix = f"/v1/sessions/{ports.session}/ports/{ports.upstream.port}"
    answer = await ports.http.get(ports.at("/redirect"), headers=bearer("exec"))
    assert answer.status_code == 302
    assert answer.headers["location"] == f"{prefix}/echo/after-redirect"
    answer = await ports.http.get(ports.at("/cookie"), headers=bearer("exec"))
    cookies = answer.headers.get_list("set-cookie")
    assert cookies == [f"app=1; Path={prefix}/; HttpOnly", f"other=2; Path={prefix}/sub"]


async def test_head_and_delete_pass_through(ports: Ports) -> None:
    answer = await ports.http.head(ports.at("/echo/h"), headers=bearer("exec"))
    assert answer.status_code == 200 and answer.content == b""
    answer = await ports.http.delete(ports.at("/echo/d"), headers=bearer("exec"))
    assert answer.json()["method"] == "DELETE"


async def test_requests_one_after_another_share_one_kept_connection(ports: Ports) -> None:
    for n in range(5):
        answer = await ports.http.get(ports.at(f"/echo/{n}"), headers=bearer("exec"))
        assert answer.json()["path_qs"] == f"/echo/{n}"
    assert len(ports.access.ports_opened) == 1  # one route into the desktop for all five
    assert len(ports.upstream.requests) == 5
    assert all("connection" not in r["headers"] for r in ports.upstream.requests)  # HTTP/1.1 keep-alive
    metrics = (await ports.http.get(f"{ports.url}/metrics", headers=bearer("admin"))).text
    assert "orchestrator_port_connections_kept 1.0" in metrics
    assert "orchestrator_port_connections_opened_total 1.0" in metrics
    assert "orchestrator_port_connections_reused_total 4.0" in metrics


async def test_a_request_with_a_body_takes_a_new_connection_then_leaves_it_for_the_next(ports: Ports) -> None:
    await ports.http.get(ports.at("/echo/a"), headers=bearer("exec"))
    for _ in range(2):  # a body could not be sent again if a kept connection broke under it
        answer = await ports.http.post(ports.at("/echo/p"), headers=bearer("exec"), content=b"x" * 1000)
        assert answer.json()["body_bytes"] == 1000
    assert len(ports.access.ports_opened) == 3
    await ports.http.get(ports.at("/echo/b"), headers=bearer("exec"))
    assert len(ports.access.ports_opened) == 3  # a kept one


async def test_a_kept_connection_the_upstream_closes_is_dropped_and_never_reused(ports: Ports) -> None:
    answer = await ports.http.get(ports.at("/echo/x"), headers={**bearer("exec"), "X-Close-Later": "1"})
    assert answer.status_code == 200
    async with asyncio.timeout(5):  # the upstream closes it after its answer: the pool lets it go
        while ports.access.bridges:
            await asyncio.sleep(0.02)
    answer = await ports.http.get(ports.at("/echo/y"), headers=bearer("exec"))
    assert answer.status_code == 200 and len(ports.access.ports_opened) == 2


async def test_a_request_lost_on_a_kept_connection_is_sent_again_on_a_new_one(ports: Ports) -> None:
    """The keep-alive race: the upstream closes the kept connection as the next request goes
    on it (here: it reads the request, then closes unanswered). A GET goes again, once."""
    assert (await ports.http.get(ports.at("/echo/first"), headers=bearer("exec"))).status_code == 200
    ports.upstream.drop_next = 1
    answer = await ports.http.get(ports.at("/echo/again"), headers=bearer("exec"))
    assert answer.status_code == 200 and answer.json()["path_qs"] == "/echo/again"
    assert len(ports.access.ports_opened) == 2
    assert [r["path_qs"] for r in ports.upstream.requests] == ["/echo/first", "/echo/again"]


async def test_a_lost_post_is_never_sent_twice(ports: Ports) -> None:
    ports.upstream.drop_next = 1
    answer = await ports.http.post(ports.at("/echo/once"), headers=bearer("exec"), content=b"body")
    assert (answer.status_code, answer.json()["code"]) == (502, "upstream_closed")
    assert ports.upstream.requests == []


@pytest.mark.parametrize("port_keepalive", [0.0])
async def test_without_keepalive_every_channel_is_closed_once_its_answer_is_sent(ports: Ports) -> None:
    for _ in range(5):
        assert (await ports.http.get(ports.at("/echo/x"), headers=bearer("exec"))).status_code == 200
    assert len(ports.access.ports_opened) == 5
    async with asyncio.timeout(5):
        while ports.access.bridges:
            await asyncio.sleep(0.02)


# -- refusals ----------------------------------------------------------------------------------


async def test_no_token_is_401_and_no_exec_scope_is_403(ports: Ports) -> None:
    for method, path in (("GET", "/echo"), ("POST", "/echo"), ("POST", "/url")):
        answer = await ports.http.request(method, ports.at(path))
        assert await error_of(answer) == (401, "unauthorized"), (method, path)
        assert answer.headers["www-authenticate"].startswith("Bearer")
        for name in ("reader", "writer"):
            answer = await ports.http.request(method, ports.at(path), headers=bearer(name))
            assert await error_of(answer) == (403, "forbidden"), (method, path, name)
    assert not ports.upstream.requests and not ports.access.ports_opened


async def test_another_tenants_session_is_404_and_bad_input_is_precise(ports: Ports) -> None:
    answer = await ports.http.get(ports.at("/echo"), headers=bearer("beta-exec"))
    assert await error_of(answer) == (404, "session_not_found")
    answer = await ports.http.post(ports.at("/url"), headers=bearer("beta-exec"))
    assert await error_of(answer) == (404, "session_not_found")
    for port in (0, 65536):
        answer = await ports.http.get(ports.at("/echo", port=port), headers=bearer("exec"))
        assert await error_of(answer) == (400, "invalid_port")
    answer = await ports.http.get(ports.at("/echo", session="s-unknown"), headers=bearer("exec"))
    assert await error_of(answer) == (404, "session_not_found")
    pending = await ports.writer.create()
    answer = await ports.http.get(ports.at("/echo", session=pending.id), headers=bearer("exec"))
    assert await error_of(answer) == (409, "session_not_ready")
    answer = await ports.http.post(ports.at("/url", session=pending.id), headers=bearer("exec"))
    assert await error_of(answer) == (409, "session_not_ready")
    # Our own errors keep the API's page policy.
    assert answer.headers["x-frame-options"] == "DENY"
    assert not ports.upstream.requests


async def test_a_port_nobody_listens_on_is_502_port_closed(ports: Ports) -> None:
    from tests.conftest import free_port

    answer = await ports.http.get(ports.at("/", port=free_port()), headers=bearer("exec"))
    assert await error_of(answer) == (502, "port_closed")


# -- port URLs ---------------------------------------------------------------------------------


async def test_a_port_url_opens_the_port_then_its_cookie_carries_the_page(ports: Ports) -> None:
    grant = await ports.grant()
    assert grant["expires_at"] > time.time() + 200
    url = grant["url"]
    prefix = f"/v1/sessions/{ports.session}/ports/{ports.upstream.port}"
    assert url.startswith(f"{ports.url}{prefix}/?port_token=")
    token = url.partition("port_token=")[2]

    # A browser: no header, the URL's token, then the cookie it was given.
    async with httpx.AsyncClient(timeout=30) as browser:
        first = await browser.get(url.replace("/?", "/echo/page?a=1&"))
        assert first.status_code == 200, first.text
        cookie = first.headers["set-cookie"]
        assert cookie.startswith(f"{GRANT_COOKIE}={token}; Path={prefix}/;")
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
        seen = first.json()
        assert seen["path_qs"] == "/echo/page?a=1", "the grant reached the desktop in the query"
        # A relative link of the page: the cookie alone (httpx's jar honours its Path).
        second = await browser.get(f"{ports.url}{prefix}/echo/style.css")
        assert second.status_code == 200, second.text
        assert "cookie" not in second.json()["headers"], "the grant cookie reached the desktop"
        # The page's own Authorization (no API token), for its app: passed on beside the grant.
        third = await browser.get(f"{ports.url}{prefix}/echo/api", headers={"Authorization": "token app-secret"})
        assert third.status_code == 200, third.text
        assert third.json()["headers"]["authorization"] == "token app-secret"
        # An API token beside the grant is the caller's: it authorizes, and stays out of the desktop.
        fourth = await browser.get(f"{ports.url}{prefix}/echo/api", headers=bearer("exec"))
        assert "authorization" not in fourth.json()["headers"]
        # The jar does not send it elsewhere; asked by hand, nothing else opens with it.
        assert GRANT_COOKIE not in (await browser.get(f"{ports.url}/healthz")).request.headers.get("cookie", "")

    events = [e for _, e in await ports.bus.history(ports.keys.session_events(ports.session))]
    issued = [e for e in events if e.type == "port.url_issued"]
    assert len(issued) == 1
    assert issued[0].data == {"by": "exec", "port": ports.upstream.port, "expires_at": grant["expires_at"]}
    assert token not in str(issued[0])
    # Stored hashed: the token is no key and no value.
    assert 0 < await ports.redis.ttl(ports.keys.port_grant(digest(token))) <= 300  # Redis ends it
    async for key in ports.redis.scan_iter(match=f"{ports.keys.prefix}*"):
        assert token.encode() not in key
        if (await ports.redis.type(key)) == b"string":
            assert token.encode() not in (await ports.redis.get(key) or b"")


async def test_a_grant_opens_no_other_port_session_or_route(ports: Ports) -> None:
    token = (await ports.grant())["url"].partition("port_token=")[2]
    other_session = await ports.ready_session()
    other_port = ports.upstream.port + 1 if ports.upstream.port < 65535 else ports.upstream.port - 1
    for url in (ports.at("/echo", port=other_port), ports.at("/echo", session=other_session)):
        answer = await ports.http.get(url, params={"port_token": token})
        assert await error_of(answer) == (403, "port_token_mismatch"), url
        answer = await ports.http.get(url, headers={"Cookie": f"{GRANT_COOKIE}={token}"})
        assert await error_of(answer) == (403, "port_token_mismatch"), url
    # As a bearer token, or the dashboard's ?access_token=, it is nothing.
    as_bearer = {"Authorization": f"Bearer {token}"}
    for url in (f"{ports.url}/v1/sessions/{ports.session}", ports.at("/echo"), ports.at("/url")):
        answer = await ports.http.request("POST" if url.endswith("/url") else "GET", url, headers=as_bearer)
        assert await error_of(answer) == (401, "unauthorized"), url
    answer = await ports.http.get(f"{ports.url}/v1/sessions/{ports.session}/events", params={"access_token": token})
    assert await error_of(answer) == (401, "unauthorized")
    # A grant cannot issue grants.
    answer = await ports.http.post(ports.at("/url"), params={"port_token": token})
    assert await error_of(answer) == (401, "unauthorized")
    assert not ports.upstream.requests
    # And a made-up one is refused like an expired one.
    answer = await ports.http.get(ports.at("/echo"), params={"port_token": "x" * 22})
    assert await error_of(answer) == (401, "invalid_port_token")


@pytest.mark.parametrize("port_url_ttl", [2])
async def test_a_port_url_works_then_expires(ports: Ports) -> None:
    grant = await ports.grant()
    token = grant["url"].partition("port_token=")[2]
    assert grant["expires_at"] <= time.time() + 2
    answer = await ports.http.get(ports.at("/echo"), params={"port_token": token})
    assert answer.status_code == 200, answer.text
    async with asyncio.timeout(10):  # the key's TTL is Redis's clock: wait for the refusal
        while True:
            answer = await ports.http.get(ports.at("/echo"), headers={"Cookie": f"{GRANT_COOKIE}={token}"})
            if answer.status_code != 200:
                break
            await asyncio.sleep(0.1)
    assert await error_of(answer) == (401, "invalid_port_token")
    answer = await ports.http.get(ports.at("/echo"), params={"port_token": token})
    assert await error_of(answer) == (401, "invalid_port_token")


# -- WebSockets --------------------------------------------------------------------------------


def ws_url(ports: Ports, path: str = "/ws", **kw: Any) -> str:
    return ports.at(path, **kw).replace("http://", "ws://", 1)


async def test_a_websocket_echoes_both_ways_and_passes_close_codes_on(ports: Ports) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(ports), headers=bearer("exec"), protocols=("other", "chat")) as ws:
            assert ws.protocol == "chat", "the upstream's choice of subprotocol did not come back"
            await ws.send_str("hi")
            assert await ws.receive_str(timeout=5) == "echo:hi"
            await ws.send_bytes(b"\x00\x01\x02")
            assert await ws.receive_bytes(timeout=5) == b"\x02\x01\x00"
            big = "z" * 300_000  # several frames, several channel reads
            await ws.send_str(big)
            assert await ws.receive_str(timeout=10) == "echo:" + big
            # The upstream closes with its code: the caller gets that code.
            await ws.send_str("close:4001")
            message = await ws.receive(timeout=5)
            assert message.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 4001
        # The caller closes with its code: the upstream gets that code.
        async with http.ws_connect(ws_url(ports), headers=bearer("exec")) as ws:
            await ws.send_str("ping")
            assert await ws.receive_str(timeout=5) == "echo:ping"
            await ws.close(code=4002)
    async with asyncio.timeout(5):
        while len(ports.upstream.ws_closes) < 2:
            await asyncio.sleep(0.02)
    assert ports.upstream.ws_closes == [4001, 4002]


async def test_a_websocket_is_refused_with_the_http_status_of_its_error(ports: Ports) -> None:
    cases = [
        ({}, ws_url(ports), 401),
        (bearer("reader"), ws_url(ports), 403),
        (bearer("beta-exec"), ws_url(ports), 404),
        (bearer("exec"), ws_url(ports, port=70000), 400),
        (bearer("exec"), ws_url(ports, "/echo"), 502),  # not a WebSocket server there
    ]
    async with aiohttp.ClientSession() as http:
        for headers, url, status in cases:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with http.ws_connect(url, headers=headers):
                    pass
            assert refused.value.status == status, (headers, url)


async def test_a_websocket_opens_with_a_port_url(ports: Ports) -> None:
    token = (await ports.grant())["url"].partition("port_token=")[2]
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(ports) + f"?port_token={token}") as ws:
            await ws.send_str("via grant")
            assert await ws.receive_str(timeout=5) == "echo:via grant"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with http.ws_connect(ws_url(ports, session=await ports.ready_session()) + f"?port_token={token}"):
                pass
        assert refused.value.status == 403


async def test_openapi_documents_the_port_routes(ports: Ports) -> None:
    answer = await ports.http.get(f"{ports.url}/openapi.json", headers=bearer("exec"))
    paths = answer.json()["paths"]
    proxy = paths["/v1/sessions/{session_id}/ports/{port}/{path}"]
    assert {"get", "post", "put", "patch", "delete", "head", "options"} <= set(proxy)
    assert "get" in paths["/v1/sessions/{session_id}/ports/{port}"]
    assert "post" in paths["/v1/sessions/{session_id}/ports/{port}/url"]
