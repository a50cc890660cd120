from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.keys import job_id
from orchestrator.names import address_pool, desktop_name, is_valid_session_id, new_session_id, volume_name
from orchestrator.placement import Candidate, NoSandbox, Unsatisfiable, better, choose, eligible, low_disk
from orchestrator.schemas import SandboxInfo
from orchestrator.states import SandboxStatus
from workers.runtime import split_reference


def test_names_are_deterministic() -> None:
    assert volume_name("abc") == "docker-data-abc"
    assert desktop_name("abc") == "desktop-abc"
    assert job_id("create_session", "abc", 3) == "create_session:abc:3"


@given(st.integers(min_value=0, max_value=43))
def test_address_pools_by_depth_never_overlap(depth: int) -> None:
    pool = address_pool(depth)
    assert pool == f"10.{212 + depth}.0.0/16"
    if depth:
        assert address_pool(depth - 1) != pool


@pytest.mark.parametrize("depth", [-1, 44])
def test_address_pool_refuses_depths_past_the_octet(depth: int) -> None:
    with pytest.raises(ValueError, match="depth"):
        address_pool(depth)


def test_generated_ids_are_valid_and_distinct() -> None:
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(is_valid_session_id(i) for i in ids)


@pytest.mark.parametrize("bad", ["", "ab", "-abc", "ABC", "a_b_c", "a" * 64, "abc/def", "abc\n"])
def test_invalid_ids(bad: str) -> None:
    assert not is_valid_session_id(bad)


def sandbox(
    id: str, status: SandboxStatus = SandboxStatus.AVAILABLE, labels: dict[str, str] | None = None
) -> SandboxInfo:
    return SandboxInfo(
        id=id,
        depth=1,
        version="x",
        hostname="h",
        sessions=0,
        capacity=10,
        load=0.0,
        free_disk_bytes=0,
        privilege="caps",
        ts="",
        status=status,
        labels=labels or {},
    )


def test_eligible_sandboxes_are_available_named_and_labelled() -> None:
    fleet = [
        sandbox("a"),
        sandbox("b", labels={"gpu": "true"}),
        sandbox("c", SandboxStatus.DRAINING),
        sandbox("d", SandboxStatus.UNAVAILABLE),
    ]
    assert [s.id for s in eligible(fleet, None, {})] == ["a", "b"]
    assert [s.id for s in eligible(fleet, None, {"gpu": "true"})] == ["b"]
    assert [s.id for s in eligible(fleet, "a", {})] == ["a"]
    with pytest.raises(NoSandbox, match="'c' is draining"):
        eligible(fleet, "c", {})
    with pytest.raises(Unsatisfiable, match="'zzz' is unknown") as unknown:
        eligible(fleet, "zzz", {})
    assert unknown.value.field == "sandbox"
    with pytest.raises(Unsatisfiable, match="gpu=false") as labels:
        eligible(fleet, None, {"gpu": "false"})
    assert labels.value.field == "constraints"
    with pytest.raises(NoSandbox, match="no sandbox that could take it is available"):
        eligible([sandbox("d", SandboxStatus.UNAVAILABLE)], None, {})
    # Known labels on a sandbox that is away: a wait (503), not a mistake (422).
    with pytest.raises(NoSandbox):
        eligible([sandbox("d", SandboxStatus.UNAVAILABLE, labels={"gpu": "true"})], None, {"gpu": "true"})


def test_the_least_loaded_wins_by_ratio_then_count_then_id() -> None:
    assert choose([Candidate("a", 5, 10), Candidate("b", 2, 10)]) == Candidate("b", 2, 10)
    assert choose([Candidate("a", 2, 10), Candidate("b", 2, 10)]) == Candidate("a", 2, 10)
    # 3/20 < 2/10: the ratio decides, not the count.
    assert choose([Candidate("a", 2, 10), Candidate("b", 3, 20)]) == Candidate("b", 3, 20)
    # Equal ratios: fewer placed wins.
    assert choose([Candidate("a", 2, 10), Candidate("b", 1, 5)]) == Candidate("b", 1, 5)
    assert choose([Candidate("a", 10, 10)]) is None
    # A warm desktop beats load, only when the create can use one.
    warm = Candidate("z", 9, 10, warm=True)
    assert choose([Candidate("a", 0, 10), warm], prefer_warm=True) == warm
    assert choose([Candidate("a", 0, 10), warm], prefer_warm=False) == Candidate("a", 0, 10)


