"""SSE over Redis Streams, on a real API socket: ids, order, resume."""

from __future__ import annotations

import httpx

from orchestrator.client import Client, SseParser
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
