"""orchestrator/loops.py: a duty runs at a fixed rate and survives its failures."""

from __future__ import annotations

import itertools

import anyio
import pytest

from orchestrator.loops import every


async def test_a_slow_run_does_not_push_the_next_one_back() -> None:
    starts: list[float] = []

    async def slow() -> None:
        starts.append(anyio.current_time())
        await anyio.sleep(0.15)  # most of the interval

    with anyio.move_on_after(1.3):
        await every(0.2, slow, "slow duty")
    gaps = sorted(b - a for a, b in itertools.pairwise(starts))
    assert len(gaps) >= 3, starts
    # Start to start stays the interval, 0.2 s (sleeping after each run would make it 0.35 s).
    assert gaps[len(gaps) // 2] < 0.28, gaps


async def test_a_failing_run_is_logged_and_the_duty_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("boom")

    with anyio.move_on_after(0.35):
        await every(0.1, flaky, "flaky duty")
    assert runs >= 2
    assert any("flaky duty failed" in r.getMessage() for r in caplog.records)
