"""The API's /metrics text (orchestrator/api_metrics.py): the same families, HELP texts,
labels and values as the hand-written exposition it replaced, which EXPECTED is a copy of."""

from __future__ import annotations

import dataclasses

from prometheus_client.parser import text_string_to_metric_families

from orchestrator.api_metrics import ApiSnapshot, PortPoolStats, render
from orchestrator.schemas import SandboxInfo
from orchestrator.states import SandboxStatus


def sandbox(
    id: str,
    status: SandboxStatus,
    placed: int,
    capacity: int,
    pool_ready: int = 0,
    pool_target: int = 0,
    free_disk: int = 0,
    min_free_disk: int = 0,
) -> SandboxInfo:
    return SandboxInfo(
        id=id,
        depth=1,
        version="0.1.0",
        hostname="h",
        sessions=0,
        capacity=capacity,
        load=0.0,
        free_disk_bytes=free_disk,
        min_free_disk_bytes=min_free_disk,
        privilege="caps",
        ts="2026-01-01T00:00:00.000Z",
        status=status,
        placed=placed,
        pool_ready=pool_ready,
        pool_target=pool_target,
    )


SNAPSHOT = ApiSnapshot(
    sessions_by_state={"pending": 2, "ready": 0, "failed": 1},
    sandboxes=[
        sandbox("a", SandboxStatus.AVAILABLE, 3, 10, pool_ready=1, pool_target=2, free_disk=2**30, min_free_disk=2**31),
        sandbox("b", SandboxStatus.DRAINING, 5, 4, free_disk=2**32, min_free_disk=2**31),
        sandbox('odd"\\id', SandboxStatus.UNAVAILABLE, 1, 10),
        sandbox("d", SandboxStatus.DRAINED, 0, 7),
    ],
    queued={"a": 2, "b": 0, 'odd"\\id': 1, "d": 0},
    oldest_queued_age_s={"a": 1.23456, "b": 0.0, 'odd"\\id': 0.5, "d": 0.0},
    firehose_length=42,
    capacity_refusals=3,
    sse_followers=5,
    fallback_cap=50,
)

# What the hand-written families rendered for SNAPSHOT (integers without ".0").
EXPECTED = r"""# HELP orchestrator_sessions Sessions by state.
# TYPE orchestrator_sessions gauge
orchestrator_sessions{state="pending"} 2
orchestrator_sessions{state="ready"} 0
orchestrator_sessions{state="failed"} 1
# HELP orchestrator_sandboxes Known sandboxes by status.
# TYPE orchestrator_sandboxes gauge
orchestrator_sandboxes{status="available"} 1
orchestrator_sandboxes{status="draining"} 1
orchestrator_sandboxes{status="drained"} 1
orchestrator_sandboxes{status="unavailable"} 1
# HELP orchestrator_sandboxes_live Sandboxes with a fresh heartbeat (available or draining).
# TYPE orchestrator_sandboxes_live gauge
orchestrator_sandboxes_live 2
# HELP orchestrator_sandbox_up 1 while the sandbox's heartbeat is fresh.
# TYPE orchestrator_sandbox_up gauge
orchestrator_sandbox_up{sandbox="a"} 1
orchestrator_sandbox_up{sandbox="b"} 1
orchestrator_sandbox_up{sandbox="odd\"\\id"} 0
orchestrator_sandbox_up{sandbox="d"} 0
# HELP orchestrator_sandbox_placed Sessions placed on the sandbox and not deleted (what its cap counts).
# TYPE orchestrator_sandbox_placed gauge
orchestrator_sandbox_placed{sandbox="a"} 3
orchestrator_sandbox_placed{sandbox="b"} 5
orchestrator_sandbox_placed{sandbox="odd\"\\id"} 1
orchestrator_sandbox_placed{sandbox="d"} 0
# HELP orchestrator_sandbox_capacity The sandbox's cap.
# TYPE orchestrator_sandbox_capacity gauge
orchestrator_sandbox_capacity{sandbox="a"} 10
orchestrator_sandbox_capacity{sandbox="b"} 4
orchestrator_sandbox_capacity{sandbox="odd\"\\id"} 10
orchestrator_sandbox_capacity{sandbox="d"} 7
# HELP orchestrator_sandbox_free_disk_bytes Free bytes on the sandbox's dockerd data root (last heartbeat).
# TYPE orchestrator_sandbox_free_disk_bytes gauge
orchestrator_sandbox_free_disk_bytes{sandbox="a"} 1073741824
orchestrator_sandbox_free_disk_bytes{sandbox="b"} 4294967296
orchestrator_sandbox_free_disk_bytes{sandbox="odd\"\\id"} 0
orchestrator_sandbox_free_disk_bytes{sandbox="d"} 0
# HELP orchestrator_sandbox_low_disk 1 while the sandbox is below its free-disk watermark: placement skips it.
# TYPE orchestrator_sandbox_low_disk gauge
orchestrator_sandbox_low_disk{sandbox="a"} 1
orchestrator_sandbox_low_disk{sandbox="b"} 0
orchestrator_sandbox_low_disk{sandbox="odd\"\\id"} 0
orchestrator_sandbox_low_disk{sandbox="d"} 0
# HELP orchestrator_queue_depth Jobs queued per sandbox.
# TYPE orchestrator_queue_depth gauge
orchestrator_queue_depth{sandbox="a"} 2
orchestrator_queue_depth{sandbox="b"} 0
orchestrator_queue_depth{sandbox="odd\"\\id"} 1
orchestrator_queue_depth{sandbox="d"} 0
# HELP orchestrator_queue_oldest_age_seconds Age of the oldest queued job per sandbox (0: none).
# TYPE orchestrator_queue_oldest_age_seconds gauge
orchestrator_queue_oldest_age_seconds{sandbox="a"} 1.235
orchestrator_queue_oldest_age_seconds{sandbox="b"} 0
orchestrator_queue_oldest_age_seconds{sandbox="odd\"\\id"} 0.5
orchestrator_queue_oldest_age_seconds{sandbox="d"} 0
# HELP orchestrator_pool_ready Warm desktops ready and unclaimed, per sandbox (last heartbeat).
# TYPE orchestrator_pool_ready gauge
orchestrator_pool_ready{sandbox="a"} 1
orchestrator_pool_ready{sandbox="b"} 0
orchestrator_pool_ready{sandbox="odd\"\\id"} 0
orchestrator_pool_ready{sandbox="d"} 0
# HELP orchestrator_pool_target Warm desktops each sandbox keeps ready.
# TYPE orchestrator_pool_target gauge
orchestrator_pool_target{sandbox="a"} 2
orchestrator_pool_target{sandbox="b"} 0
orchestrator_pool_target{sandbox="odd\"\\id"} 0
orchestrator_pool_target{sandbox="d"} 0
# HELP orchestrator_sandboxes_desired Autoscaling signal: ceil(sessions holding a place / mean cap of live sandboxes), at least 1.
# TYPE orchestrator_sandboxes_desired gauge
orchestrator_sandboxes_desired 2
# HELP orchestrator_capacity_refusals_total Creates this API process refused with no_capacity.
# TYPE orchestrator_capacity_refusals_total counter
orchestrator_capacity_refusals_total 3
# HELP orchestrator_event_stream_length Entries in the firehose stream.
# TYPE orchestrator_event_stream_length gauge
orchestrator_event_stream_length 42
# HELP orchestrator_sse_followers SSE clients following live events on this API process.
# TYPE orchestrator_sse_followers gauge
orchestrator_sse_followers 5
"""  # noqa: E501 (one HELP text is longer than a line)


