"""The graphical flavor's worker side without Docker: the display.ready marker is read as
untrusted input (no symlink, no FIFO, a size cap, a strict shape), the flavor's variables go
into the container's Env and never into the session's env file, the lifecycle waits for the
screen after dockerd and before session.ready, and the graphical image is ensured lazily."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.config import Settings
from orchestrator.records import new_record
from orchestrator.schemas import DisplaySize, SessionCreate, SessionSpec, StoredDisplaySize
from orchestrator.service import warm_eligible
from orchestrator.states import SessionState
from tests.fakes import Stack, offline_runtime, open_stack
from workers.health import HealthCheck
from workers.pool import WarmPool
from workers.prepare import DesktopPreparation
from workers.privilege import PrivilegeKind, PrivilegeProfile
from workers.runtime import DesktopError, DesktopRuntime
from workers.runtime.desktop_spec import own_env
from workers.runtime.display import (
    DISPLAY_ENV,
    MARKER_MAX_BYTES,
    MarkerInvalid,
    clear_marker,
    display_of,
    marker_path,
    read_marker,
)

LINE = (
    '{"display":":0","width":1024,"height":768,"depth":24,"vnc_port":5900,'
    '"since_init_ms":230,"start_ms":180,"restarts":0}\n'
)
SID = "s-graphical"


@pytest.fixture
def sockets(tmp_path: Path) -> Path:
    (tmp_path / SID).mkdir()
    return tmp_path


def test_the_marker_start_display_writes_is_read(sockets: Path) -> None:
    path = marker_path(str(sockets), SID)
    assert read_marker(path) is None  # not yet
    Path(path).write_text(LINE)
    marker = read_marker(path)
    assert marker is not None
    assert (marker.width, marker.height, marker.depth, marker.since_init_ms, marker.restarts) == (1024, 768, 24, 230, 0)


def test_a_marker_from_a_newer_image_with_more_fields_still_reads(sockets: Path) -> None:
    path = marker_path(str(sockets), SID)
    Path(path).write_text(LINE.replace('"restarts":0', '"restarts":2,"extra":"x"'))
    marker = read_marker(path)
    assert marker is not None and marker.restarts == 2


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("", "not start-display's line"),
        ('{"display":":0"}', "not start-display's line"),
        (LINE.replace('"width":1024', '"width":"1024"'), "not start-display's line"),
        (LINE.replace('"depth":24', '"depth":-1'), "not start-display's line"),
        ("x" * (MARKER_MAX_BYTES + 1), "larger than"),
    ],
)
def test_a_malformed_marker_is_refused(sockets: Path, content: str, why: str) -> None:
    path = marker_path(str(sockets), SID)
    Path(path).write_text(content)
    with pytest.raises(MarkerInvalid, match=why):
        read_marker(path)


def test_a_symlink_or_a_fifo_is_never_followed_or_waited_on(
    sockets: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = marker_path(str(sockets), SID)
    # A valid line elsewhere on the worker's filesystem: a link to it is refused, not read.
    elsewhere = tmp_path_factory.mktemp("worker") / "secret"
    elsewhere.write_text(LINE)
    os.symlink(elsewhere, path)
    with pytest.raises(MarkerInvalid, match="symlink"):
        read_marker(path)
    os.unlink(path)
    os.mkfifo(path)  # no writer: an open without O_NONBLOCK would hang here
    with pytest.raises(MarkerInvalid, match="not a regular file"):
        read_marker(path)


def test_a_stale_marker_is_cleared_and_clearing_nothing_is_fine(sockets: Path) -> None:
    path = marker_path(str(sockets), SID)
    Path(path).write_text(LINE)
    Path(path + ".tmp").write_text(LINE)
    clear_marker(str(sockets), SID)
    assert not os.path.exists(path) and not os.path.exists(path + ".tmp")
    clear_marker(str(sockets), SID)
    clear_marker(str(sockets), "no-such-session")


def test_the_flavor_goes_into_the_containers_env_only_for_graphical_desktops() -> None:
    minimal = own_env(1, SID)
    assert not set(minimal) & set(DISPLAY_ENV)  # a minimal desktop's Env is as before flavors
    graphical = own_env(1, SID, DisplaySize(width=1024, height=768))
    assert graphical["ORCH_DESKTOP_FLAVOR"] == "graphical"
    assert graphical["ORCH_DISPLAY_SIZE"] == "1024x768"
    assert graphical["ORCH_SESSION"] == SID


def test_display_of_a_spec() -> None:
    assert display_of(SessionSpec()) is None
    assert display_of(SessionSpec(flavor="graphical")) == DisplaySize()  # a record without its size
    asked = display_of(SessionSpec(flavor="graphical", display=StoredDisplaySize(width=800, height=600)))
    assert asked is not None and (asked.width, asked.height) == (800, 600)


# -- the lifecycle over the in-memory port -------------------------------------------------


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[Stack]:
    async with open_stack(redis_url) as stack:
        yield stack


async def test_a_graphical_create_announces_its_screen_before_ready(stack: Stack) -> None:
    await stack.create(SID, SessionCreate(flavor="graphical", display=DisplaySize(width=1024, height=768)))
    assert await stack.run_queued() == ["ready"]
    events = await stack.events(SID)
    types = [e.type for e in events]
    assert types[-3:] == ["dockerd.ready", "display.ready", "session.ready"]
    display = events[-2].data
    assert (display["width"], display["height"], display["depth"]) == (1024, 768, 24)
    assert "display" in events[-1].data["phases_ms"]
    screen = stack.runtime.containers[SID].display
    assert screen is not None and (screen.width, screen.height) == (1024, 768)


async def test_a_minimal_create_waits_for_no_screen(stack: Stack) -> None:
    await stack.create(SID)
    assert await stack.run_queued() == ["ready"]
    events = await stack.events(SID)
    assert "display.ready" not in [e.type for e in events]
    assert "display" not in events[-1].data["phases_ms"]
    assert "wait_display" not in stack.runtime.calls


async def test_a_screen_that_never_comes_fails_the_session(stack: Stack) -> None:
    await stack.create(SID, SessionCreate(flavor="graphical"))
    stack.runtime.fail_next("wait_display", "display_timeout")
    assert await stack.run_queued() == ["failed: display_timeout"]
    failed = await stack.store.get(SID)
    assert failed is not None and failed.state is SessionState.FAILED
    assert failed.error is not None and failed.error.code == "display_timeout"
    assert SID not in stack.runtime.containers  # removed; the volume stays
    assert SID in stack.runtime.volumes


async def test_a_missing_graphical_image_fails_the_session_not_the_minimal_ones(stack: Stack) -> None:
    stack.runtime.images_present.discard(stack.runtime.graphical_image)
    await stack.create(SID, SessionCreate(flavor="graphical"))
    await stack.create("s-minimal")
    assert await stack.run_queued() == ["failed: image_missing", "ready"]


# -- the graphical image, ensured lazily -----------------------------------------------------


class Images:
    def __init__(self, present: set[str], registry: set[str]) -> None:
        self.present, self.registry = present, registry
        self.pulls: list[str] = []

    async def has(self, image: str) -> bool:
        return image in self.present

    async def pull(self, registry: str, image: str) -> bool:
        self.pulls.append(image)
        if image in self.registry:
            self.present.add(image)
        return image in self.present


@pytest.fixture
async def runtime() -> AsyncIterator[DesktopRuntime]:
    async with offline_runtime(PrivilegeProfile(PrivilegeKind.USERNS, "userns")) as made:
        yield made


@pytest.mark.parametrize("registry", [None, "registry:5000"])
async def test_the_graphical_image_is_ensured_before_the_first_graphical_desktop_only(
    runtime: DesktopRuntime, monkeypatch: pytest.MonkeyPatch, registry: str | None
) -> None:
    settings = Settings(privilege="userns", registry=registry, graphical_image="g:1", desktop_image="d:1")
    images = Images({"d:1"}, {"g:1"})
    monkeypatch.setattr(runtime, "images", images)
    preparation = DesktopPreparation(runtime, settings)
    preparation.decided = True
    await preparation.before_desktop("minimal")
    assert images.pulls == []
    if registry is None:  # nowhere to pull it from: this session fails, coded
        with pytest.raises(DesktopError) as missing:
            await preparation.before_desktop("graphical")
        assert missing.value.code == "image_missing"
        assert "build-images.sh --graphical" in missing.value.message
        return
    await preparation.before_desktop("graphical")
    await preparation.before_desktop("graphical")
    assert images.pulls == ["g:1"]  # once, then remembered


async def test_a_registry_without_the_graphical_image_says_so(
    runtime: DesktopRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(privilege="userns", registry="registry:5000", graphical_image="g:1", desktop_image="d:1")
    monkeypatch.setattr(runtime, "images", Images({"d:1"}, set()))
    preparation = DesktopPreparation(runtime, settings)
    preparation.decided = True
    with pytest.raises(DesktopError) as missing:
        await preparation.before_desktop("graphical")
    assert missing.value.code == "image_missing" and "registry:5000 has none" in missing.value.message


class Container:
    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.marker_at_start: bool | None = None

    async def start(self) -> None:
        self.marker_at_start = present(self.marker)


def present(path: str) -> bool:
    return os.path.exists(path)


@pytest.fixture
def stale(sockets: Path) -> str:
    path = marker_path(str(sockets), SID)
    Path(path).write_text(LINE)
    return path


async def test_every_start_clears_the_stale_marker_before_the_desktop_runs(
    runtime: DesktopRuntime, sockets: Path, stale: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    desktops = runtime.desktops
    monkeypatch.setattr(desktops, "socket_dir", str(sockets))
    container = Container(stale)
    monkeypatch.setattr(desktops, "_container", lambda session_id: container)
    await desktops.start(SID)
    assert container.marker_at_start is False


# -- the warm pool, per flavor ---------------------------------------------------------------


def test_a_graphical_request_is_served_warm_only_with_the_default_screen() -> None:
    assert warm_eligible(SessionCreate(flavor="graphical"))
    assert warm_eligible(SessionCreate(flavor="graphical", display=DisplaySize()))
    assert not warm_eligible(SessionCreate(flavor="graphical", display=DisplaySize(width=800, height=600)))
    assert not warm_eligible(SessionCreate(flavor="graphical", env={"A": "b"}))


async def test_each_flavor_is_pooled_apart_and_claimed_by_its_own_flavor(stack: Stack) -> None:
    pool = WarmPool(
        stack.runtime, stack.redis, stack.keys, "fake", targets={"minimal": 1, "graphical": 1}, ready_timeout_s=1
    )
    assert pool.target == 2
    await pool._make_one("graphical")
    await pool._make_one("minimal")
    [screen] = await pool.pooled("graphical")
    [plain] = await pool.pooled("minimal")
    assert sorted(await pool.pooled()) == sorted([screen, plain])
    assert await pool.ready_by_flavor() == {"minimal": 1, "graphical": 1}
    made = stack.runtime.containers[screen].display
    assert made is not None and (made.width, made.height) == (1280, 800)  # the default screen
    assert stack.runtime.containers[plain].display is None
    assert stack.runtime.calls.count("wait_display") == 1  # the graphical one was seen ready

    await stack.redis.set(stack.keys.sandbox_alive("fake"), "1")

    async def place(request: SessionCreate) -> tuple[str, bool]:
        record = new_record(request, "", stack.settings)
        placed = await stack.store.place(record, None, [("fake", 10)], prefer_warm=warm_eligible(request))
        return placed.record.id, placed.warm

    # A minimal create never gets the graphical desktop, nor one with another screen.
    assert await place(SessionCreate(flavor="graphical", display=DisplaySize(width=800, height=600))) != (screen, True)
    assert await place(SessionCreate()) == (plain, True)
    assert (await place(SessionCreate()))[1] is False  # the minimal pool is empty: cold
    assert await place(SessionCreate(flavor="graphical")) == (screen, True)
    claimed = await stack.store.get(screen)
    assert claimed is not None and claimed.spec.flavor == "graphical" and claimed.state is SessionState.READY
    assert await pool.pooled() == []


async def test_a_drain_stops_refilling_every_flavor(stack: Stack) -> None:
    pool = WarmPool(
        stack.runtime, stack.redis, stack.keys, "fake", targets={"minimal": 1, "graphical": 2}, ready_timeout_s=1
    )
    await pool._make_one("graphical")
    assert await pool.shrink() == 1
    assert pool.targets == {"minimal": 0, "graphical": 0} and pool.target == 0
    assert not stack.runtime.containers and await pool.pooled() == []


async def test_a_flavor_that_cannot_be_made_holds_back_its_own_pool_only(stack: Stack) -> None:
    stack.runtime.images_present.discard(stack.runtime.graphical_image)
    pool = WarmPool(
        stack.runtime,
        stack.redis,
        stack.keys,
        "fake",
        targets={"minimal": 0, "graphical": 1},
        ready_timeout_s=1,
        check_interval_s=0.001,
    )
    task = asyncio.create_task(pool.run_forever())
    try:
        # The graphical pool fails again and again: its waits grow (4 ms, 16 ms... 4 s by now).
        async with asyncio.timeout(20):
            while pool.failures < 6:
                await asyncio.sleep(0.005)
        # The minimal pool is not held back by the other's backoff: it refills at once.
        pool.targets["minimal"] = 1
        async with asyncio.timeout(2):
            while len(await pool.pooled("minimal")) < 1:
                await asyncio.sleep(0.005)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert await pool.pooled("graphical") == []
    # The failed makes left nothing behind: every desktop there is the pooled minimal one.
    assert set(stack.runtime.containers) == set(await pool.pooled("minimal"))


# -- the health check's look at the screen -------------------------------------------------


async def test_the_health_check_reports_a_restarted_and_a_down_display(stack: Stack) -> None:
    await stack.create(SID, SessionCreate(flavor="graphical"))
    await stack.create("s-minimal", SessionCreate())
    assert await stack.run_queued() == ["ready", "ready"]
    health = HealthCheck(stack.settings, stack.store, stack.bus, stack.runtime)
    before = len(await stack.events(SID))

    async def new_events() -> list[tuple[str, dict[str, object]]]:
        return [(e.type, e.data) for e in (await stack.events(SID))[before:]]

    await health.check()  # the baseline: healthy, restarts 0, nothing to say
    assert await new_events() == []
    desktop = stack.runtime.containers[SID]
    desktop.display_restarts = 2  # Xvnc died twice since; start-display brought it back
    await health.check()
    [(kind, data)] = await new_events()
    assert (kind, data["restarts"], data["width"], data["height"]) == ("display.restarted", 2, 1280, 800)
    await health.check()  # seen: not again
    assert len(await new_events()) == 1

    desktop.display_up = False  # between a death and the restart
    await health.check()
    kind, data = (await new_events())[-1]
    assert (kind, data["status"]) == ("desktop.health", "unhealthy")
    assert "display is down" in str(data["reason"])
    desktop.display_up = True
    await health.check()
    assert (await new_events())[-1][1]["status"] == "healthy"
    # A minimal desktop's screen is never looked at.
    assert [e.type for e in await stack.events("s-minimal")][-1] == "session.ready"
