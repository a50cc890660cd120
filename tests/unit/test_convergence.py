"""Model-based property test of recovery: random sequences of API requests, worker steps and
worker crashes, then the reconciler's real ``plan`` drives the world back. Whatever the
sequence, nothing reaches an undefined state, `deleted` is final, and after quiescence what
Docker has matches what the record says (no lost, duplicate or orphaned desktop or volume).

The worker's steps are modelled one Docker call or one transition at a time, as in
workers/lifecycle.py; a crash can fall between any two of them."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import states
from orchestrator.schemas import SessionRecord, SessionSpec
from orchestrator.states import SessionState
from workers.docker import DockerObject
from workers.reconciler import DesktopLost, EnqueueCreate, RemoveDesktop, RemoveVolume, RestartDesktop, Resume, plan

S = SessionState
SID = "model-session"


@dataclass
class World:
    state: SessionState | None = S.PENDING  # None: the record is gone (deleted)
    generation: int = 1
    desktop: tuple[int, bool] | None = None  # (generation label, running)
    volume: bool = False
    queue: list[tuple[str, int]] = field(default_factory=lambda: [("create", 1)])
    running: list[str] | None = None  # remaining steps of the operation a worker is in
    deleted_once: bool = False

    # -- the record, through the state machine ------------------------------------------

    def transition(self, target: SessionState, generation: int) -> bool:
        if self.state is None or generation != self.generation or not states.allowed(self.state, target):
            return False
        self.state = target
        if target is S.DELETED:
            self.state, self.deleted_once = None, True
        return True

    # -- API requests -----------------------------------------------------------------

    def request(self, verb: str) -> None:
        if self.state is None:
            return
        if verb == "stop" and self.transition(S.STOPPING, self.generation):
            self.queue.append(("stop", self.generation))
        elif verb == "start" and self.state is S.STOPPED:
            self.generation += 1
            self.state = S.STARTING
            self.queue.append(("start", self.generation))
        elif verb == "delete" and self.transition(S.DELETING, self.generation):
            self.queue.append(("delete", self.generation))

    # -- a worker -----------------------------------------------------------------------

    def begin(self, operation: str, generation: int) -> None:
        if self.state is None or generation != self.generation:
            return  # stale or gone: the job does nothing
        steps = {
            "create": ["to_creating", "volume", "desktop", "to_starting", "start", "to_ready"],
            "start": ["check_volume", "desktop", "start", "to_ready"],
            "stop": ["remove_desktop", "to_stopped"],
            "delete": ["remove_desktop", "remove_volume", "to_deleted"],
        }[operation]
        if operation == "create" and self.state is S.STARTING:
            steps = ["check_volume", "desktop", "start", "to_ready"]
        self.running = steps

    def step(self) -> None:
        assert self.running is not None
        name = self.running.pop(0)
        g = self.generation
        ok = True
        if name == "to_creating":
            ok = self.state is S.CREATING or self.transition(S.CREATING, g)
        elif name == "volume":
            self.volume = True
        elif name == "check_volume":
            if not self.volume:
                self.desktop = None
                ok = False
                self.transition(S.FAILED, g)
        elif name == "desktop":
            if self.desktop is None or self.desktop[0] != g:
                self.desktop = (g, False)
        elif name == "to_starting":
            ok = self.transition(S.STARTING, g)
        elif name == "start":
            assert self.desktop is not None
            self.desktop = (self.desktop[0], True)
        elif name == "to_ready":
            if self.desktop is None or not self.desktop[1]:  # wait_dockerd: desktop_exited
                self.desktop = None
                self.transition(S.FAILED, g)
                ok = False
            else:
                ok = self.transition(S.READY, g)
        elif name == "remove_desktop":
            self.desktop = None
        elif name == "remove_volume":
            self.volume = False
        elif name == "to_stopped":
            ok = self.transition(S.STOPPED, g)
        elif name == "to_deleted":
            ok = self.transition(S.DELETED, g)
        if not ok or not self.running:
            self.running = None

    def work(self) -> None:
        if self.running:
            self.step()
        elif self.queue:
            self.begin(*self.queue.pop(0))

    def crash(self) -> None:
        self.running = None  # its lease lapses; arq keeps the queued jobs

    def kill_desktop(self) -> None:
        if self.desktop is not None:  # someone stops it from outside
            self.desktop = (self.desktop[0], False)

    # -- the reconciler (real plan) -----------------------------------------------------

    def reconcile(self, now: float = 1000.0) -> None:
        if self.running:
            return  # the lease is held: the reconciler leaves the session alone
        records = []
        if self.state is not None:
            records.append(
                SessionRecord(
                    id=SID,
                    state=self.state,
                    generation=self.generation,
                    sandbox="m",
                    spec=SessionSpec(),
                    created_at="",
                    updated_at="",
                )
            )
        desktops = []
        if self.desktop is not None:
            generation, running = self.desktop
            desktops.append(DockerObject("desktop", "desktop-x", SID, generation, running, 0.0))
        volumes = [DockerObject("volume", "volume-x", SID, None, False, 0.0)] if self.volume else []
        for action in plan(records, desktops, volumes, busy=set(), now=now, grace_s=0.0):
            if isinstance(action, EnqueueCreate):
                if ("create", self.generation) not in self.queue:
                    self.queue.append(("create", self.generation))
            elif isinstance(action, Resume):
                self.begin(action.operation.verb, action.generation)
                while self.running:
                    self.step()
            elif isinstance(action, DesktopLost):
                self.desktop = None
                self.transition(S.FAILED, self.generation)
            elif isinstance(action, RestartDesktop):
                assert self.desktop is not None
                self.desktop = (self.desktop[0], True)
            elif isinstance(action, RemoveDesktop):
                self.desktop = None
            elif isinstance(action, RemoveVolume):
                self.volume = False


# Mostly work, so that sequences get deep (ready, stopped, restarted) before the next fault.
ACTIONS = ["work"] * 8 + ["crash", "kill_desktop", "reconcile", "stop", "start", "delete"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(ACTIONS), max_size=80))
def test_any_sequence_of_requests_and_crashes_converges(script: list[str]) -> None:
    world = World()
    for action in script:
        if action in ("stop", "start", "delete"):
            world.request(action)
        else:
            getattr(world, action)()
        assert world.state is None or world.state in SessionState
        if world.deleted_once:
            assert world.state is None  # deleted is final: the record never comes back

    # Quiescence: workers drain the queue with no more crashes, the reconciler runs.
    for _ in range(50):
        while world.running or world.queue:
            world.work()
        world.reconcile()
        if not world.running and not world.queue:
            break

    state = world.state
    assert state not in (S.PENDING, S.CREATING, S.STARTING, S.STOPPING, S.DELETING), state
    if state is None:
        assert world.desktop is None and not world.volume
    elif state is S.READY:
        assert world.desktop == (world.generation, True) and world.volume
    elif state is S.STOPPED:
        assert world.desktop is None and world.volume
    elif state is S.FAILED:
        assert world.desktop is None
