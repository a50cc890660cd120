"""The CLI as scripts use it: output, exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import redis.asyncio as aioredis

from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.keys import Keys
from orchestrator.sandboxes import SandboxRegistry
from orchestrator.schemas import SandboxInfo
from orchestrator.states import SandboxStatus
from tests.conftest import free_port

from .conftest import TOKENS


async def cli(api: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator.cli",
        "--api",
        api,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "ORCH_TOKEN": TOKENS["admin"]},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_create_list_get_and_events(api: str) -> None:
    code, out, err = await cli(api, "sessions", "create", "--id", "cli-one", "--label", "team=x")
    assert code == 0, err
    assert "session cli-one on sandbox" in out and "pending" in out

    code, out, _ = await cli(api, "sessions", "ls", "--label", "team=x", "--json")
    assert code == 0
    assert [s["id"] for s in json.loads(out)] == ["cli-one"]

    code, out, _ = await cli(api, "sessions", "ls")
    assert code == 0 and "cli-one" in out and "pending" in out

    code, out, _ = await cli(api, "events", "--session", "cli-one", "--json")
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in events] == ["session.pending"]
    assert events[0]["session"] == "cli-one" and events[0]["id"]


async def test_exit_codes_scripts_can_rely_on(api: str) -> None:
    code, _, err = await cli(api, "sessions", "get", "no-such-one")
    assert code == 1 and "session_not_found" in err
    code, _, err = await cli(api, "sessions", "start", "BAD")
    assert code == 1 and "invalid_session_id" in err
    code, _, err = await cli(f"http://127.0.0.1:{free_port()}", "sessions", "ls")
    assert code == 5 and "cannot reach the API" in err
    code, _, err = await cli(api, "sessions", "create", "--label", "no-equals-sign")
    assert code == 2 and "key=value" in err


async def test_sandboxes_retire(api: str, settings: Settings) -> None:
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        keys = Keys(settings.key_prefix)
        registry = SandboxRegistry(redis, keys)
        info = SandboxInfo(
            id="cli-gone", depth=1, version="0", hostname="h", sessions=0, capacity=1, load=0.0,
            free_disk_bytes=0, privilege="caps", ts="2026-01-01T00:00:00.000Z", status=SandboxStatus.DRAINED,
        )  # fmt: skip
        assert await registry.beat(info)  # drained: said goodbye, no alive key
        code, out, _ = await cli(api, "sandboxes", "ls")
        assert code == 0 and "cli-gone" in out
        code, out, err = await cli(api, "sandboxes", "retire", "cli-gone")
        assert code == 0, err
        assert "sandbox cli-gone: retired, 0 sessions deleted" in out
        code, out, _ = await cli(api, "sandboxes", "ls")
        assert code == 0 and "cli-gone" not in out
        code, _, err = await cli(api, "sandboxes", "retire", "never-seen")
        assert code == 1 and "sandbox_not_found" in err
    finally:
        await redis.aclose()


async def test_what_other_clients_wrote_reaches_the_terminal_without_control_characters(api: str) -> None:
    """L7: a label value with ESC sequences, printed by ls, and an API error text."""
    async with Client(api, token=TOKENS["admin"]) as client:
        await client.create("cli-evil", labels={"note": "\x1b[2J\x1b]0;owned\x07[bold]x"})
    code, out, _ = await cli(api, "sessions", "ls")
    assert code == 0 and "cli-evil" in out
    assert "\x1b" not in out and "\x07" not in out
    assert "note=[2J]0;owned[bold]x" in out
