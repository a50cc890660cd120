"""The port proxy against the same upstream reached directly: requests/s, latency (p50, p99),
and a large body's MB/s. `python -m bench.port_proxy [-n 1000] [-c 16] [-s 5]`.

Three processes: the upstream (aiohttp, tests/port_support.py), the API (uvicorn, h11 and
wsproto as `orchestrator api` serves, with the port routes and ``LoopbackAccess``: each request
a channel over a socketpair bridged to the upstream, as the worker's end will be) and this
client, with keep-alive connections to both. Redis from REDIS_URL (scripts/env.sh). The two
paths alternate in the same run; what is compared is their medians."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import uuid

import aiohttp
import httpx
from litestar import Litestar

from orchestrator.access_bridge import bridge
from orchestrator.access_channel import Channel, StreamChannel
from orchestrator.api import create_app
from orchestrator.auth import hash_token
from orchestrator.config import Settings, to_env
from orchestrator.events import EventBus
from orchestrator.keys import Keys
from orchestrator.redis_conn import redis_client
from orchestrator.schemas import SessionRecord
from orchestrator.states import SessionState as S
from orchestrator.store import SessionStore
from tests.conftest import free_port
from tests.port_support import LoopbackAccess, with_ports


class TcpRouteAccess:
    """The direct route's shape: a TCP connection per access to a "worker" (another process)
    that bridges it to the port, so the API process does the proxy's work only."""

    def __init__(self, route_port: int) -> None:
        self.route_port = route_port

    async def open_port(self, record: SessionRecord, port: int, *, by: str) -> Channel:
        return StreamChannel(*await asyncio.open_connection("127.0.0.1", self.route_port))


def app_from_env() -> Litestar:
    """The API with the port routes (uvicorn --factory): the TCP route when BENCH_ROUTE_PORT
    names the "worker", else the in-process loopback (its bridges in the API's process)."""
    route_port = os.environ.get("BENCH_ROUTE_PORT")
    access = TcpRouteAccess(int(route_port)) if route_port else LoopbackAccess()
    return with_ports(create_app(Settings.from_env()), access)


def _serve_route(route_port: int, upstream_port: int) -> None:
    """The worker's end: each connection bridged (access_bridge) to the upstream."""

    async def serve() -> None:
        async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream = await asyncio.open_connection("127.0.0.1", upstream_port)
            await bridge(StreamChannel(reader, writer), *upstream)

        server = await asyncio.start_server(one, "127.0.0.1", route_port)
        await server.serve_forever()

    asyncio.run(serve())


