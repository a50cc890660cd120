"""What every scenario shares: the services under test (the real API and worker as processes, on
the project's dockerd and Redis from scripts/env.sh), the bare baseline (the same Docker
operations through aiodocker, nothing else), alternation, statistics and the report.

Machines are noisy: each scenario runs the project's path and its baseline alternately in the
same run and reports medians and their ratio, never one run against another."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from orchestrator.auth import hash_token, new_token
from workers.privilege import candidates, read_bounding_set, read_uid_map
from workers.runtime import DesktopRuntime

RESULTS = Path(__file__).parent / "results"
DESKTOP_IMAGE = os.environ.get("ORCH_DESKTOP_IMAGE", "orchestrator/desktop:dev")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with n=20, p95 and p99 are real samples)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": statistics.median(values),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
    }


@dataclass
class Side:
    """One side of a comparison: samples (seconds, or the unit given) and failures."""

    name: str
    values: list[float] = field(default_factory=list)
    failures: int = 0

    @property
    def success_rate(self) -> float:
        total = len(self.values) + self.failures
        return len(self.values) / total if total else 0.0


@dataclass
class Result:
    scenario: str
    unit: str
    project: Side
    baseline: Side
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        p, b = summary(self.project.values), summary(self.baseline.values)
        ratio = p["p50"] / b["p50"] if p.get("p50") and b.get("p50") else None
        return {
            "scenario": self.scenario,
            "unit": self.unit,
            "project": {"name": self.project.name, **p, "success_rate": self.project.success_rate},
            "baseline": {"name": self.baseline.name, **b, "success_rate": self.baseline.success_rate},
            "ratio_p50": ratio,
            "notes": self.notes,
            "raw": {"project": self.project.values, "baseline": self.baseline.values},
        }


def scale(unit: str) -> tuple[float, str]:
    return (1000.0, "ms") if unit == "s" else (1.0, unit)


def print_table(results: list[Result]) -> None:
    header = f"{'scenario':24} {'side':30} {'n':>4} {'p50':>9} {'p95':>9} {'p99':>9} {'ok':>6} {'ratio':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    for result in results:
        d = result.as_dict()
        factor, unit = scale(result.unit)
        for side in ("project", "baseline"):
            s = d[side]
            if not s.get("n"):
                if getattr(result, side).failures:
                    print(f"{result.scenario:24} {s['name'][:30]:30} all {getattr(result, side).failures} runs failed")
                continue
            ratio = f"{d['ratio_p50']:.2f}" if side == "project" and d["ratio_p50"] is not None else ""
            print(
                f"{result.scenario:24} {s['name'][:30]:30} {s['n']:>4} "
                + " ".join(f"{s[q] * factor:>7.1f}{unit:>2}" for q in ("p50", "p95", "p99"))
                + f" {s['success_rate'] * 100:>5.0f}% {ratio:>6}"
            )
        for key, value in result.notes.items():
            print(f"{'':24}   {key}: {value}")


def write_results(results: list[Result], name: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    machine = {"cpus": os.cpu_count(), "kernel": os.uname().release, "python": sys.version.split()[0]}
    out.write_text(json.dumps({"machine": machine, "results": [r.as_dict() for r in results]}, indent=2))
    return out


async def alternate(
    n: int, project: Callable[[], Awaitable[float]], baseline: Callable[[], Awaitable[float]], result: Result
) -> Result:
    """Run both ``n`` times, swapping which goes first every round so drift hits both alike."""
    for i in range(n):
        pair = [(project, result.project), (baseline, result.baseline)]
        for run, side in pair if i % 2 == 0 else pair[::-1]:
            try:
                side.values.append(await run())
            except Exception as e:  # counted, reported, and the run goes on
                side.failures += 1
                print(f"  {side.name}: failed: {type(e).__name__}: {e}", flush=True)
        factor, unit = scale(result.unit)
        last = [f"{s.name} {s.values[-1] * factor:.1f}{unit}" for _, s in pair if s.values]
        print(f"  {result.scenario} {i + 1:3}/{n}  " + "   ".join(last), flush=True)
    return result


@dataclass
class Services:
    url: str
    token: str
    sandbox_id: str
    key_prefix: str
    socket_dir: str
    redis_url: str
    api: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]


@contextlib.contextmanager
def services(**env: str) -> Iterator[Services]:
    """The API and one worker as real processes (what `orchestrator api|worker` runs), on a
    key prefix and sandbox of their own; ``env`` adds settings (e.g. ORCH_POOL_SIZE)."""
    tag = uuid.uuid4().hex[:6]
    token = new_token()
    socket_dir = tempfile.mkdtemp(prefix="orch-bench-")
    port = free_port()
    full = {
        **os.environ,
        "ORCH_KEY_PREFIX": f"bench-{tag}:",
        "ORCH_SANDBOX_ID": f"bench{tag}",
        "ORCH_SOCKET_DIR": socket_dir,
        "ORCH_API_PORT": str(port),
        "ORCH_TOKENS": f"bench:{hash_token(token)}:admin",
        "ORCH_DEFAULT_SANDBOX": f"bench{tag}",
        **env,
    }
    api, worker = (
        subprocess.Popen([sys.executable, "-m", "orchestrator.cli", role], env=full, stderr=subprocess.DEVNULL)
        for role in ("api", "worker")
    )
    try:
        yield Services(
            f"http://127.0.0.1:{port}",
            token,
            f"bench{tag}",
            f"bench-{tag}:",
            socket_dir,
            os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            api,
            worker,
        )
    finally:
        for proc in (api, worker):
            proc.terminate()
        for proc in (api, worker):
            proc.wait(timeout=60)
        cleanup(f"bench{tag}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cleanup(sandbox_id: str) -> None:
    """Whatever a run left on the daemon (pool desktops, failed runs): by the sandbox's label."""
    label = f"label=orchestrator.sandbox={sandbox_id}"
    for listing, remove in (
        (["ps", "-aq"], ["rm", "-f"]),
        (["volume", "ls", "-q"], ["volume", "rm", "-f"]),
        (["network", "ls", "-q"], ["network", "rm"]),
    ):
        found = subprocess.run(["docker", *listing, "--filter", label], capture_output=True, text=True).stdout.split()
        if found:
            subprocess.run(["docker", *remove, *found], capture_output=True)


