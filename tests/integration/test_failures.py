"""Failure paths end in `failed` with a code, and leave no half-made desktop behind."""

from __future__ import annotations

from dataclasses import replace

import pytest

from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.names import LABEL_SESSION, volume_name

from .conftest import adocker, running_worker


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"desktop_image": "orchestrator/no-such-image:none"}, "image_missing"),
        ({"ready_timeout_s": 0.05}, "dockerd_timeout"),
    ],
)
async def test_a_desktop_that_cannot_become_ready_fails_cleanly(
    client: Client, docker_settings: Settings, change: dict[str, object], code: str
) -> None:
    host = docker_settings.docker_host
    assert host
    async with running_worker(replace(docker_settings, **change)):  # type: ignore[arg-type]
        sid = (await client.create()).id
        events = await client.wait_for(sid, {"session.failed", "session.ready"}, timeout=90)
        failed = events[-1]
        assert failed.type == "session.failed"
        assert failed.data["data"]["code"] == code
        assert failed.data["data"]["message"]
        record = await client.get(sid)
        assert record.state == "failed"
        assert record.error is not None and record.error.code == code
        # No desktop is left running or stopped; the volume stays with the session until delete.
        assert await adocker("ps", "-aq", "--filter", f"label={LABEL_SESSION}={sid}", host=host) == ""

        await client.delete(sid)
        events = await client.wait_for(sid, {"session.deleted", "session.failed"}, timeout=90, after=failed.id)
        assert events[-1].type == "session.deleted"
        assert await adocker("volume", "ls", "-q", "--filter", f"name=^{volume_name(sid)}$", host=host) == ""