def _serve_upstream(port: int) -> None:
    from aiohttp import web

    from tests.port_support import Upstream, upstream_app

    seen = Upstream(port=port)
    app = upstream_app(seen)

    async def small(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/small", small)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def _wait_up(url: str) -> None:
    async with httpx.AsyncClient() as http:
        async with asyncio.timeout(30):
            while True:
                try:
                    await http.get(url)
                    return
                except httpx.TransportError:
                    await asyncio.sleep(0.1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def _latencies(http: aiohttp.ClientSession, url: str, n: int, headers: dict[str, str]) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        async with http.get(url, headers=headers) as answer:
            await answer.read()
            assert answer.status == 200, answer.status
        out.append((time.perf_counter() - started) * 1000)
    return out


async def _throughput(
    http: aiohttp.ClientSession, url: str, concurrency: int, seconds: float, headers: dict[str, str]
) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            async with http.get(url, headers=headers) as answer:
                await answer.read()
                assert answer.status == 200
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def _mb_per_s(http: aiohttp.ClientSession, url: str, headers: dict[str, str], mb: int) -> float:
    started = time.perf_counter()
    size = 0
    async with http.get(url, headers=headers) as answer:
        async for chunk in answer.content.iter_any():
            size += len(chunk)
    assert size == mb * 2**20
    return mb / (time.perf_counter() - started)


async def run(n: int, concurrency: int, seconds: float, separate_route: bool) -> dict[str, dict[str, float]]:
    token = f"bench-{uuid.uuid4().hex}"
    settings = dataclasses.replace(
        Settings.from_env(),
        key_prefix=f"bench-ports-{uuid.uuid4().hex[:8]}:",
        default_sandbox="bench",
        tokens=f"bench:{hash_token(token)}:admin",
    )
    upstream_port, api_port, route_port = free_port(), free_port(), free_port()
    spawn = multiprocessing.get_context("spawn")
    upstream = spawn.Process(target=_serve_upstream, args=(upstream_port,), daemon=True)
    upstream.start()
    route = spawn.Process(target=_serve_route, args=(route_port, upstream_port), daemon=True)
    if separate_route:
        route.start()
    env = {**os.environ, **to_env(settings), "PYTHONPATH": os.getcwd()}
    if separate_route:
        env["BENCH_ROUTE_PORT"] = str(route_port)
    argv = [sys.executable, "-m", "uvicorn", "--factory", "bench.port_proxy:app_from_env", "--host", "127.0.0.1"]
    argv += ["--port", str(api_port), "--http", "h11", "--log-level", "warning", "--no-access-log"]
    api = subprocess.Popen(argv, env=env)  # noqa: ASYNC220  # started once, before anything is measured
    redis = redis_client(settings)
    try:
        direct = f"http://127.0.0.1:{upstream_port}"
        base = f"http://127.0.0.1:{api_port}"
        await _wait_up(direct + "/small")
        await _wait_up(base + "/healthz")
        auth = {"Authorization": f"Bearer {token}"}
        connector = aiohttp.TCPConnector(limit=concurrency * 2)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
            async with http.post(f"{base}/v1/sessions", headers=auth, json={}) as created:
                session_id = (await created.json())["id"]
            store = SessionStore(redis, EventBus(redis, Keys(settings.key_prefix)))
            for target in (S.CREATING, S.STARTING, S.READY):
                await store.transition(session_id, target)
            proxied = f"{base}/v1/sessions/{session_id}/ports/{upstream_port}"
            paths: dict[str, tuple[str, dict[str, str]]] = {"direct": (direct, {}), "proxy": (proxied, auth)}
            return await _measure(http, paths, n, concurrency, seconds)
    finally:
        api.terminate()
        api.wait(10)
        for process in (upstream, route):
            if process.is_alive():
                process.terminate()
                process.join(10)
        await redis.aclose()


async def _measure(
    http: aiohttp.ClientSession, paths: dict[str, tuple[str, dict[str, str]]], n: int, concurrency: int, seconds: float
) -> dict[str, dict[str, float]]:
    """Latency, throughput and MB/s of each path, in rounds that alternate between them."""
    lat: dict[str, list[float]] = {k: [] for k in paths}
    rps: dict[str, list[float]] = {k: [] for k in paths}
    mbs: dict[str, list[float]] = {k: [] for k in paths}
    for url, headers in paths.values():  # warm up both
        await _latencies(http, url + "/small", 50, headers)
    rounds = 5
    for _ in range(rounds):
        for name, (url, headers) in paths.items():
            lat[name] += await _latencies(http, url + "/small", n // rounds, headers)
            rps[name].append(await _throughput(http, url + "/small", concurrency, seconds / rounds, headers))
            mbs[name].append(await _mb_per_s(http, url + "/big?mb=20", headers, 20))
    return {
        name: {
            "p50_ms": percentile(lat[name], 50),
            "p99_ms": percentile(lat[name], 99),
            "rps": statistics.median(rps[name]),
            "mb_s": statistics.median(mbs[name]),
        }
        for name in paths
    }


def _print(results: dict[str, dict[str, float]]) -> None:
    d, p = results["direct"], results["proxy"]
    print(f"{'':8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'MB/s':>8}")
    for name, row in results.items():
        print(f"{name:8} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['rps']:8.0f} {row['mb_s']:8.0f}")
    print(
        f"proxy/direct: throughput {p['rps'] / d['rps']:.2f}x, p50 +{p['p50_ms'] - d['p50_ms']:.2f} ms,"
        f" MB/s {p['mb_s'] / d['mb_s']:.2f}x"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.port_proxy", description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="sequential requests per path (latency)")
    parser.add_argument("-c", type=int, default=16, help="concurrent clients (throughput)")
    parser.add_argument("-s", type=float, default=5.0, help="seconds of throughput per path")
    parser.add_argument("--in-process", action="store_true", help="the bridges in the API's process (loopback)")
    args = parser.parse_args()
    _print(asyncio.run(run(args.n, args.c, args.s, not args.in_process)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
