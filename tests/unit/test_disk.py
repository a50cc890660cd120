"""The worker's free-disk gauge (workers/disk.py): it measures the sandbox dockerd's data root,
falls back to the worker's own disk only when that root is not here, and says why a sandbox
is below its watermark. Pure logic over the in-memory Docker port."""

from __future__ import annotations

from pathlib import Path

from tests.fakes import FakeRuntime
from workers.disk import FALLBACK_PATH, DiskGauge

GIB = 2**30


async def test_the_gauge_measures_the_dockerd_data_root(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    runtime.data_root_dir = str(tmp_path)
    seen: list[str] = []

    def measure(path: str) -> int:
        seen.append(path)
        return 5 * GIB

    gauge = DiskGauge(runtime, min_free_mb=2048, measure=measure)
    assert await gauge.free_bytes() == 5 * GIB
    assert await gauge.free_bytes() == 5 * GIB
    assert seen == [str(tmp_path)] * 2
    assert runtime.calls.count("data_root") == 1  # asked once, then known
    assert gauge.floor_bytes == 2048 * 2**20 and await gauge.low() is None


async def test_a_data_root_that_is_not_here_falls_back_to_the_workers_disk(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    runtime.data_root_dir = str(tmp_path / "elsewhere")
    gauge = DiskGauge(runtime, min_free_mb=0)
    assert await gauge.path() == FALLBACK_PATH
    assert await gauge.free_bytes() > 0
    assert await gauge.low() is None  # no watermark: never low


async def test_below_the_watermark_the_gauge_says_by_how_much(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    runtime.data_root_dir = str(tmp_path)
    gauge = DiskGauge(runtime, min_free_mb=2048, measure=lambda _p: GIB // 2)
    assert await gauge.low() == f"0.5 GiB free on {tmp_path}, below the watermark of 2.0 GiB"


async def test_a_data_root_that_goes_away_is_measured_at_the_fallback_and_asked_again(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    root = tmp_path / "docker"
    root.mkdir()
    runtime.data_root_dir = str(root)
    gauge = DiskGauge(runtime, min_free_mb=0)
    assert await gauge.path() == str(root)
    root.rmdir()
    assert await gauge.free_bytes() > 0  # the worker's own disk, this once
    assert runtime.calls.count("data_root") == 1
    root.mkdir()
    assert await gauge.path() == str(root)
    assert runtime.calls.count("data_root") == 2
