"""Where a desktop's cold start goes, per privilege profile: `python -m bench.phases [-n N]
[PROFILE[=IMAGE] ...]` (default: userns and caps, alternating, on ORCH_DESKTOP_IMAGE).

Each round brings one desktop up the way the worker does (DesktopRuntime: volume, container,
start, the inner dockerd's /_ping) with ORCH_TRACE_PHASES=1 in its Env, so the desktop's scripts
print a timestamped line per phase (``phase NAME NS``; userns-desktop.sh, start-dockerd.sh,
desktop-init.sh); dockerd's own "API listen on" line and the container's StartedAt complete the
timeline. Prints the median ms of each step (from the previous mark) and of the whole."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator

from orchestrator.names import desktop_name
from orchestrator.schemas import DisplaySize
from workers.privilege import candidates, read_bounding_set, read_uid_map
from workers.runtime import DesktopRuntime

from .harness import DESKTOP_IMAGE, bare_remove
from .scenarios import new_id

PHASE = re.compile(r"^phase (\S+) (\d+)$", re.M)
LISTEN = re.compile(r'^time="([^"]+)" level=info msg="API listen on /run/orchestrator/docker.sock"', re.M)


def rfc3339_ns(text: str) -> int:
    """Docker's timestamps (nanoseconds, Z) as epoch ns; Python parses microseconds only."""
    head, _, frac = text.rstrip("Z").partition(".")
    seconds = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC).timestamp()
    return int(seconds) * 10**9 + int((frac + "000000000")[:9])


@contextlib.asynccontextmanager
async def runtime_for(arm: str, socket_dir: str, sandbox_id: str) -> AsyncIterator[DesktopRuntime]:
    """``arm``: a profile, optionally ``=IMAGE`` (to compare two images in one run)."""
    kind, _, image = arm.partition("=")
    profile = candidates(kind, *read_bounding_set(), uid_map=read_uid_map())[0]
    runtime = DesktopRuntime(
        docker_host=os.environ.get("DOCKER_HOST"),
        image=image or DESKTOP_IMAGE,
        sandbox_id=sandbox_id,
        depth=1,
        socket_dir=socket_dir,
        profile=profile,
    )
    own_env = runtime.desktops.own_env

    def traced(session_id: str, display: DisplaySize | None = None) -> dict[str, str]:
        return {**own_env(session_id, display), "ORCH_TRACE_PHASES": "1"}

    runtime.desktops.own_env = traced  # type: ignore[method-assign]
    await runtime.desktops.ensure_network()
    try:
        yield runtime
    finally:
        await runtime.close()


async def docker(*args: str) -> tuple[str, str]:
    """The docker CLI's stdout and stderr (a desktop's logs are on its stderr)."""
    proc = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return out.decode(errors="replace"), err.decode(errors="replace")


async def once(runtime: DesktopRuntime) -> list[tuple[str, int]]:
    """One cold start: (step, epoch ns) in order."""
    session = new_id("phases")
    marks = [("begin", time.time_ns())]
    await runtime.desktops.ensure_volume(session)
    marks.append(("worker.volume", time.time_ns()))
    await runtime.desktops.create(session, 1)
    marks.append(("worker.create", time.time_ns()))
    started = time.monotonic()
    name = desktop_name(session)
    try:
        await runtime.desktops.start(session)
        marks.append(("worker.start_returned", time.time_ns()))
        await runtime.inner.wait_ready(session, started, 60)
        marks.append(("worker.ready", time.time_ns()))
    except BaseException:
        print((await docker("logs", "--tail", "20", name))[1])
        await bare_remove(runtime, session)
        raise
    _, logs = await docker("logs", name)
    dockerd_log, _ = await docker("exec", name, "cat", "/var/log/dockerd.log")
    state, _ = await docker("inspect", "-f", "{{.State.StartedAt}}", name)
    await bare_remove(runtime, session)
    inside = [(m[1], int(m[2])) for m in PHASE.finditer(logs)]
    inside.append(("container.started", rfc3339_ns(state.strip())))
    listen = LISTEN.search(dockerd_log)
    if listen:
        inside.append(("dockerd.listening", rfc3339_ns(listen[1])))
    return sorted(marks + inside, key=lambda m: m[1])


