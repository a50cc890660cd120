from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.schemas import SessionRecord, SessionSpec
from orchestrator.states import SessionState
from workers.docker import DockerObject
from workers.pool import plan_pool
from workers.reconciler import Action, plan

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
    return [(a.kind, a.session) for a in actions]


def test_a_healthy_sandbox_needs_nothing() -> None:
    records = [record("a", S.READY), record("b", S.STOPPED)]
    assert plan(records, [desktop("a")], [volume("a"), volume("b")], busy=set(), now=NOW, grace_s=60) == []


def test_interrupted_operations_are_resumed_unless_someone_holds_the_lease() -> None:
    records = [record("c", S.CREATING), record("d", S.DELETING), record("p", S.PENDING), record("x", S.STOPPING)]
    actions = plan(records, [], [], busy={"x"}, now=NOW, grace_s=60)
    assert {(a.kind, a.session, a.operation) for a in actions} == {
        ("resume", "c", "create"),
        ("resume", "d", "delete"),
        ("enqueue_create", "p", None),
    }


def test_lost_and_stale_desktops_of_ready_sessions() -> None:
    records = [record("gone", S.READY), record("dead", S.READY), record("old", S.READY, generation=2)]
    actions = plan(records, [desktop("dead", running=False), desktop("old", 1)], [], busy=set(), now=NOW, grace_s=60)
    assert sorted(kinds(actions)) == [("desktop_lost", "gone"), ("desktop_lost", "old"), ("restart_desktop", "dead")]


def test_orphans_only_after_the_grace_period() -> None:
    young = plan([], [desktop("ghost", age=10)], [volume("ghost", age=10)], busy=set(), now=NOW, grace_s=60)
    assert young == []
    old = plan([], [desktop("ghost")], [volume("ghost")], busy=set(), now=NOW, grace_s=60)
    assert sorted(kinds(old)) == [("remove_desktop", "ghost"), ("remove_volume", "ghost")]


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
    assert {(a.kind, a.session, a.operation) for a in actions} == {
        ("expire", "t1", "stop"),
        ("expire", "t2", "delete"),
        ("expire", "t4", "delete"),
    }


def test_the_warm_pools_desktops_are_not_orphans() -> None:
    objects = ([desktop("w1"), desktop("x")], [volume("w1"), volume("x")])
    actions = plan([], *objects, busy=set(), now=NOW, grace_s=0, pooled=frozenset({"w1"}))
    assert sorted(kinds(actions)) == [("remove_desktop", "x"), ("remove_volume", "x")]


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
