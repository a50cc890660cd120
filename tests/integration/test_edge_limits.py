"""Bounds at the edge, on the real API over loopback and a real Redis: what a client (with a
token or without) can make one API process hold. Event ids, filter lists, query strings, open
streams per token and per process, request line and header size; and under thousands of event
streams the process's Redis connections stay few while a well-behaved client keeps up."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.events import EventBus, make_event
from orchestrator.keys import Keys

from .conftest import ADMIN, TOKENS, running_api


async def publish(bus: EventBus, session: str, n: int = 1) -> list[str]:
    return [await bus.publish(make_event("edge.test", sandbox="s", session=session, data={"i": i})) for i in range(n)]


async def status_of(api: str, path: str, headers: dict[str, str] | None = None, **params: str | list[str]) -> int:
    async with httpx.AsyncClient(base_url=api, headers=ADMIN) as http:
        response = await http.get(path, headers=headers or {}, params={"follow": "false", **params})
        return response.status_code


async def error_of(api: str, path: str, headers: dict[str, str] | None = None, **params: str | list[str]) -> str:
    """The error code of a refused stream request (asserting it was refused, with no frame sent)."""
    async with httpx.AsyncClient(base_url=api, headers=ADMIN) as http:
        response = await http.get(path, headers=headers or {}, params={"follow": "false", **params})
    assert response.status_code >= 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    code: str = response.json()["code"]
    return code


@pytest.mark.parametrize(
    "bad",
    [
        "\u0661\u0662\u0663",  # Arabic-Indic digits: \d took them
        "\u0661\u0662\u0663-0",
        "18446744073709551616",  # 2**64
        "1-18446744073709551616",
        "123456789012345678901",  # 21 digits
        "1-2-3",
        "+1",
        "1 ",
    ],
)
async def test_a_bad_event_id_is_400_before_any_frame(api: str, bus: EventBus, bad: str) -> None:
    await publish(bus, "ids-one")
    for path in ("/v1/events", "/v1/sessions/ids-one/events"):
        if bad.strip() == bad:  # HTTP strips a header value's surrounding blanks
            header = {"Last-Event-ID": bad.encode()}  # as UTF-8 bytes, as a client may send it
            assert await error_of(api, path, headers=header) == "invalid_event_id"  # type: ignore[arg-type]
        assert await error_of(api, path, after=bad) == "invalid_event_id"


async def test_the_largest_event_id_is_accepted(api: str, bus: EventBus) -> None:
    await publish(bus, "ids-two")
    top = str(2**64 - 1)
    assert await status_of(api, "/v1/events", headers={"Last-Event-ID": f"{top}-{top}"}) == 200


async def test_unknown_sessions_have_no_stream_but_deleted_ones_keep_theirs(
    api: str, client: Client, bus: EventBus
) -> None:
    assert await error_of(api, "/v1/sessions/never-was/events") == "session_not_found"
    await client.create("made-here")  # a record, and so a stream
    assert await status_of(api, "/v1/sessions/made-here/events") == 200
    await publish(bus, "only-a-stream")  # no record (deleted), its stream still kept
    assert await status_of(api, "/v1/sessions/only-a-stream/events") == 200


async def test_filter_lists_and_query_strings_are_bounded(api: str) -> None:
    many = [f"t{i}" for i in range(33)]
    assert await status_of(api, "/v1/events", type=many[:32]) == 200
    assert await error_of(api, "/v1/events", type=many) == "too_many_filters"
    assert await error_of(api, "/v1/events", session=[f"s{i}" for i in range(33)]) == "too_many_filters"
    assert await error_of(api, "/v1/events", label=[f"k{i}=v" for i in range(33)]) == "too_many_filters"
    assert await error_of(api, "/v1/sessions/some-one/events", type=many) == "too_many_filters"
    assert await error_of(api, "/v1/events", type=["x" * 5000]) == "query_too_long"


@contextlib.asynccontextmanager
async def open_stream(api: str, path: str, token: str = TOKENS["admin"]) -> AsyncIterator[httpx.Response]:
    async with (
        httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=10) as http,
        http.stream("GET", path) as response,
    ):
        yield response


async def test_open_streams_are_capped_per_token_and_per_process(settings: Settings) -> None:
    capped = dataclasses.replace(settings, sse_max_streams=3, sse_max_streams_per_token=2)
    async with running_api(capped) as api, contextlib.AsyncExitStack() as streams:
        for _ in range(2):
            assert (await streams.enter_async_context(open_stream(api, "/v1/events"))).status_code == 200
        async with open_stream(api, "/v1/events") as third:
            assert third.status_code == 429
            assert (await third.aread()) and (third.json())["code"] == "too_many_streams"
        # Another token still gets one (the process has room for three)...
        other = await streams.enter_async_context(open_stream(api, "/v1/events", TOKENS["events:read"]))
        assert other.status_code == 200
        # ...and then the process is full, whoever asks.
        async with open_stream(api, "/v1/events", TOKENS["events:read"]) as fourth:
            assert fourth.status_code == 429
        await streams.aclose()  # the streams end: their slots come back
        async with asyncio.timeout(10):
            while True:
                async with open_stream(api, "/v1/events") as again:
                    if again.status_code == 200:
                        break
                await asyncio.sleep(0.05)


RESET = b"<connection reset>"


def refused(answer: bytes) -> bool:
    return answer.startswith(b"HTTP/1.1 400") or answer == RESET


async def raw_request(api: str, head: bytes, chunks: int = 0, chunk: bytes = b"") -> tuple[bytes, int]:
    """Send ``head`` then up to ``chunks`` times ``chunk`` on a raw socket, reading meanwhile;
    the server's first answer and how many bytes went out before it answered or closed."""
    host, port = api.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    answer = asyncio.create_task(reader.read(4096))  # read while writing: the answer comes before the reset
    sent = len(head)
    try:
        writer.write(head)
        with contextlib.suppress(ConnectionError):
            for _ in range(chunks):
                if answer.done():
                    break
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(0)  # let the answer in
                sent += len(chunk)
        async with asyncio.timeout(10):
            try:
                return await answer, sent
            except ConnectionResetError:
                # The server closed with our bytes unread: its RST can overtake its 400 (Linux
                # drops the unread answer). Still a refusal; ``sent`` tells how early.
                return RESET, sent
    finally:
        answer.cancel()
        writer.close()


