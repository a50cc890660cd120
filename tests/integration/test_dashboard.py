"""The dashboard in a real headless browser (Debian's chromium driven by Playwright): a session
created through the API turns `ready` on the page, live, and its stop button works."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from orchestrator.client import Client
from workers.worker import SandboxWorker

from .conftest import TOKENS

CHROMIUM = os.environ.get("ORCH_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[2] / "build" / "dashboard.png"


async def test_a_session_turns_ready_on_the_dashboard_and_stops_from_it(
    api: str, client: Client, worker: SandboxWorker
) -> None:
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `scripts/env.sh up --test` installs Debian's chromium")
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            await page.goto(f"{api}/dashboard?access_token={TOKENS['admin']}")
            await page.wait_for_selector("#status:text('live')", timeout=20_000)

            record = await client.create(labels={"seen-by": "browser"})
            row = f"tr[data-session-id='{record.id}']"
            await page.wait_for_selector(row, timeout=20_000)
            await page.wait_for_selector(f"{row}[data-state='ready']", timeout=90_000)
            assert "seen-by=browser" in await page.inner_text(row)
            # The sandbox's heartbeat shows on the page too.
            await page.wait_for_selector(f"tr[data-sandbox-id='{worker.settings.sandbox_id}']", timeout=20_000)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            await page.screenshot(path=str(SCREENSHOT), full_page=True)

            await page.click(f"{row} button[data-action='stop']")
            await page.wait_for_selector(f"{row}[data-state='stopped']", timeout=90_000)
            assert (await client.get(record.id)).state == "stopped"
            events = await page.inner_text("#events")
            assert "dockerd.ready" in events and "session.stopped" in events
        finally:
            await browser.close()


async def test_the_dashboard_needs_a_token(api: str) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=api) as http:
        assert (await http.get("/dashboard")).status_code == 401
        assert (await http.get("/dashboard", params={"access_token": "wrong"})).status_code == 401
        page = await http.get("/dashboard", params={"access_token": TOKENS["events:read"]})
    assert page.status_code == 200 and '<table id="sessions">' in page.text


async def test_tokens_in_urls_only_for_event_streams_and_security_headers_everywhere(api: str) -> None:
    """L2: a token in a URL lands in logs and histories, so only what a browser's EventSource
    must open takes one; every answer forbids framing, sniffing and referrers; the schema has
    no HTML viewer (each loads a CDN's scripts into a page whose URL would hold the token)."""
    import httpx

    token = {"access_token": TOKENS["admin"]}
    async with httpx.AsyncClient(base_url=api) as http:
        assert (await http.get("/v1/sessions", params=token)).status_code == 401
        assert (await http.get("/v1/sandboxes", params=token)).status_code == 401
        async with http.stream("GET", "/v1/events", params=token) as stream:
            assert stream.status_code == 200
        answers = {
            "page": await http.get("/dashboard", params=token),
            "json": await http.get("/v1/sessions", headers={"Authorization": f"Bearer {TOKENS['admin']}"}),
            "refused": await http.get("/v1/sessions"),
            "unknown": await http.get("/nowhere", headers={"Authorization": f"Bearer {TOKENS['admin']}"}),
        }
        viewer = await http.get("/docs/swagger", headers={"Authorization": f"Bearer {TOKENS['admin']}"})
        spec = await http.get("/docs/openapi.json", headers={"Authorization": f"Bearer {TOKENS['admin']}"})
    assert [a.status_code for a in answers.values()] == [200, 200, 401, 404]
    for name, answer in answers.items():
        assert answer.headers["referrer-policy"] == "no-referrer", name
        assert answer.headers["x-frame-options"] == "DENY", name
        assert answer.headers["x-content-type-options"] == "nosniff", name
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"], name
    assert answers["page"].headers["cache-control"] == "no-store"
    assert "connect-src 'self'" in answers["page"].headers["content-security-policy"]
    assert answers["json"].headers["content-security-policy"].startswith("default-src 'none'")
    assert viewer.status_code == 404 and spec.status_code == 200
