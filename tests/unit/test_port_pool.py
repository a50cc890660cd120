"""The port pool's bookkeeping with stand-in channels (pure logic: no route, no upstream)."""

from __future__ import annotations

import asyncio

from orchestrator.access_channel import Control, FrameKind
from orchestrator.config import Settings
from orchestrator.port_pool import PortConnections
from orchestrator.records import new_record
from orchestrator.schemas import SessionCreate


class QuietChannel:
    """A channel whose upstream never speaks while kept."""

    def __init__(self) -> None:
        self.closed = False

    async def send(self, data: bytes) -> None: ...

    async def send_eof(self) -> None: ...

    async def send_control(self, control: Control) -> None: ...

    async def receive(self) -> tuple[FrameKind, bytes]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self.closed = True


class Opener:
    def __init__(self) -> None:
        self.channels: list[QuietChannel] = []

    async def open_port(self, record: object, port: int, *, by: str) -> QuietChannel:
        self.channels.append(QuietChannel())
        return self.channels[-1]


async def test_a_stale_kept_connection_is_dropped_and_an_older_fresh_one_taken() -> None:
    opener = Opener()
    pool = PortConnections(opener, idle_s=30)
    record = new_record(SessionCreate(id="s-pool"), "box", Settings())
    first = await pool.fresh(record, 8000, by="t")
    second = await pool.fresh(record, 8000, by="t")
    for connection in (first, second):
        connection.exchange.next_cycle = lambda: True  # type: ignore[method-assign]
        await pool.release(connection, reusable=True)
    newest = list(pool._kept.values())[-1]
    newest.since -= 60  # kept past idle_s: never handed out
    taken = await pool.connect(record, 8000, by="t", method=b"GET", replayable=True)
    assert taken is first and taken.reused
    await asyncio.sleep(0)  # the stale one's close runs
    assert opener.channels[1].closed and not opener.channels[0].closed
    await pool.aclose()