async def test_an_oversized_request_line_or_header_block_is_refused_before_the_app(api: str) -> None:
    await assert_oversized_requests_refused(api)


async def assert_oversized_requests_refused(api: str) -> None:
    """No token: the guard never runs; the parser stops at ORCH_MAX_HEADER_BYTES (16 KiB)."""
    chunk = b"type=x&" * 8192
    line, sent = await raw_request(api, b"GET /v1/events?", 128, chunk)  # would be 7 MiB
    assert refused(line), line[:200]
    assert sent < 128 * len(chunk), sent  # refused before the whole line was in
    header = b"X-A: " + b"a" * (1 << 17) + b"\r\n"
    headers, sent = await raw_request(api, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", 64, header)  # 8 MiB
    assert refused(headers), headers[:200]
    assert sent < 64 * len(header), sent
    # Just under the bound is served.
    fine, _ = await raw_request(api, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 12_000 + b"\r\n\r\n")
    assert fine.startswith(b"HTTP/1.1 200"), fine[:200]


TEST_CLIENT = "edge-test"


async def api_redis_clients(redis: aioredis.Redis) -> int:
    """Connections to Redis that are not this test's own (those are named TEST_CLIENT)."""
    clients = await redis.client_list()
    return sum(1 for c in clients if c.get("name") != TEST_CLIENT)


async def hold_stream(api: str, path: str, opened: asyncio.Event | None = None) -> int:
    """A raw SSE client that reads (and drops) everything until cancelled; its status code."""
    host, port = api.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {ADMIN['Authorization']}\r\n\r\n".encode())
        status = int((await reader.readline()).split()[1])
        if opened is not None:
            opened.set()
        while status == 200 and await reader.read(65536):
            pass
        return status
    except ConnectionError:
        return 0
    finally:
        writer.close()


@pytest.mark.slow
async def test_thousands_of_streams_hold_few_redis_connections(settings: Settings) -> None:
    roomy = dataclasses.replace(
        settings,
        sse_max_streams=2000,
        sse_max_streams_per_token=2000,
        max_connections=10_000,
        redis_max_connections=32,
        # Everything (API, 6,000 clients, this test) shares one event loop on a busy machine.
        redis_pool_timeout_s=60.0,
    )
    redis = aioredis.Redis.from_url(roomy.redis_url, client_name=TEST_CLIENT)
    bus = EventBus(redis, Keys(roomy.key_prefix))
    await publish(bus, "crowded")
    others = [f"other-{i}" for i in range(200)]
    for session in others:
        await publish(bus, session)
    peak = 0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, await api_redis_clients(redis))
            await asyncio.sleep(0.02)

    async with running_api(roomy) as api:
        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        # 1,000 clients on one real session and one on each of 200 others, all following live.
        followers = [asyncio.create_task(hold_stream(api, "/v1/sessions/crowded/events")) for _ in range(1000)]
        followers += [asyncio.create_task(hold_stream(api, f"/v1/sessions/{s}/events")) for s in others]
        async with Client(api, token=TOKENS["admin"]) as client:
            watched = client.events("crowded")
            async with contextlib.aclosing(watched):  # type: ignore[type-var]
                first = await anext(aiter(watched))
                # 5,000 streams asked for made-up sessions, 250 at a time, while events flow.
                gate = asyncio.Semaphore(250)

                async def made_up() -> int:
                    async with gate:
                        return await hold_stream(api, f"/v1/sessions/nope-{random.getrandbits(64):x}/events")

                storm = asyncio.gather(*(made_up() for _ in range(5000)))
                published = [
                    await bus.publish(make_event("edge.live", sandbox="s", session="crowded")) for _ in range(50)
                ]
                received = []
                async with asyncio.timeout(120):
                    async for event in watched:
                        received.append(event.id)
                        if len(received) == len(published):
                            break
                statuses = await asyncio.wait_for(storm, 180)
            elapsed = time.monotonic() - started
            # The storm is over; 1,200 streams stay open and following.
            info = await redis.info("clients")
            idle, blocked = await api_redis_clients(redis), int(info["blocked_clients"])
        stop.set()
        await sampler
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
    await redis.aclose()
    assert first.type == "edge.test"
    assert received == published  # the well-behaved client got every event, in order
    assert set(statuses) == {404}
    print(
        f"\nAPI's Redis connections: peak {peak} (pool max {roomy.redis_max_connections}) in {elapsed:.1f} s;"
        f" after it, with 1,200 streams on 201 sessions open: {idle} connected, {blocked} blocked in XREAD"
    )
    assert peak <= roomy.redis_max_connections
    # The hub's one reader (not one per stream) and the command stream's one consumer.
    assert blocked == 2