def split(text: str) -> tuple[list[str], list[tuple[str, float]]]:
    """(HELP and TYPE lines, (sample without its value, value) in order)."""
    meta, samples = [], []
    for line in text.splitlines():
        if line.startswith("#"):
            meta.append(line)
        else:
            series, _, value = line.rpartition(" ")
            samples.append((series, float(value)))
    return meta, samples


def test_the_text_matches_the_hand_written_exposition() -> None:
    text = render(SNAPSHOT)
    assert text.endswith("\n")
    meta, samples = split(text)
    expected_meta, expected_samples = split(EXPECTED)
    assert meta == expected_meta  # names, HELP texts, types, in the same order
    assert samples == expected_samples  # label sets (escaped alike) and values, in the same order


def test_the_counter_keeps_its_total_name() -> None:
    families = {f.name: f for f in text_string_to_metric_families(render(SNAPSHOT))}
    refusals = families["orchestrator_capacity_refusals"]  # the parser's family name drops _total
    assert refusals.type == "counter"
    assert [(s.name, s.value) for s in refusals.samples] == [("orchestrator_capacity_refusals_total", 3.0)]
    assert "orchestrator_capacity_refusals_created" not in render(SNAPSHOT)


def test_the_port_pool_appears_once_used() -> None:
    assert "orchestrator_port_connections" not in render(SNAPSHOT)
    used = dataclasses.replace(SNAPSHOT, port_connections=PortPoolStats(kept=2, opened=3, reused=7))
    _, samples = split(render(used))
    assert samples[-3:] == [
        ("orchestrator_port_connections_kept", 2.0),
        ("orchestrator_port_connections_opened_total", 3.0),
        ("orchestrator_port_connections_reused_total", 7.0),
    ]


def test_no_sandbox_yet() -> None:
    empty = ApiSnapshot({"pending": 1}, [], {}, {}, 0, 0, 0, fallback_cap=50)
    meta, samples = split(render(empty))
    assert len(meta) == 2 * 16  # every family is there, with no samples where there is no sandbox
    assert dict(samples) == {
        'orchestrator_sessions{state="pending"}': 1,
        'orchestrator_sandboxes{status="available"}': 0,
        'orchestrator_sandboxes{status="draining"}': 0,
        'orchestrator_sandboxes{status="drained"}': 0,
        'orchestrator_sandboxes{status="unavailable"}': 0,
        "orchestrator_sandboxes_live": 0,
        "orchestrator_sandboxes_desired": 1,
        "orchestrator_capacity_refusals_total": 0,
        "orchestrator_event_stream_length": 0,
        "orchestrator_sse_followers": 0,
    }
