"""The dashboard in a real headless browser (Debian's chromium driven by Playwright): a session
created through the API turns `ready` on the page, live, and its stop button works; the create
button makes one; a session's page shows its record, its events and where its bring-up time went;
its terminal (xterm.js, served by the API) runs commands in the desktop; its files go both ways."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest

from orchestrator.client import Client
from workers.worker import SandboxWorker

from .conftest import TOKENS

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

CHROMIUM = os.environ.get("ORCH_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[2] / "build" / "dashboard.png"
SESSION_SCREENSHOT = SCREENSHOT.with_name("dashboard-session.png")
# Every CSP violation of the page, recorded before its own scripts run: the assertion that the
# policy lets through what the page needs (its vendored scripts, its WebSocket) and nothing else.
RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation",
  e => window.__violations.push(e.violatedDirective + " " + e.blockedURI));
"""


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
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
            yield browser
        finally:
            await browser.close()


async def dashboard_page(browser: Browser, api: str, fragment: str = "") -> Page:
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.add_init_script(RECORD_VIOLATIONS)
    await page.goto(f"{api}/dashboard?access_token={TOKENS['admin']}{fragment}")
    await page.wait_for_selector("#status:text('live')", timeout=20_000)
    return page


async def violations(page: Page) -> list[str]:
    found: list[str] = await page.evaluate("window.__violations")
    return found


async def test_a_session_turns_ready_on_the_dashboard_and_stops_from_it(
    api: str, client: Client, worker: SandboxWorker
) -> None:
    async with chromium() as browser:
        page = await dashboard_page(browser, api)
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
        assert await violations(page) == []


async def test_the_dashboard_needs_a_token(api: str) -> None:
    async with httpx.AsyncClient(base_url=api) as http:
        assert (await http.get("/dashboard")).status_code == 401
        assert (await http.get("/dashboard", params={"access_token": "wrong"})).status_code == 401
        page = await http.get("/dashboard", params={"access_token": TOKENS["events:read"]})
    assert page.status_code == 200 and '<table id="sessions">' in page.text


async def test_tokens_in_urls_only_for_event_streams_and_security_headers_everywhere(api: str) -> None:
    """L2: a token in a URL lands in logs and histories, so only what a browser's EventSource
    must open takes one; every answer forbids framing, sniffing and referrers; the schema has
    no HTML viewer (each loads a CDN's scripts into a page whose URL would hold the token)."""
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


VENDOR = Path(__file__).resolve().parents[2] / "orchestrator" / "static" / "vendor"


async def test_the_assets_route_serves_the_vendored_xterm_and_nothing_else(api: str) -> None:
    """Public (a script tag sends no token), typed (nosniff refuses an untyped script), the
    vendored bytes as checked by scripts/fetch-web-assets.sh, and only the allow-listed names."""
    async with httpx.AsyncClient(base_url=api) as http:
        page = await http.get("/dashboard", params={"access_token": TOKENS["events:read"]})
        served = {
            name: await http.get(f"/dashboard/assets/{name}") for name in ("xterm.js", "xterm.css", "addon-fit.js")
        }
        refused = {
            name: await http.get(f"/dashboard/assets/{name}")
            for name in ("dashboard.html", "PINS", "SHA256SUMS", "xterm.js.map", "XTERM.JS", "..%2Fapi.py", "")
        }
    sums = dict(line.split()[::-1] for line in (VENDOR / "SHA256SUMS").read_text().splitlines())
    types = {"xterm.js": "text/javascript", "xterm.css": "text/css", "addon-fit.js": "text/javascript"}
    for name, answer in served.items():
        assert answer.status_code == 200, name
        assert answer.headers["content-type"] == f"{types[name]}; charset=utf-8", name
        assert answer.headers["x-content-type-options"] == "nosniff", name
        assert hashlib.sha256(answer.content).hexdigest() == sums[name], name
        # What the page loads is what is served.
        assert f'"/dashboard/assets/{name}"' in page.text, name
    assert b"Terminal" in served["xterm.js"].content and b"FitAddon" in served["addon-fit.js"].content
    for name, answer in refused.items():
        assert answer.status_code == 404, name
    assert refused["PINS"].json()["code"] == "asset_not_found"
    csp = page.headers["content-security-policy"]
    assert "script-src 'self' 'unsafe-inline'" in csp and "style-src 'self' 'unsafe-inline'" in csp


