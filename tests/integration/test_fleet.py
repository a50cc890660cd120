"""Many sandboxes: placement under hard caps, a sandbox lost and back, drain (API and
SIGTERM), and /metrics against what the API reports. Real sandboxes: the compose stack's
containers, each with its own dockerd and worker; and a real worker process for SIGTERM."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from orchestrator.client import ApiError, Client
from orchestrator.config import Settings

from .conftest import TOKENS, adocker, worker_env
from .test_compose import Stack, acompose_stack, wait_healthy, wait_sandboxes

pytestmark = pytest.mark.slow  # a soak: `-m "not slow"` leaves it out

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text into {(name, labels): value}; fails on any line that is not valid."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        name, labels, value = match.groups()
        pairs = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or ""))
        samples[(name, pairs)] = float(value)
    return samples


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def firehose(client: Client, prefix: str) -> list[dict[str, Any]]:
    """Every stored event whose type starts with ``prefix`` (envelopes)."""
    found = []
    async for event in client.events(after="0", follow=False):
        if event.type.startswith(prefix):
            found.append(event.data)
    return found


async def until(check: Any, timeout: float, what: str) -> Any:
    """Poll ``check()`` (async) until it returns something truthy; fail loudly after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.25)


async def states_on(client: Client, sandbox: str) -> collections.Counter[str]:
    return collections.Counter(r.state for r in await client.list() if r.sandbox == sandbox)