async def run(kinds: list[str], n: int) -> dict[str, list[list[tuple[str, int]]]]:
    socket_dir = tempfile.mkdtemp(prefix="orch-phases-")
    sandbox_id = f"phases{os.getpid()}"
    found: dict[str, list[list[tuple[str, int]]]] = {k: [] for k in kinds}
    async with contextlib.AsyncExitStack() as stack:
        runtimes = {k: await stack.enter_async_context(runtime_for(k, socket_dir, sandbox_id)) for k in kinds}
        for k in kinds:  # warm-up, not counted: first use of the image
            await once(runtimes[k])
        for i in range(n):
            for k in kinds if i % 2 == 0 else kinds[::-1]:
                found[k].append(await once(runtimes[k]))
                total = (found[k][-1][-1][1] - found[k][-1][0][1]) / 1e6
                print(f"  {k} {i + 1}/{n}: {total:.0f} ms", flush=True)
    return found


# The spans reported: (name, from, to), each end the first of its marks that a round has.
# Both sides of a userns desktop run at once in places (the inner side prepares while the outer
# connects the network), so the spans are chosen along the path that decides when dockerd runs.
LAUNCH = ("dockerd.gate", "dockerd.prepared")  # the last mark before dockerd itself
SPANS = [
    ("worker: volume + create", ("begin",), ("worker.create",)),
    ("docker start (runc)", ("worker.create",), ("container.started",)),
    ("container → profile script", ("container.started",), ("outer.start", "dockerd.script")),
    ("outer: cgroups (before: alone)", ("outer.start",), ("outer.cgroups",)),
    ("outer: files (before: alone)", ("outer.cgroups",), ("outer.files",)),
    ("  ∥ cgroups: mounts", ("outer.start",), ("outer.cgroups.mounted",)),
    ("  ∥ cgroups: mounts + chown", ("outer.start",), ("outer.cgroups",)),
    ("  ∥ files", ("outer.start",), ("outer.files",)),
    ("  ∥ NAT", ("outer.start",), ("outer.nat",)),
    ("outer: cgroups ∥ files ∥ NAT", ("outer.start",), ("outer.prepared",)),
    ("unshare → inner runs", ("outer.files", "outer.prepared"), ("inner.start",)),
    ("outer: inner's pid found", ("inner.start",), ("outer.pid",)),
    ("outer: network", ("outer.pid",), ("outer.network",)),
    ("inner: sees ready (poll)", ("outer.network",), ("inner.ready_seen",)),
    ("inner: mounts", ("inner.ready_seen", "inner.start"), ("inner.mounts",)),
    ("start-dockerd: preparations", ("dockerd.script",), ("dockerd.prepared",)),
    ("start-dockerd: waits for go", ("dockerd.prepared",), ("dockerd.gate",)),
    ("= scripts (container → dockerd)", ("container.started",), LAUNCH),
    ("dockerd → API listening", LAUNCH, ("dockerd.listening",)),
    ("listening → worker sees it", ("dockerd.listening",), ("worker.ready",)),
    ("= total", ("begin",), ("worker.ready",)),
]


def spans(marks: list[tuple[str, int]]) -> dict[str, float]:
    at = dict(marks)
    found = {}
    for name, starts, ends in SPANS:
        a = next((at[m] for m in starts if m in at), None)
        b = next((at[m] for m in ends if m in at), None)
        if a is not None and b is not None:
            found[name] = (b - a) / 1e6
    return found


def report(found: dict[str, list[list[tuple[str, int]]]]) -> None:
    arms = list(found)
    table = {arm: [spans(m) for m in rounds] for arm, rounds in found.items()}
    width = max(12, *(len(a) for a in arms))
    print(f"\nmedian ms per span ({', '.join(f'{a}: n={len(r)}' for a, r in found.items())})")
    print(f"{'span':34}" + "".join(f" {a[-width:]:>{width}}" for a in arms))
    for name, _, _ in SPANS:
        cells = []
        for arm in arms:
            values = [s[name] for s in table[arm] if name in s]
            cells.append(f"{statistics.median(values):{width}.1f}" if values else f"{'-':>{width}}")
        if any(c.strip() != "-" for c in cells):
            print(f"{name:34}" + "".join(f" {c}" for c in cells))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__.splitlines()[0])
    parser.add_argument("kinds", nargs="*", default=["userns", "caps"])
    parser.add_argument("-n", type=int, default=6)
    args = parser.parse_args()
    report(asyncio.run(run(args.kinds, args.n)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
