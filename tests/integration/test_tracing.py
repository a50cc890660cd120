"""A trace id from the API request travels in the job: every event and log line of that
operation carries it (real API, worker, Redis and dockerd)."""

from __future__ import annotations

import logging
import secrets

import httpx
import pytest

from orchestrator.client import Client
from workers.worker import SandboxWorker

from .conftest import TOKENS


async def test_a_trace_id_travels_from_the_request_through_the_job(
    api: str, client: Client, worker: SandboxWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    created_trace, deleted_trace = secrets.token_hex(16), secrets.token_hex(16)
    headers = {"Authorization": f"Bearer {TOKENS['admin']}"}
    async with httpx.AsyncClient(base_url=api, headers=headers, timeout=30) as http:
        response = await http.post(
            "/v1/sessions", json={}, headers={"traceparent": f"00-{created_trace}-{'1' * 16}-01"}
        )
        assert response.status_code == 202, response.text
        assert response.headers["traceparent"].split("-")[1] == created_trace
        session = response.json()["id"]
        events = await client.wait_for(session, {"session.ready", "session.failed"}, timeout=120)
        assert events[-1].type == "session.ready"
        assert {e.type for e in events} >= {"session.pending", "volume.created", "desktop.started", "dockerd.ready"}
        assert {e.data["trace"] for e in events} == {created_trace}, [(e.type, e.data["trace"]) for e in events]

        response = await http.delete(
            f"/v1/sessions/{session}", headers={"traceparent": f"00-{deleted_trace}-{'2' * 16}-01"}
        )
        assert response.status_code == 202, response.text
        more = await client.wait_for(session, {"session.deleted"}, timeout=120, after=events[-1].id)
        # The health checker's own findings (a desktop going down under the delete) are not the
        # request's: they carry no trace.
        caused = [e for e in more if e.type != "desktop.health"]
        assert {e.data["trace"] for e in caused} == {deleted_trace}, [(e.type, e.data["trace"]) for e in more]

        # No traceparent (or a malformed one): a new trace, returned to the caller and used.
        response = await http.post("/v1/sessions", json={}, headers={"traceparent": "garbage"})
        fresh = response.headers["traceparent"].split("-")[1]
        assert len(fresh) == 32 and fresh not in (created_trace, deleted_trace)
        other = response.json()["id"]
        first = await client.wait_for(other, {"session.pending"}, timeout=30)
        assert first[-1].data["trace"] == fresh
        await client.wait_ready(other, timeout=120)

    # The worker's log lines of each operation carry its trace id.
    lines = [(r.name, getattr(r, "trace", None), r.getMessage()) for r in caplog.records if session in r.getMessage()]
    assert any(t == created_trace and n.startswith("workers.") and "create_session" in m for n, t, m in lines), lines
    assert any(t == deleted_trace and "delete_session" in m for n, t, m in lines), lines