candidates_st = st.lists(
    st.builds(
        Candidate,
        id=st.text("abcdef", min_size=1, max_size=3),
        placed=st.integers(0, 30),
        cap=st.integers(1, 30),
        warm=st.booleans(),
        low_disk=st.booleans(),
    ),
    max_size=8,
    unique_by=lambda c: c.id,
)


@given(candidates_st, st.booleans())
def test_choose_never_picks_a_full_or_low_disk_sandbox_and_no_other_beats_it(
    cands: list[Candidate], prefer_warm: bool
) -> None:
    chosen = choose(cands, prefer_warm)
    room = [c for c in cands if not c.full and not c.low_disk]
    if not room:
        assert chosen is None
        return
    assert chosen is not None and not chosen.full and not chosen.low_disk
    assert not any(better(c, chosen, prefer_warm) for c in room if c != chosen)
    assert choose(list(reversed(cands)), prefer_warm) == chosen  # order of the input does not matter


def test_low_disk_sandboxes_are_never_chosen_even_when_warm_or_empty() -> None:
    low = Candidate("a", 0, 10, warm=True, low_disk=True)
    assert choose([low, Candidate("b", 9, 10)], prefer_warm=True) == Candidate("b", 9, 10)
    assert choose([low]) is None


GIB = 2**30


@given(st.integers(0, 8 * GIB), st.integers(0, 8 * GIB))
def test_low_disk_is_below_the_sandboxes_own_watermark(free: int, floor: int) -> None:
    info = msgspec.structs.replace(sandbox("a"), free_disk_bytes=free, min_free_disk_bytes=floor)
    why = low_disk(info)
    assert (why is not None) == (floor > 0 and free < floor)
    if why is not None:
        assert why.startswith("a: ") and f"{free / GIB:.1f} GiB free" in why and f"{floor / GIB:.1f} GiB" in why


def test_an_older_worker_without_a_watermark_is_never_low_on_disk() -> None:
    # Its heartbeat has no min_free_disk_bytes: decoded as 0, no watermark.
    raw = msgspec.json.encode(msgspec.structs.replace(sandbox("a"), free_disk_bytes=1))
    raw = raw.replace(b',"min_free_disk_bytes":0', b"")
    assert b"min_free_disk_bytes" not in raw
    old = msgspec.json.decode(raw, type=SandboxInfo)
    assert old.min_free_disk_bytes == 0 and low_disk(old) is None


@given(st.lists(st.integers(1, 12), min_size=1, max_size=5), st.integers(0, 80))
def test_placing_one_by_one_fills_every_cap_and_stays_balanced(caps: list[int], creates: int) -> None:
    placed = [0] * len(caps)
    refused = 0
    for _ in range(creates):
        chosen = choose([Candidate(str(i), placed[i], cap) for i, cap in enumerate(caps)])
        if chosen is None:
            refused += 1
            continue
        placed[int(chosen.id)] += 1
    assert all(p <= cap for p, cap in zip(placed, caps, strict=True))
    assert sum(placed) == min(creates, sum(caps)) and refused == max(0, creates - sum(caps))
    # Balanced: any two sandboxes' fill ratios differ by at most one session's share of the larger cap.
    ratios = [p / cap for p, cap in zip(placed, caps, strict=True)]
    assert max(ratios) - min(ratios) <= 1 / min(caps) + 1e-9


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("orchestrator/desktop:dev", ("orchestrator/desktop", "dev")),
        ("registry:5000/orchestrator/desktop:dev", ("registry:5000/orchestrator/desktop", "dev")),
        ("registry:5000/orchestrator/desktop", ("registry:5000/orchestrator/desktop", "latest")),
        ("busybox", ("busybox", "latest")),
    ],
)
def test_image_references_split_into_repository_and_tag(image: str, expected: tuple[str, str]) -> None:
    assert split_reference(image) == expected
