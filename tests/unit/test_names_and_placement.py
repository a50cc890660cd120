from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.names import (
    address_pool,
    desktop_name,
    is_valid_session_id,
    job_id,
    new_session_id,
    volume_name,
)
from orchestrator.placement import NoSandbox, choose_sandbox
from orchestrator.schemas import SandboxInfo
from workers.docker import split_reference


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


def sandbox(id: str, sessions: int, capacity: int = 10) -> SandboxInfo:
    return SandboxInfo(
        id=id,
        depth=1,
        version="x",
        hostname="h",
        sessions=sessions,
        capacity=capacity,
        load=0.0,
        free_disk_bytes=0,
        privilege="caps",
        ts="",
    )


def test_placement_prefers_the_emptiest_live_sandbox() -> None:
    assert choose_sandbox([sandbox("a", 5), sandbox("b", 2)], None, "local") == "b"
    assert choose_sandbox([sandbox("a", 2), sandbox("b", 2)], None, "local") == "a"  # ties by id
    assert choose_sandbox([], None, "local") == "local"
    with pytest.raises(NoSandbox, match="no sandbox is running"):
        choose_sandbox([], None, None)


def test_placement_refuses_a_full_fleet_and_unknown_sandboxes() -> None:
    with pytest.raises(NoSandbox, match="capacity"):
        choose_sandbox([sandbox("a", 10)], None, "local")
    with pytest.raises(NoSandbox, match="'zzz'"):
        choose_sandbox([sandbox("a", 1)], "zzz", "local")
    assert choose_sandbox([sandbox("a", 1)], "a", "local") == "a"


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
