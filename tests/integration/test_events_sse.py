"""SSE over Redis Streams, on a real API socket: ids, order, resume."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import httpx

from orchestrator.client import Client, ServerEvent, SseParser
from orchestrator.config import Settings
from orchestrator.events import EventBus, make_event

from .conftest import ADMIN


async def publish(bus: EventBus, session: str, n: int, start: int = 0) -> list[str]:
    return [
        await bus.publish(make_event(f"test.{i}", sandbox="s", session=session, data={"i": i}))
        for i in range(start, start + n)
    ]


async def test_reconnect_with_last_event_id_gets_exactly_the_missed_events_in_order(
    client: Client, bus: EventBus
) -> None:
    ids = await publish(bus, "sse-one", 3)
    seen = []
    async for event in client.events("sse-one"):
        seen.append(event)
        if len(seen) == 3:
            break  # the client disconnects here
    assert [e.id for e in seen] == ids
    assert [e.data["data"]["i"] for e in seen] == [0, 1, 2]

    missed = await publish(bus, "sse-one", 4, start=3)
    await publish(bus, "sse-other", 2)  # another session's events must not leak in

    resumed = []
    async for event in client.events("sse-one", after=seen[-1].id):
        resumed.append(event)
        if len(resumed) == 4:
            break
    assert [e.id for e in resumed] == missed
    assert [e.type for e in resumed] == ["test.3", "test.4", "test.5", "test.6"]


async def test_last_event_id_header_resumes_the_firehose_with_the_same_ids(api: str, bus: EventBus) -> None:
    ids = await publish(bus, "sse-two", 5)
    async with (
        httpx.AsyncClient(base_url=api, headers=ADMIN) as http,
        http.stream("GET", "/v1/events", headers={"Last-Event-ID": ids[1]}, params={"follow": "false"}) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        parser = SseParser()
        events = [e async for line in response.aiter_lines() if (e := parser.feed(line)) is not None]
    # The firehose and the session stream give an event the same id.
    assert [e.id for e in events] == ids[2:]


async def test_live_events_arrive_while_following(client: Client, bus: EventBus) -> None:
    await publish(bus, "sse-live", 1)
    received = []
    async for event in client.events("sse-live"):
        received.append(event.data["data"]["i"])
        if len(received) == 1:
            await publish(bus, "sse-live", 2, start=1)  # only once the stream is open
        if len(received) == 3:
            break
    assert received == [0, 1, 2]


async def test_invalid_last_event_id_is_400(api: str) -> None:
    async with httpx.AsyncClient(base_url=api, headers=ADMIN) as http:
        response = await http.get("/v1/events", headers={"Last-Event-ID": "yesterday"})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_event_id"


async def collect(api: str, path: str, headers: dict[str, str] | None = None, **params: str) -> list[ServerEvent]:
    async with (
        httpx.AsyncClient(base_url=api, headers=ADMIN) as http,
        http.stream("GET", path, headers=headers or {}, params={"follow": "false", **params}) as response,
    ):
        assert response.status_code == 200, await response.aread()
        parser = SseParser()
        return [e async for line in response.aiter_lines() if (e := parser.feed(line)) is not None]


async def test_firehose_filters_by_type_session_and_label(api: str, client: Client, bus: EventBus) -> None:
    await client.create("filt-a", labels={"team": "red"})
    await client.create("filt-b", labels={"team": "blue"})
    await publish(bus, "filt-a", 2)
    await publish(bus, "filt-b", 2)
    by_type = await collect(api, "/v1/events", after="0", type="test.1")
    assert [(e.type, e.data["session"]) for e in by_type] == [("test.1", "filt-a"), ("test.1", "filt-b")]
    by_prefix = await collect(api, "/v1/events", after="0", type="session.*")
    assert {e.type for e in by_prefix} == {"session.pending"}
    by_session = await collect(api, "/v1/events", after="0", session="filt-b")
    assert [e.type for e in by_session] == ["session.pending", "test.0", "test.1"]
    by_label = await collect(api, "/v1/events", after="0", label="team=red")
    assert {e.data["session"] for e in by_label} == {"filt-a"} and len(by_label) == 3


async def test_a_resume_point_that_was_trimmed_away_gets_a_reset_event(api: str, bus: EventBus) -> None:
    small = EventBus(bus._redis, bus.keys, firehose_maxlen=10, session_maxlen=10)
    first = await publish(small, "trim-me", 1)
    for _ in range(4):  # approximate trimming works in whole nodes of 100 entries
        await publish(small, "trim-me", 150)
    events = []
    async with (
        httpx.AsyncClient(base_url=api, headers=ADMIN) as http,
        http.stream(
            "GET", "/v1/sessions/trim-me/events", headers={"Last-Event-ID": first[0]}, params={"follow": "false"}
        ) as response,
    ):
        lines = [line async for line in response.aiter_lines()]
    assert "event: reset" in lines
    reset_data = lines[lines.index("event: reset") + 1]
    assert '"trimmed"' in reset_data and first[0] in reset_data
    parser = SseParser()
    events = [e for line in lines if (e := parser.feed(line)) is not None and e.type != "reset"]
    assert events, "after the reset, everything still kept follows"
    ids = [e.id for e in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))


async def test_a_stalled_client_does_not_delay_the_others(api: str, client: Client, bus: EventBus) -> None:
    await publish(bus, "slow-one", 1)  # a stream of no session yet: 404
    host, port = api.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = f"GET /v1/sessions/slow-one/events HTTP/1.1\r\nHost: x\r\nAuthorization: {ADMIN['Authorization']}"
    writer.write(request.encode() + b"\r\n\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")  # it connected, then never reads again
    try:
        big = "x" * 4000
        for i in range(300):  # ~1.2 MB for the stalled client, far past socket buffers
            await bus.publish(make_event("test.big", sandbox="s", session="slow-one", data={"i": i, "pad": big}))
        ids = await publish(bus, "fast-one", 3)
        received = []
        async with asyncio.timeout(10):
            async for event in client.events("fast-one"):
                received.append(event.id)
                if len(received) == 3:
                    break
        assert received == ids
    finally:
        writer.close()


async def test_the_client_resumes_by_itself_across_an_api_restart(settings: Settings, bus: EventBus) -> None:
    import uvicorn

    from orchestrator.api import create_app
    from tests.conftest import free_port

    from .conftest import TOKENS

    port = free_port()

    async def serve() -> tuple[uvicorn.Server, asyncio.Task[None]]:
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        async with asyncio.timeout(20):
            while not server.started:
                await asyncio.sleep(0.01)
        return server, task

    server, task = await serve()
    first = await publish(bus, "resume-me", 2)
    received: list[str] = []
    async with Client(f"http://127.0.0.1:{port}", token=TOKENS["admin"]) as client:
        events = client.events("resume-me")
        assert isinstance(events, AsyncGenerator)  # typed as an AsyncIterator: narrowed for aclose()
        async with asyncio.timeout(30):
            received.append((await anext(events)).id)
            received.append((await anext(events)).id)
            server.should_exit = True  # the API goes away mid-stream...
            await task
            missed = await publish(bus, "resume-me", 3, start=2)  # ...events happen meanwhile...
            server, task = await serve()  # ...and it comes back
            for _ in range(3):
                received.append((await anext(events)).id)
        await events.aclose()
    server.should_exit = True
    await task
    assert received == first + missed
