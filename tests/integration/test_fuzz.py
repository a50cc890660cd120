"""Hostile input: schemathesis generates requests from the API's own OpenAPI document (its
coverage phase: boundary and invalid values; then random fuzzing) against the real API and
Redis. No request may get a 5xx, and no response may carry a stack trace.

The two event-stream endpoints are left out: with ``follow`` (their default) they never end,
so every generated request would just wait for its timeout; their inputs (``after``,
``Last-Event-ID``, filters) have their own tests."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import Settings

from .conftest import TOKENS, running_api


@pytest.mark.timeout(600)
async def test_a_thousand_generated_requests_get_no_5xx_and_no_stack_traces(settings: Settings, tmp_path: Path) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.fail("schemathesis is not installed: `make venv` installs the test extras")
    report = tmp_path / "fuzz.ndjson"
    async with running_api(settings) as url:
        proc = await asyncio.create_subprocess_exec(
            st,
            "run",
            f"{url}/openapi.json",
            "-H",
            f"Authorization: Bearer {TOKENS['admin']}",
            "--checks",
            "not_a_server_error",
            "--exclude-path-regex",
            "/events",
            "--phases",
            "coverage,fuzzing",
            "--max-examples",
            "150",
            "--seed",
            "20261128",
            "--request-timeout",
            "10",
            "--report",
            "ndjson",
            "--report-ndjson-path",
            str(report),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 500)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    generated = re.search(r"(\d+) generated", text)
    assert generated and int(generated.group(1)) >= 1000, text[-2000:]
    responses = [r for line in report.read_text().splitlines() for r in _responses(json.loads(line))]
    assert len(responses) >= 1000, len(responses)
    assert not [status for status, _ in responses if status >= 500]
    for status, body in responses:
        assert b"Traceback" not in body and b'File "' not in body, (status, body[:500])
    # Refusals say why, in our error shape (a sample: each has a code and a message).
    refused = [json.loads(body) for status, body in responses if status in (400, 422) and body.startswith(b"{")]
    assert refused and all({"code", "message"} <= set(r) for r in refused)


def _responses(node: Any) -> Iterator[tuple[int, bytes]]:
    """Every recorded (status, body) in one report event, wherever it nests."""
    if isinstance(node, dict):
        response = node.get("response")
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            content = response.get("content") or {}
            body = base64.b64decode(content["$base64"]) if isinstance(content, dict) and "$base64" in content else b""
            yield response["status_code"], body
        for value in node.values():
            yield from _responses(value)
    elif isinstance(node, list):
        for value in node:
            yield from _responses(value)