async def test_a_sigterm_drains_the_worker_with_creates_in_flight(client: Client, docker_settings: Settings) -> None:
    """SIGTERM: the worker stops being placed on, finishes the creates queued and running,
    says sandbox.draining / sandbox.drained, and exits 0. Nothing is lost."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator.cli",
        "worker",
        env=worker_env(docker_settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        sandbox = docker_settings.sandbox_id

        async def available() -> bool:
            return any(s.id == sandbox and s.status == "available" for s in await client.sandboxes())

        await until(available, 60, "the worker's first heartbeat")
        ids = [r.id for r in await asyncio.gather(*(client.create() for _ in range(6)))]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 120) == 0, "the worker did not exit cleanly after its drain"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert [(await client.get(i)).state for i in ids] == ["ready"] * 6
    draining = await firehose(client, "sandbox.drain")
    assert [e["type"] for e in draining] == ["sandbox.draining", "sandbox.drained"]
    assert draining[0]["data"] == {"by": "signal", "stop_desktops": False}
    assert draining[1]["data"]["jobs_left"] == 0
    listed = next(s for s in await client.sandboxes() if s.id == sandbox)
    assert listed.status == "drained" and listed.placed == 6


# 30 desktops on 3 sandboxes, a sandbox dockerd restarted, one killed, one drained: about
# 4 min on a quiet 2-core machine, more when it is busy.
@pytest.mark.timeout(600)
async def test_three_sandboxes_caps_loss_drain_and_metrics(images: str) -> None:
    """Three sandbox containers (each its own dockerd and worker) on one Redis, cap 10 each."""
    settings = {
        "ORCH_MAX_SESSIONS": "10",
        "ORCH_HEARTBEAT_INTERVAL": "1",
        # 8 beats: 30 desktops booting at once saturate this 2-core machine (a beat may wait).
        "ORCH_SANDBOX_LOST_AFTER": "8",
        "ORCH_MONITOR_INTERVAL": "1",
    }
    async with acompose_stack(images, scale=3, **settings) as stack:
        await wait_healthy(stack.url)
        async with Client(stack.url, token=TOKENS["admin"], timeout=60) as client:
            await run_fleet_scenario(stack, client)


@contextlib.asynccontextmanager
async def worker_log_on_failure(host: str, container: str) -> AsyncIterator[None]:
    """On a failure, print the end of the sandbox's worker log (it is not in compose's logs)."""
    try:
        yield
    except BaseException:
        text = await adocker("exec", container, "tail", "-n", "150", "/var/log/worker.log", host=host, check=False)
        print(f"--- the end of {container}'s worker log ---\n{text}")
        raise


async def run_fleet_scenario(stack: Stack, client: Client) -> None:
    host = stack.env["DOCKER_HOST"]
    boxes = {s.id for s in await wait_sandboxes(client, 3)}
    container_of = {
        await adocker("exec", c, "cat", "/var/lib/docker/orchestrator/sandbox-id", host=host): c
        for c in (await stack.container("sandbox")).split()
    }
    assert set(container_of) == boxes

    # 30 concurrent creates: the least-loaded rule with an atomic cap spreads them 10/10/10.
    started = time.monotonic()
    records = await asyncio.gather(*(client.create(labels={"n": str(i)}) for i in range(30)))
    spread = collections.Counter(r.sandbox for r in records)
    assert sorted(spread.values()) == [10, 10, 10], spread
    with pytest.raises(ApiError) as refused:
        await client.create()
    assert refused.value.status == 503 and refused.value.code == "no_capacity", refused.value
    for r in records:
        assert (await client.wait_ready(r.id, timeout=300)).state == "ready"
    print(f"30 sessions on 3 sandboxes ready {time.monotonic() - started:.1f} s after the creates")

    # /metrics: parses, and says what the API says.
    samples = parse_metrics(await client.metrics())
    listed = await client.list()
    for state in ("ready", "pending", "stopped", "failed"):
        assert metric(samples, "orchestrator_sessions", state=state) == sum(1 for r in listed if r.state == state)
    for s in await client.sandboxes():
        assert metric(samples, "orchestrator_sandbox_placed", sandbox=s.id) == s.placed == 10
        assert metric(samples, "orchestrator_sandbox_capacity", sandbox=s.id) == s.capacity == 10
        assert metric(samples, "orchestrator_queue_depth", sandbox=s.id) == 0
    assert metric(samples, "orchestrator_sandboxes_desired") == 3
    assert metric(samples, "orchestrator_capacity_refusals_total") >= 1
    assert metric(samples, "orchestrator_sandboxes", status="available") == 3
    # Each worker's own /metrics: its histograms counted its 10 creates and 10 readiness times.
    for box, container in container_of.items():
        text = await adocker("exec", container, "curl", "-fsS", "http://127.0.0.1:9100/metrics", host=host)
        worker = parse_metrics(text)
        assert metric(worker, "orchestrator_job_duration_seconds_count", operation="create_session") == 10
        assert metric(worker, "orchestrator_dockerd_ready_seconds_count") == 10
        assert metric(worker, "orchestrator_sandbox_sessions", sandbox=box, state="ready") == 10
        assert metric(worker, "orchestrator_sandbox_status", sandbox=box, status="available") == 1

    a, b, c = sorted(boxes)
    on = {box: [r.id for r in records if r.sandbox == box] for box in boxes}

    # a's own dockerd restarted (start-dockerd brings it back): its desktops return by their
    # restart policy, the worker re-adopts them, desktop.health goes unhealthy then healthy,
    # and what a desktop's own dockerd holds (an image) survives.
    probe = on[a][0]
    in_desktop = ["exec", container_of[a], "docker", "exec", f"desktop-{probe}"]
    await adocker(*in_desktop, "sh", "-c", "tar cf - -T /dev/null | docker import - marker:1", host=host)
    seen = [e async for e in client.events(probe, after="0", follow=False)]
    restarted = time.monotonic()
    await adocker("exec", container_of[a], "pkill", "-TERM", "-x", "dockerd", host=host)
    async with worker_log_on_failure(host, container_of[a]):
        down = await client.wait_for(probe, {"desktop.health"}, timeout=60, after=seen[-1].id)
        assert down[-1].data["data"]["status"] == "unhealthy", down[-1].data
        up = await client.wait_for(probe, {"desktop.health"}, timeout=180, after=down[-1].id)
        assert up[-1].data["data"]["status"] == "healthy", up[-1].data
    print(f"sandbox {a}'s dockerd restarted: desktop healthy again after {time.monotonic() - restarted:.1f} s")
    assert await adocker(*in_desktop, "docker", "image", "inspect", "--format", "{{.Id}}", "marker:1", host=host)
    await until(lambda: _all_in(client, on[a], "ready"), 120, f"{a}'s sessions ready after its dockerd restart")
    assert not [e for e in [*down, *up] if e.type == "session.failed"]

    # Sandbox c dies (no restart): unavailable within its threshold; its sessions fail with
    # desktop_lost; new sessions go elsewhere.
    for sid in on[a][:4]:
        await client.delete(sid)
    await until(lambda: _placed(client, a, 6), 120, "four deletes on a")
    await adocker("update", "--restart=no", container_of[c], host=host)
    await adocker("kill", container_of[c], host=host)
    killed = time.monotonic()

    async def c_unavailable() -> bool:
        return any(s.id == c and s.status == "unavailable" for s in await client.sandboxes())

    await until(c_unavailable, 30, f"sandbox {c} marked unavailable")
    print(f"sandbox {c} marked unavailable {time.monotonic() - killed:.1f} s after its kill")
    await until(lambda: _all_in(client, on[c], "failed"), 30, f"{c}'s sessions failed")
    for sid in on[c]:
        error = (await client.get(sid)).error
        assert error is not None and error.code == "desktop_lost" and error.cause == "sandbox_unavailable", error
    moved = await asyncio.gather(*(client.create(labels={"after": "loss"}) for _ in range(3)))
    assert {r.sandbox for r in moved} == {a}, [r.sandbox for r in moved]
    for r in moved:
        await client.wait_ready(r.id, timeout=180)

    # c comes back: its desktops restart with its dockerd and the sessions recover to ready.
    await adocker("start", container_of[c], host=host)
    await until(lambda: _all_in(client, on[c], "ready"), 240, f"{c}'s sessions recovered")

    # Drain b through the API with creates in flight and stop_desktops: the in-flight creates
    # finish (nothing lost), every session of b ends stopped with its volume, b exits cleanly.
    for sid in on[b][:3]:
        await client.delete(sid)
    await until(lambda: _placed(client, b, 7), 120, "three deletes on b")
    pinned = await asyncio.gather(*(client.create(sandbox=b, labels={"pinned": "b"}) for _ in range(3)))
    await client.drain(b, stop_desktops=True)
    with pytest.raises(ApiError) as no_b:
        await client.create(sandbox=b)
    assert no_b.value.code == "no_sandbox", no_b.value

    async def drained() -> bool:
        return any(s.id == b and s.status == "drained" for s in await client.sandboxes())

    await until(drained, 180, f"sandbox {b} drained")
    b_sessions = [*on[b][3:], *(r.id for r in pinned)]
    assert [(await client.get(sid)).state for sid in b_sessions] == ["stopped"] * 10
    for r in pinned:  # each passed through ready before being stopped
        types = [e.type async for e in client.events(r.id, after="0", follow=False)]
        assert "session.ready" in types and types[-1] == "session.stopped", types
    events = await firehose(client, "sandbox.drain")
    assert [e["type"] for e in events if e["sandbox"] == b] == ["sandbox.draining", "sandbox.drained"]
    done = next(e for e in events if e["type"] == "sandbox.drained")
    assert done["data"]["stopped_sessions"] == 10 and done["data"]["jobs_left"] == 0, done

    async def exited_cleanly() -> bool:  # the drained event comes first, then the worker exits
        logs = await adocker("logs", container_of[b], host=host, stderr=True)
        return "the worker exited cleanly (drained): stopping the sandbox" in logs

    await until(exited_cleanly, 60, f"sandbox {b}'s worker exiting cleanly after its drain")
    # Restarted by its policy, it stays drained (idle) until undrained; then it serves again.
    await client.undrain(b)
    await client.start(b_sessions[0])
    await until(lambda: _all_in(client, b_sessions[:1], "ready"), 180, "a stopped session of b resumed")
    samples = parse_metrics(await client.metrics())
    assert metric(samples, "orchestrator_sandbox_placed", sandbox=b) == 10


async def _placed(client: Client, sandbox: str, count: int) -> bool:
    return any(s.id == sandbox and s.placed == count for s in await client.sandboxes())


async def _all_in(client: Client, ids: list[str], state: str) -> bool:
    return all([(await client.get(sid)).state == state for sid in ids])
