from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.queue import Operation
from orchestrator.schemas import SessionError, SessionRecord, SessionSpec
from orchestrator.states import SessionState
from workers.pool import plan_pool
from workers.reconciler import (
    UNKNOWN,
    Action,
    DesktopLost,
    EnqueueCreate,
    Evidence,
    Expire,
    KeepUnknown,
    Recover,
    RemoveDesktop,
    RemoveVolume,
    RestartDesktop,
    Resume,
    plan,
)
from workers.runtime import DockerObject

S = SessionState
NOW = 10_000.0


def record(sid: str, state: SessionState, generation: int = 1, **kw: object) -> SessionRecord:
    return SessionRecord(
        id=sid,
        state=state,
        generation=generation,
        sandbox="s",
        spec=kw.pop("spec", SessionSpec()),  # type: ignore[arg-type]
        created_at="",
        updated_at="",
        **kw,  # type: ignore[arg-type]
    )


def desktop(sid: str, generation: int = 1, running: bool = True, age: float = 1000) -> DockerObject:
    return DockerObject("desktop", f"desktop-{sid}", sid, generation, running, NOW - age)


def volume(sid: str, age: float = 1000) -> DockerObject:
    return DockerObject("volume", f"docker-data-{sid}", sid, None, False, NOW - age)


def kinds(actions: list[Action]) -> list[tuple[str, str]]:
    return [(type(a).__name__, a.session) for a in actions]


def test_a_healthy_sandbox_needs_nothing() -> None:
    records = [record("a", S.READY), record("b", S.STOPPED)]
    assert plan(records, [desktop("a")], [volume("a"), volume("b")], busy=set(), now=NOW, grace_s=60) == []


def test_interrupted_operations_are_resumed_unless_someone_holds_the_lease() -> None:
    records = [record("c", S.CREATING), record("d", S.DELETING), record("p", S.PENDING), record("x", S.STOPPING)]
    actions = plan(records, [], [], busy={"x"}, now=NOW, grace_s=60)
    assert set(actions) == {
        Resume(session="c", operation=Operation.CREATE, generation=1, reason="creating with no worker on it"),
        Resume(session="d", operation=Operation.DELETE, generation=1, reason="deleting with no worker on it"),
        EnqueueCreate(session="p", generation=1),
    }


def test_lost_and_stale_desktops_of_ready_sessions() -> None:
    records = [record("gone", S.READY), record("dead", S.READY), record("old", S.READY, generation=2)]
    actions = plan(records, [desktop("dead", running=False), desktop("old", 1)], [], busy=set(), now=NOW, grace_s=60)
    assert set(actions) == {
        DesktopLost(session="gone", generation=1, why="gone"),
        DesktopLost(session="old", generation=2, why="stale"),
        RestartDesktop(session="dead", generation=1, reason="the desktop is not running"),
    }
    # The session's error message says which.
    assert [a.reason for a in actions if isinstance(a, DesktopLost)] == ["the desktop is gone", "the desktop is stale"]


def test_a_deleted_sessions_leftovers_go_only_after_the_grace_period() -> None:
    gone = Evidence(deleted=frozenset({"ghost"}))
    young = plan(
        [], [desktop("ghost", age=10)], [volume("ghost", age=10)], busy=set(), now=NOW, grace_s=60, evidence=gone
    )
    assert young == []
    old = plan([], [desktop("ghost")], [volume("ghost")], busy=set(), now=NOW, grace_s=60, evidence=gone)
    assert old == [
        RemoveDesktop(session="ghost", name="desktop-ghost", reason="its session was deleted"),
        RemoveVolume(session="ghost", name="docker-data-ghost", reason="its session was deleted"),
    ]


def test_objects_nothing_explains_are_kept_and_reported_never_removed() -> None:
    # H3: Redis came back empty (or this worker reads another db or prefix), the objects are a
    # month old and there is no grace: nothing is removed, every object is reported.
    month = 30 * 86400
    desktops = [desktop(f"s-{i}", age=month) for i in range(3)]
    volumes = [volume(f"s-{i}", age=month) for i in range(3)]
    actions = plan([], desktops, volumes, busy=set(), now=NOW, grace_s=0)
    assert all(isinstance(a, KeepUnknown) for a in actions) and len(actions) == 6
    assert all(a.redis_looks_empty for a in actions if isinstance(a, KeepUnknown))
    assert "Redis looks empty or foreign: none of this sandbox's 6 objects" in actions[0].reason


def test_one_unknown_object_among_known_ones_is_kept_but_redis_does_not_look_empty() -> None:
    actions = plan([record("a", S.READY)], [desktop("a")], [volume("a"), volume("x")], busy=set(), now=NOW, grace_s=0)
    assert actions == [
        KeepUnknown(session="x", name="docker-data-x", kind="volume", reason=UNKNOWN, redis_looks_empty=False)
    ]


