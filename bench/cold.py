"""Cold start: `POST /v1/sessions` → `dockerd.ready` seen on the SSE stream, against a bare
baseline doing the same Docker operations with aiodocker directly (no API, no queue, no
Redis), alternating in the same run.

    python -m bench.cold [-n 20]        (DOCKER_HOST and REDIS_URL from scripts/env.sh)

Prints p50/p95/p99 of both and their ratio; writes bench/results/cold-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from orchestrator.auth import hash_token, new_token
from orchestrator.client import Client
from workers.docker import DesktopRuntime
from workers.privilege import candidates, read_bounding_set

RESULTS = Path(__file__).parent / "results"
BENCH_TOKEN = new_token()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": statistics.median(values),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
    }


async def project_once(client: Client) -> float:
    started = time.perf_counter()
    record = await client.create()
    events = await client.wait_for(record["id"], {"dockerd.ready", "session.failed"}, timeout=120)
    elapsed = time.perf_counter() - started
    if events[-1].type != "dockerd.ready":
        raise RuntimeError(f"session failed: {events[-1].data}")
    await client.delete(record["id"])
    await client.wait_for(record["id"], {"session.deleted"}, timeout=120, after=events[-1].id)
    return elapsed


async def bare_once(runtime: DesktopRuntime) -> float:
    session = "bare-" + uuid.uuid4().hex[:10]
    started = time.perf_counter()
    await runtime.ensure_volume(session)
    await runtime.create_desktop(session, 1)
    t0 = time.monotonic()
    await runtime.start_desktop(session)
    await runtime.wait_dockerd(session, t0, 120)
    elapsed = time.perf_counter() - started
    await runtime.remove_desktop(session, 20)
    await runtime.remove_volume(session)
    runtime.remove_socket_dir(session)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=20)
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:6]
    socket_dir = tempfile.mkdtemp(prefix="orch-bench-")
    port = 18000 + int(tag, 16) % 1000
    env = {
        **os.environ,
        "ORCH_KEY_PREFIX": f"bench-{tag}:",
        "ORCH_SANDBOX_ID": f"bench{tag}",
        "ORCH_SOCKET_DIR": socket_dir,
        "ORCH_API_PORT": str(port),
        "ORCH_TOKENS": f"bench:{hash_token(BENCH_TOKEN)}:admin",
        "ORCH_DEFAULT_SANDBOX": f"bench{tag}",
    }
    procs = [
        subprocess.Popen([sys.executable, "-m", "orchestrator.cli", role], env=env, stderr=subprocess.DEVNULL)
        for role in ("api", "worker")
    ]
    try:
        project, bare = asyncio.run(measure(args.n, tag, port, socket_dir))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    report(args.n, project, bare)
    return 0


async def measure(n: int, tag: str, port: int, socket_dir: str) -> tuple[list[float], list[float]]:
    base_url = f"http://127.0.0.1:{port}"
    # The bare path gets the profile the worker would pick here (all but what the machine lacks).
    profile = candidates("auto", *read_bounding_set())[-1]
    runtime = DesktopRuntime(
        docker_host=os.environ.get("DOCKER_HOST"),
        image=os.environ.get("ORCH_DESKTOP_IMAGE", "orchestrator/desktop:dev"),
        sandbox_id=f"bench{tag}",
        depth=1,
        socket_dir=socket_dir,
        profile=profile,
    )
    try:
        async with httpx.AsyncClient(base_url=base_url) as http:
            for _ in range(200):
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        project: list[float] = []
        bare: list[float] = []
        async with Client(base_url, token=BENCH_TOKEN) as client:
            await project_once(client)  # warm-up: first image use, worker's privilege probe
            await bare_once(runtime)
            for i in range(n):
                # Alternate which goes first so drift in the machine hits both alike.
                order = (project_once(client), bare_once(runtime))
                first, second = order if i % 2 == 0 else order[::-1]
                a, b = await first, await second
                p, r = (a, b) if i % 2 == 0 else (b, a)
                project.append(p)
                bare.append(r)
                print(f"  {i + 1:3}/{n}  project {p * 1000:7.0f} ms   bare {r * 1000:7.0f} ms", flush=True)
    finally:
        await runtime.close()
    return project, bare


def report(n: int, project: list[float], bare: list[float]) -> None:
    result = {
        "scenario": "cold",
        "n": n,
        "project_s": summary(project),
        "bare_s": summary(bare),
        "ratio_p50": statistics.median(project) / statistics.median(bare),
        "raw": {"project": project, "bare": bare},
    }
    print(f"\n{'cold':8} {'p50':>8} {'p95':>8} {'p99':>8}   (seconds, n={n})")
    for name in ("project", "bare"):
        s = result[f"{name}_s"]
        print(f"{name:8} {s['p50']:8.3f} {s['p95']:8.3f} {s['p99']:8.3f}")
    print(f"ratio p50 project/bare: {result['ratio_p50']:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cold-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    sys.exit(main())