async def _stored_events(client: Client, session_id: str) -> list[dict[str, Any]]:
    return [event.data async for event in client.events(session_id, follow=False)]


async def test_the_create_button_makes_a_session_whose_page_shows_its_bring_up(
    api: str, client: Client, worker: SandboxWorker
) -> None:
    async with chromium() as browser:
        page = await dashboard_page(browser, api)
        await page.fill("#create-labels", "made-by=button, team=ml")
        await page.click("button[data-action='create']")
        rows = page.locator("#sessions tr[data-session-id]")
        await rows.first.wait_for(timeout=20_000)
        session_id = await rows.first.get_attribute("data-session-id")
        assert session_id is not None and await rows.count() == 1
        row = f"tr[data-session-id='{session_id}']"
        await page.wait_for_selector(f"{row}[data-state='ready']", timeout=90_000)
        assert (await client.get(session_id)).spec.labels == {"made-by": "button", "team": "ml"}
        [ready] = [e for e in await _stored_events(client, session_id) if e["type"] == "session.ready"]
        phases = {name: ms for name, ms in ready["data"]["phases_ms"].items() if name != "total"}
        assert {"queue", "prepare", "dockerd"} <= phases.keys()

        await page.click(f"{row} a[data-action='open']")
        assert page.url.endswith(f"#session={session_id}")
        await page.wait_for_selector(f"#session-page[data-session-id='{session_id}'][data-state='ready']")
        assert await page.is_hidden("#overview")
        await page.wait_for_selector("#phases div[data-phase]", timeout=20_000)
        segments: list[list[Any]] = await page.eval_on_selector_all(
            "#phases div", "els => els.map(e => [e.dataset.phase, e.title, e.getBoundingClientRect().width])"
        )
        assert [(name, title) for name, title, _ in segments] == [(n, f"{n}: {ms} ms") for n, ms in phases.items()]
        # As wide as its share: the longest phase has the widest segment.
        widest = max(segments, key=lambda s: float(s[2]))[0]
        assert phases[widest] == max(phases.values()), (segments, phases)
        assert f"({ready['data']['phases_ms']['total']} ms" in await page.inner_text("h2:has(#phases-total)")
        legend = await page.inner_text("#phases-legend")
        assert all(f"{name} {ms} ms" in legend for name, ms in phases.items()), legend
        # The session's events, from its beginning.
        for kind in ("session.pending", "session.creating", "dockerd.ready", "session.ready"):
            await page.wait_for_selector(f"#session-events li[data-type='{kind}']", timeout=10_000)
        assert "made-by=button" in await page.inner_text("#record")

        # The terminal's WebSocket is not refused by the page's CSP (connect-src 'self' covers
        # ws: to its own origin), whether or not the server then accepts it.
        await page.click("#terminal-open")
        await page.wait_for_selector("#terminal:is([data-state='open'], [data-state='closed'])", timeout=20_000)
        SESSION_SCREENSHOT.parent.mkdir(exist_ok=True)
        await page.screenshot(path=str(SESSION_SCREENSHOT), full_page=True)
        await page.click("h1 a")
        await page.wait_for_selector("#overview:not([hidden])")
        assert await page.is_hidden("#session-page")
        assert await violations(page) == []


async def _terminal_text(page: Page) -> str:
    text: str = await page.inner_text("#terminal .xterm-rows")
    return text


