"""M5: what is read back from Redis (records, heartbeats, events, drain requests) or from the
server tolerates a newer version's extra fields, and one undecodable record is skipped, not a
failed pass; request bodies stay strict. Each worker reads only its own sandbox's records."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import msgspec
import pytest

from orchestrator.sandboxes import SandboxRegistry
from orchestrator.schemas import (
    DrainRequest,
    Event,
    SandboxInfo,
    SandboxList,
    SessionCreate,
    SessionList,
    SessionRecord,
    now_rfc3339,
)
from orchestrator.states import SandboxStatus, SessionState
from tests.fakes import SANDBOX, Stack, open_stack
from workers.health import HealthCheck
from workers.heartbeat import sessions_by_state
from workers.metrics import Snapshot, WorkerMetrics

SIDS = ("skew-a", "skew-b")


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[Stack]:
    async with open_stack(redis_url) as stack:
        for sid in SIDS:
            await stack.create(sid)
        assert await stack.run_queued() == ["ready", "ready"]
        yield stack


async def add_field(stack: Stack, key: str, **extra: object) -> None:
    raw = await stack.redis.get(key)
    assert raw is not None
    await stack.redis.set(key, json.dumps({**json.loads(raw), **extra}))


def info(sandbox: str) -> SandboxInfo:
    return SandboxInfo(
        id=sandbox,
        depth=1,
        version="9.9",
        hostname="h",
        sessions=0,
        capacity=5,
        load=0.0,
        free_disk_bytes=0,
        privilege="p",
        ts=now_rfc3339(),
    )


async def test_a_record_from_a_newer_version_breaks_no_reader(stack: Stack) -> None:
    await add_field(stack, stack.keys.session(SIDS[0]), owner="someone", spec_v2={"x": 1})
    # The nested spec and its resources too.
    raw = json.loads(await stack.redis.get(stack.keys.session(SIDS[1])))
    raw["spec"]["quota_gb"] = 5
    raw["spec"]["resources"]["gpus"] = 1
    await stack.redis.set(stack.keys.session(SIDS[1]), json.dumps(raw))

    assert [r.id for r in await stack.store.list()] == list(SIDS)
    assert [r.id for r in await stack.store.list(sandbox=SANDBOX)] == list(SIDS)
    assert await stack.sessions.list(None, {}) != []
    assert (await sessions_by_state(stack.store, SANDBOX))["ready"] == 2
    assert await stack.reconciler().pass_once() == []
    await HealthCheck(stack.settings, stack.store, stack.bus, stack.runtime).check()
    # The record is still updatable (a transition rewrites what it knows).
    await stack.sessions.stop(SIDS[0])
    assert await stack.run_queued() == ["stopped"]


async def test_an_undecodable_record_is_skipped_and_logged(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    await stack.redis.set(stack.keys.session("skew-bad"), b'{"id": "skew-bad", "state": "no-such-state"}')
    await stack.redis.sadd(stack.keys.session_index, "skew-bad")  # type: ignore[misc]
    await stack.redis.sadd(stack.keys.placed(SANDBOX), "skew-bad")  # type: ignore[misc]
    with caplog.at_level(logging.WARNING, logger="orchestrator.store"):
        assert [r.id for r in await stack.store.list()] == list(SIDS)
        assert [r.id for r in await stack.store.list(sandbox=SANDBOX)] == list(SIDS)
        await stack.reconciler().pass_once()
    assert "session record skew-bad does not decode" in caplog.text


async def test_a_worker_reads_only_its_own_sandboxs_records(stack: Stack) -> None:
    mine = await stack.store.get(SIDS[0])
    assert mine is not None
    other = msgspec.structs.replace(mine, id="skew-elsewhere", sandbox="another")
    await stack.store.create(other)
    assert {r.id for r in await stack.store.list()} == {*SIDS, "skew-elsewhere"}
    assert [r.id for r in await stack.store.list(sandbox=SANDBOX)] == list(SIDS)
    assert [r.id for r in await stack.store.list(sandbox="another")] == ["skew-elsewhere"]
    # A stray member of the placed set (a record that moved on) is not this sandbox's.
    await stack.redis.sadd(stack.keys.placed(SANDBOX), "skew-elsewhere")  # type: ignore[misc]
    assert [r.id for r in await stack.store.list(sandbox=SANDBOX)] == list(SIDS)


async def test_a_newer_heartbeat_breaks_no_listing(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    registry = SandboxRegistry(stack.redis, stack.keys)
    for sandbox in ("skew-new", "skew-bad"):
        await registry.mark_alive(sandbox, 10)
        await registry.beat(info(sandbox))
    await add_field(stack, stack.keys.sandbox("skew-new"), gpu_count=2, labels={"a": "b"})
    await stack.redis.set(stack.keys.sandbox("skew-bad"), b'{"id": 1}')
    with caplog.at_level(logging.WARNING, logger="orchestrator.sandboxes"):
        listed = await registry.list()
    assert [s.id for s in listed] == ["skew-new"] and listed[0].labels == {"a": "b"}
    assert "sandbox skew-bad's heartbeat does not decode" in caplog.text
    await stack.redis.set(stack.keys.sandbox_drain("skew-new"), b'{"by": "api", "stop_desktops": true, "why": "x"}')
    assert await registry.drain_request("skew-new") == DrainRequest(by="api", stop_desktops=True)


def test_the_worker_metrics_render_the_unknown_objects_gauge() -> None:
    snapshot = Snapshot(0, 0.0, 0, {"ready": 1}, 5, 0, 0, status=SandboxStatus.AVAILABLE, unknown_objects=3)
    text = WorkerMetrics("sb").render(snapshot).decode()
    assert 'orchestrator_reconcile_unknown_objects{sandbox="sb"} 3.0' in text


def test_what_the_client_decodes_tolerates_a_newer_server() -> None:
    record = {
        "id": "abc",
        "state": "ready",
        "generation": 1,
        "sandbox": "s",
        "spec": {"resources": {"cpus": 1, "tpus": 2}, "new": True},
        "created_at": "",
        "updated_at": "",
        "owner": "x",
    }
    listed = msgspec.json.decode(json.dumps({"sessions": [record], "next": "c"}), type=SessionList)
    assert listed.sessions[0].state is SessionState.READY
    assert msgspec.json.decode(json.dumps(record), type=SessionRecord).spec.resources.cpus == 1
    boxes = {"sandboxes": [{**msgspec.to_builtins(info("s")), "zone": "a"}], "more": 1}
    assert msgspec.json.decode(json.dumps(boxes), type=SandboxList).sandboxes[0].id == "s"
    event = {"type": "t", "ts": "", "sandbox": "s", "data": {}, "span": "x"}
    assert msgspec.json.decode(json.dumps(event), type=Event).type == "t"


def test_request_bodies_stay_strict_down_to_their_resources() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `owner`"):
        msgspec.json.decode(b'{"owner": "x"}', type=SessionCreate)
    with pytest.raises(msgspec.ValidationError, match="unknown field `gpus`"):
        msgspec.json.decode(b'{"resources": {"gpus": 1}}', type=SessionCreate)