async def wait_healthy(url: str, timeout: float = 30) -> None:
    async with httpx.AsyncClient(base_url=url) as http, asyncio.timeout(timeout):
        while True:
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def bare_runtime(socket_dir: str, sandbox_id: str) -> AsyncIterator[DesktopRuntime]:
    """The baseline's only tool: aiodocker, with the privilege profile the worker picks here
    (``ORCH_BENCH_BARE_PROFILE`` overrides: auto's first candidate by default)."""
    wanted = os.environ.get("ORCH_BENCH_BARE_PROFILE", "auto")
    profile = candidates(wanted, *read_bounding_set(), uid_map=read_uid_map())[0]
    runtime = DesktopRuntime(
        docker_host=os.environ.get("DOCKER_HOST"),
        image=DESKTOP_IMAGE,
        sandbox_id=sandbox_id,
        depth=1,
        socket_dir=socket_dir,
        profile=profile,
    )
    await runtime.desktops.ensure_network()
    try:
        yield runtime
    finally:
        await runtime.close()


async def bare_bring_up(runtime: DesktopRuntime, session: str, *, new_volume: bool = True) -> None:
    """The baseline: volume, container, start, inner dockerd answering /_ping."""
    if new_volume:
        await runtime.desktops.ensure_volume(session)
    await runtime.desktops.create(session, 1)
    started = time.monotonic()
    await runtime.desktops.start(session)
    await runtime.inner.wait_ready(session, started, 120)


async def bare_remove(runtime: DesktopRuntime, session: str, *, volume: bool = True) -> None:
    await runtime.desktops.remove(session, 20)
    if volume:
        await runtime.desktops.remove_volume(session)
    runtime.desktops.remove_socket_dir(session)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
