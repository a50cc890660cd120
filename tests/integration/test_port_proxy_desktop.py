"""The port proxy into a real desktop (real API, worker, dockerd, Redis) by both roads of the
access route (orchestrator/access.py, workers/access_handlers.py): a server listening on the
desktop's loopback only is reached, a 20 MB file comes back whole, a port URL opens it, and a
port nothing listens on is 502 ``port_closed``."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time

import httpx
import pytest

from orchestrator.api import create_app
from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.names import desktop_name
from tests.port_support import with_ports

from .conftest import TEST_IMAGE, TOKENS, adocker, running_api, running_worker
from .test_exec import ready_session

pytestmark = pytest.mark.docker

EXEC = {"Authorization": f"Bearer {TOKENS['sessions:exec']}"}


async def _served(http: httpx.AsyncClient, url: str, timeout: float = 30) -> httpx.Response:
    """GET ``url`` once the desktop's server listens (502 ``port_closed`` until then)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await http.get(url, headers=EXEC)
        if answer.status_code != 502:
            return answer
        assert answer.json()["code"] == "port_closed", answer.text
        assert time.monotonic() < deadline, f"nothing listened within {timeout} s: {answer.text}"
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("route", ["direct", "relay"])
async def test_a_server_on_the_desktops_loopback_is_reached_through_the_proxy(
    route: str, docker_settings: Settings, docker_host: str
) -> None:
    settings = dataclasses.replace(docker_settings, access_route=route)
    async with (
        running_worker(settings),
        running_api(settings, with_ports(create_app(settings))) as api,
        Client(api, token=TOKENS["admin"]) as admin,
        ready_session(admin, preload_images=[TEST_IMAGE]) as sid,
        httpx.AsyncClient(timeout=60) as http,
    ):
        made = await admin.exec(
            sid,
            shell="mkdir -p /tmp/www && echo served-on-loopback > /tmp/www/index.html"
            " && head -c 20971520 /dev/urandom > /tmp/www/big.bin && sha256sum /tmp/www/big.bin",
        )
        assert made.exit_code == 0, made
        digest = made.stdout.split()[0]
        await adocker(
            "exec", "-d", desktop_name(sid), "desktop-enter",
            "python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory", "/tmp/www", "8123",
            host=docker_host,
        )  # fmt: skip
        base = f"{api}/v1/sessions/{sid}/ports/8123"
        answer = await _served(http, f"{base}/")
        assert answer.status_code == 200 and answer.text == "served-on-loopback\n", answer.text

        sha, size = hashlib.sha256(), 0
        async with http.stream("GET", f"{base}/big.bin", headers=EXEC) as big:
            assert big.status_code == 200
            async for chunk in big.aiter_raw():
                sha.update(chunk)
                size += len(chunk)
        assert (size, sha.hexdigest()) == (20 * 2**20, digest)

        granted = await http.post(f"{base}/url", headers=EXEC)
        assert granted.status_code == 201, granted.text
        async with httpx.AsyncClient(timeout=60) as browser:
            page = await browser.get(granted.json()["url"])
            assert page.status_code == 200 and page.text == "served-on-loopback\n"
            again = await browser.get(f"{base}/index.html")  # the cookie alone
            assert again.status_code == 200 and again.text == "served-on-loopback\n"

        # A port the desktop's own dockerd publishes (`docker run -p` inside): docker-proxy
        # listens in the desktop's network namespace, where the worker connects.
        published = await admin.exec(
            sid,
            shell=f"docker run -d -p 8000:80 {TEST_IMAGE} sh -c"
            " 'mkdir -p /www && echo published-by-dockerd > /www/index.html && exec httpd -f -p 80 -h /www'",
            timeout_s=60,
        )
        assert published.exit_code == 0, published
        answer = await _served(http, f"{api}/v1/sessions/{sid}/ports/8000/")
        assert answer.status_code == 200 and answer.text == "published-by-dockerd\n", answer.text
        # The port URL of 8123 opens 8123 only.
        other = await http.get(
            f"{api}/v1/sessions/{sid}/ports/8000/?port_token={granted.json()['url'].split('port_token=')[1]}"
        )
        assert other.status_code == 403, other.text

        closed = await http.get(f"{api}/v1/sessions/{sid}/ports/8999/", headers=EXEC)
        assert (closed.status_code, closed.json()["code"]) == (502, "port_closed"), closed.text