async def test_the_terminal_on_the_session_page_runs_docker_info_in_the_desktop(
    api: str, client: Client, worker: SandboxWorker
) -> None:
    import re

    from playwright.async_api import expect

    record = await client.create(labels={"test": "terminal"})
    await client.wait_ready(record.id, timeout=120)
    async with chromium() as browser:
        page = await dashboard_page(browser, api, f"#session={record.id}")
        await page.click("#terminal-open")
        await page.wait_for_selector("#terminal[data-state='open']", timeout=20_000)
        screen = page.locator("#terminal .xterm-rows")
        # The screen shows its last rows only (the rest is scrollback): keep the line in view.
        await page.keyboard.type("docker info | grep 'Storage Driver'")
        await page.keyboard.press("Enter")
        # (Playwright's expect, not wait_for_function: the page's CSP forbids the eval that needs.)
        await expect(screen).to_contain_text("Storage Driver: overlay2", timeout=60_000)

        async def size_in_desktop(mark: str) -> tuple[int, int]:
            await page.keyboard.type(f"echo {mark}=$(stty size)")
            await page.keyboard.press("Enter")
            await expect(screen).to_contain_text(re.compile(rf"{mark}=\d+ \d+"), timeout=20_000)
            found = re.search(rf"{mark}=(\d+) (\d+)", await _terminal_text(page))
            assert found is not None
            return int(found[1]), int(found[2])

        async def size_on_page() -> tuple[int, int]:
            rows, cols = (
                await page.get_attribute("#terminal", "data-rows"),
                await page.get_attribute("#terminal", "data-cols"),
            )
            return int(rows or 0), int(cols or 0)

        # Fitted to the panel from the start (cols and rows in the URL), and a narrower window
        # reaches the process (a resize message): the desktop's tty has the page's size each time.
        first = await size_on_page()
        assert first[1] > 80 and await size_in_desktop("FIRST") == first
        await page.set_viewport_size({"width": 800, "height": 900})
        await expect(page.locator("#terminal")).not_to_have_attribute("data-cols", str(first[1]), timeout=10_000)
        second = await size_on_page()
        assert second[1] < first[1]
        assert await size_in_desktop("SECOND") == second != first

        await page.keyboard.type("exit 3")
        await page.keyboard.press("Enter")
        await page.wait_for_selector("#terminal[data-state='closed'][data-exit-code='3']", timeout=20_000)
        assert await page.get_attribute("#terminal", "data-close-code") == "1000"
        # Open again, then close from the page (the button toggles): a fresh screen, a clean close.
        await page.click("#terminal-open")
        await page.wait_for_selector("#terminal[data-state='open']", timeout=20_000)
        await page.keyboard.type("echo again-$((2*21))")
        await page.keyboard.press("Enter")
        await expect(screen).to_contain_text("again-42", timeout=20_000)
        assert "FIRST=" not in await _terminal_text(page)
        assert await page.inner_text("#terminal-open") == "close"
        await page.click("#terminal-open")
        await page.wait_for_selector("#terminal[data-state='closed'][data-close-code='1000']", timeout=10_000)
        assert await page.inner_text("#terminal-open") == "open"
        for kind in ("terminal.opened", "terminal.closed"):
            await expect(page.locator(f"#session-events li[data-type='{kind}']")).to_have_count(2, timeout=10_000)
        assert await violations(page) == []


async def test_files_on_the_session_page_go_both_ways(
    api: str, client: Client, worker: SandboxWorker, tmp_path: Path
) -> None:
    import tarfile

    record = await client.create(labels={"test": "files"})
    await client.wait_ready(record.id, timeout=120)
    assert (await client.exec(record.id, ["mkdir", "-p", "/tmp/box"])).exit_code == 0
    payload = os.urandom(300_000)
    (tmp_path / "blob.bin").write_bytes(payload)
    async with chromium() as browser:
        page = await dashboard_page(browser, api, f"#session={record.id}")
        await page.wait_for_selector("#files[data-path='/']", timeout=20_000)
        await page.fill("#files-path", "/tmp")
        await page.press("#files-path", "Enter")
        await page.wait_for_selector("#files[data-path='/tmp'] tr[data-name='box'][data-kind='directory']")
        await page.click("#files tr[data-name='box'] a[data-action='cd']")
        await page.wait_for_selector("#files[data-path='/tmp/box']")
        await page.set_input_files("#files-upload", str(tmp_path / "blob.bin"))
        entry = "#files tr[data-name='blob.bin'][data-kind='file']"
        await page.wait_for_selector(entry, timeout=20_000)
        assert str(len(payload)) in await page.inner_text(entry)

        async with page.expect_download() as file_download:
            await page.click(f"{entry} button[data-action='download']")
        downloaded = await anyio.Path(await (await file_download.value).path()).read_bytes()
        assert hashlib.sha256(downloaded).digest() == hashlib.sha256(payload).digest()

        await page.click("#files-up")
        await page.wait_for_selector("#files[data-path='/tmp'] tr[data-name='box']")
        async with page.expect_download() as dir_download:
            await page.click("#files tr[data-name='box'] button[data-action='download']")
        archive = await dir_download.value
        assert archive.suggested_filename == "box.tar"
        with tarfile.open(await archive.path()) as tar:
            member = next(m for m in tar.getmembers() if m.name.rstrip("/").endswith("blob.bin"))
            extracted = tar.extractfile(member)
            assert extracted is not None and extracted.read() == payload
        for kind in ("files.written", "files.read"):
            await page.wait_for_selector(f"#session-events li[data-type='{kind}']", timeout=10_000)
        assert await violations(page) == []
