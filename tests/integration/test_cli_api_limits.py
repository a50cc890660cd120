"""M4 (e8) through the command operators run: `orchestrator api` itself (cli.py) refuses an
oversized request line or header block before the app, with no token. The `api` fixture builds
its own uvicorn.Config that copies cli.py's options, so without this test dropping ``http="h11"``
from cli.py would pass every other test while httptools took 7 MiB + 8 MiB again.

Its raw_request is test_edge_limits.py's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator

import httpx

from orchestrator.config import Settings, to_env
from tests.conftest import free_port

from .test_edge_limits import assert_oversized_requests_refused


@contextlib.asynccontextmanager
async def served_by_the_cli(settings: Settings) -> AsyncIterator[str]:
    """`python -m orchestrator.cli api` on a loopback port; yields its base URL once it answers."""
    port = free_port()
    env = {**os.environ, **to_env(settings), "ORCH_API_HOST": "127.0.0.1", "ORCH_API_PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator.cli",
        "api",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(30), httpx.AsyncClient(base_url=url) as http:
            while True:
                if proc.returncode is not None:
                    assert proc.stderr is not None
                    raise AssertionError(f"orchestrator api exited: {(await proc.stderr.read()).decode()[-2000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)


async def test_orchestrator_api_itself_refuses_an_oversized_request_line_or_header_block(settings: Settings) -> None:
    async with served_by_the_cli(settings) as api:
        await assert_oversized_requests_refused(api)