def test_the_pools_own_unfinished_desktop_is_removed() -> None:
    evidence = Evidence(pool_made=frozenset({"w"}))
    actions = plan([], [desktop("w", running=False)], [volume("w")], busy=set(), now=NOW, grace_s=0, evidence=evidence)
    assert kinds(actions) == [("RemoveDesktop", "w"), ("RemoveVolume", "w")]
    assert {a.reason for a in actions} == {"a warm desktop the pool never finished"}


def test_removals_per_pass_are_capped() -> None:
    ids = [f"d-{i}" for i in range(5)]
    evidence = Evidence(deleted=frozenset(ids))
    desktops, volumes = [desktop(i) for i in ids], [volume(i) for i in ids]
    actions = plan([], desktops, volumes, busy=set(), now=NOW, grace_s=0, evidence=evidence, max_removals=3)
    # Desktops first (a volume in use cannot go before its desktop); the rest wait a pass.
    assert kinds(actions) == [("RemoveDesktop", i) for i in ids[:3]]


@given(
    sessions=st.sets(st.sampled_from("abcdefgh")),
    deleted=st.sets(st.sampled_from("abcdefgh")),
    pool_made=st.sets(st.sampled_from("abcdefgh")),
)
def test_nothing_is_ever_removed_without_evidence(sessions: set[str], deleted: set[str], pool_made: set[str]) -> None:
    evidence = Evidence(deleted=frozenset(deleted), pool_made=frozenset(pool_made))
    objects = ([desktop(i) for i in sessions], [volume(i) for i in sessions])
    actions = plan([], *objects, busy=set(), now=NOW, grace_s=0, evidence=evidence, max_removals=100)
    removed = {a.session for a in actions if isinstance(a, RemoveDesktop | RemoveVolume)}
    kept = {a.session for a in actions if isinstance(a, KeepUnknown)}
    assert removed == sessions & (deleted | pool_made)
    assert kept == sessions - removed


def test_ttl_expiry_follows_the_spec_action() -> None:
    stop = record("t1", S.READY, expires_at=NOW - 1)
    delete = record("t2", S.READY, expires_at=NOW - 1, spec=SessionSpec(ttl_seconds=5, ttl_action="delete"))
    later = record("t3", S.READY, expires_at=NOW + 100)
    stopped = record("t4", S.STOPPED, expires_at=NOW - 1, spec=SessionSpec(ttl_seconds=5, ttl_action="delete"))
    actions = plan(
        [stop, delete, later, stopped],
        [desktop("t1"), desktop("t2"), desktop("t3")],
        [],
        busy=set(),
        now=NOW,
        grace_s=60,
    )
    assert set(actions) == {
        Expire(session="t1", generation=1, then="stop"),
        Expire(session="t2", generation=1, then="delete"),
        Expire(session="t4", generation=1, then="delete"),
    }


def test_the_warm_pools_desktops_are_not_orphans() -> None:
    objects = ([desktop("w1"), desktop("x")], [volume("w1"), volume("x")])
    gone = Evidence(deleted=frozenset({"x", "w1"}))
    actions = plan([], *objects, busy=set(), now=NOW, grace_s=0, pooled=frozenset({"w1"}), evidence=gone)
    assert sorted(kinds(actions)) == [("RemoveDesktop", "x"), ("RemoveVolume", "x")]


@given(
    target=st.integers(0, 6),
    pooled=st.lists(st.sampled_from("abcdefgh"), unique=True, max_size=8),
    running=st.none() | st.sets(st.sampled_from("abcdefgh")),
    making=st.integers(0, 3),
)
def test_the_pool_plan_converges_to_its_target(
    target: int, pooled: list[str], running: set[str] | None, making: int
) -> None:
    p = plan_pool(target, pooled, running, making)
    dropped = set(p.drop)
    assert dropped <= set(pooled) and len(p.drop) == len(dropped)
    if running is not None:
        assert {i for i in pooled if i not in running} <= dropped  # dead ones always go
    kept = [i for i in pooled if i not in dropped]
    assert len(kept) <= target  # never over target once carried out...
    assert len(kept) + making + p.make >= target  # ...and never short of it
    assert p.make == max(0, target - len(kept) - making)
    # The oldest live desktops are kept (they are claimed first).
    live = [i for i in pooled if running is None or i in running]
    assert kept == live[: len(kept)]


def test_a_session_failed_with_its_sandbox_comes_back_with_its_desktop() -> None:
    lost = SessionError(code="desktop_lost", message="silent", cause="sandbox_unavailable")
    records = [record("up", S.FAILED, error=lost), record("down", S.FAILED, error=lost), record("old", S.STOPPED)]
    desktops = [desktop("up"), desktop("down", running=False), desktop("old")]
    assert set(plan(records, desktops, [], busy=set(), now=NOW, grace_s=60)) == {
        Recover(session="up", generation=1),
        RestartDesktop(session="down", generation=1, reason="its sandbox is back and so is its desktop"),
        RemoveDesktop(session="old", name="desktop-old", reason="left over by a stopped session"),
    }
