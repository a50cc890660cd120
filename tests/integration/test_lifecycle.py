"""Generation fencing, the reconciler (orphans, lost desktops, TTL), resources and env."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import msgspec
import pytest
import redis.asyncio as aioredis

from orchestrator.client import Client, ServerEvent
from orchestrator.config import Settings
from orchestrator.events import EventBus
from orchestrator.keys import Keys, job_id
from orchestrator.names import LABEL_ROLE, LABEL_SANDBOX, LABEL_SESSION, desktop_name
from orchestrator.queue import Operation
from workers.reconciler import MAX_RESTARTS, RemoveDesktop, RemoveVolume
from workers.worker import SandboxWorker

from .conftest import TEST_IMAGE, adocker, count_objects, delivered_env, desktop_json, running_worker

READY = 90.0
# The desktop image's PATH (Debian's): a session that sets PATH keeps what dockerd needs.
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


async def ready_session(client: Client, **kwargs: object) -> tuple[str, list[ServerEvent]]:
    sid = (await client.create(**kwargs)).id  # type: ignore[arg-type]
    events = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=READY)
    assert events[-1].type == "session.ready", [e.data for e in events]
    return sid, events


async def job_finished(redis: aioredis.Redis, queue: str, job: str, timeout: float = 30) -> None:
    """Wait until arq has run ``job``: gone from the queue and not in progress."""
    async with asyncio.timeout(timeout):
        while await redis.zscore(queue, job) is not None or await redis.exists(f"arq:in-progress:{job}"):
            await asyncio.sleep(0.02)


async def test_a_stale_stop_never_touches_a_newer_incarnation(
    client: Client, worker: SandboxWorker, docker_settings: Settings, redis: aioredis.Redis
) -> None:
    host = docker_settings.docker_host
    assert host
    sid, events = await ready_session(client)
    await client.stop(sid)
    stopped = await client.wait_for(sid, {"session.stopped"}, timeout=READY, after=events[-1].id)
    assert (await client.start(sid)).generation == 2
    restarted = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=READY, after=stopped[-1].id)
    assert restarted[-1].type == "session.ready"

    # A stop for generation 1 arrives late (a retried request, a slow producer).
    await worker.lifecycle_queue.enqueue(Operation.STOP, docker_settings.sandbox_id, sid, 1)
    queue = Keys(docker_settings.key_prefix).queue(docker_settings.sandbox_id)
    await job_finished(redis, queue, job_id(Operation.STOP.value, sid, 1))

    record = await client.get(sid)
    assert record.state == "ready" and record.generation == 2
    state = await adocker(
        "inspect",
        "--format",
        '{{.State.Running}} {{index .Config.Labels "orchestrator.generation"}}',
        desktop_name(sid),
        host=host,
    )
    assert state == "true 2"


async def test_a_deleted_sessions_leftovers_are_removed_after_the_grace_period_and_nothing_else(
    client: Client, docker_settings: Settings, bus: EventBus, redis: aioredis.Redis
) -> None:
    host = docker_settings.docker_host
    assert host
    sandbox = docker_settings.sandbox_id
    ours = ["--label", f"{LABEL_SANDBOX}={sandbox}", "--label", f"{LABEL_SESSION}=ghost-{sandbox}"]
    await adocker("volume", "create", *ours, f"docker-data-ghost-{sandbox}", host=host)
    await adocker(
        "create",
        "--name",
        f"desktop-ghost-{sandbox}",
        *ours,
        "--label",
        f"{LABEL_ROLE}=desktop",
        TEST_IMAGE,
        "sleep",
        "600",
        host=host,
    )
    # Not ours: no labels at all, and another sandbox's desktop. Neither may be touched.
    await adocker("create", "--name", f"bystander-{sandbox}", TEST_IMAGE, "sleep", "600", host=host)
    other = [
        "--label",
        f"{LABEL_SANDBOX}=other-{sandbox}",
        "--label",
        f"{LABEL_SESSION}=ghost2-{sandbox}",
        "--label",
        f"{LABEL_ROLE}=desktop",
    ]
    await adocker("create", "--name", f"desktop-other-{sandbox}", *other, TEST_IMAGE, "sleep", "600", host=host)
    try:
        # Within the grace period nothing is removed (a create may be between its steps).
        async with running_worker(docker_settings) as patient:
            assert patient.reconciler is not None
            actions = await patient.reconciler.pass_once()
            assert not [a for a in actions if isinstance(a, RemoveDesktop | RemoveVolume)]
        assert await count_objects(host, f"ghost-{sandbox}") == (1, 1)

        after = await bus.last_id(bus.keys.firehose)
        async with running_worker(replace(docker_settings, orphan_grace_s=0.0)) as eager:
            # No record and no tombstone: kept, whatever its age (H3), and reported.
            assert eager.reconciler.unknown_objects == 2
            assert await count_objects(host, f"ghost-{sandbox}") == (1, 1)
            # Its tombstone, as the deleted transition writes it: now the leftovers may go.
            await redis.set(bus.keys.session_deleted(f"ghost-{sandbox}"), "1", ex=3600)
            removed: list[dict[str, object]] = []
            async with asyncio.timeout(30):
                while len(removed) < 2:
                    for entry_id, event in await bus.read(bus.keys.firehose, after, block_ms=1000):
                        after = entry_id
                        if event.type == "reconcile.removed":
                            removed.append(event.data)
        assert {(d["kind"], d["name"]) for d in removed} == {
            ("desktop", f"desktop-ghost-{sandbox}"),
            ("volume", f"docker-data-ghost-{sandbox}"),
        }
        assert await count_objects(host, f"ghost-{sandbox}") == (0, 0)
        assert await adocker("ps", "-aq", "--filter", f"name=^bystander-{sandbox}$", host=host)
        assert await adocker("ps", "-aq", "--filter", f"name=^desktop-other-{sandbox}$", host=host)
    finally:
        await adocker("rm", "-f", f"bystander-{sandbox}", f"desktop-other-{sandbox}", host=host, check=False)


async def test_a_desktop_removed_from_outside_marks_the_session_desktop_lost(
    client: Client, worker: SandboxWorker, docker_settings: Settings
) -> None:
    host = docker_settings.docker_host
    assert host
    sid, events = await ready_session(client)
    await adocker("rm", "-f", desktop_name(sid), host=host)
    lost = await client.wait_for(sid, {"session.failed"}, timeout=30, after=events[-1].id)
    assert lost[-1].data["data"]["code"] == "desktop_lost"
    assert "gone" in lost[-1].data["data"]["message"]
    record = await client.get(sid)
    assert record.state == "failed" and record.error is not None and record.error.code == "desktop_lost"
    # A failed session can still be deleted, and then nothing is left.
    await client.delete(sid)
    await client.wait_for(sid, {"session.deleted"}, timeout=READY, after=lost[-1].id)
    assert await count_objects(host, sid) == (0, 0)


async def test_ttl_stops_the_session_with_its_events(
    client: Client, worker: SandboxWorker, docker_settings: Settings
) -> None:
    host = docker_settings.docker_host
    assert host
    record = await client.create(ttl_seconds=1)
    assert record.spec.ttl_seconds == 1 and record.spec.ttl_action == "stop"
    assert record.expires_at is not None and record.expires_at > 0
    events = await client.wait_for(record.id, {"session.stopped", "session.failed"}, timeout=READY)
    types = [e.type for e in events]
    assert types[-3:] == ["session.expired", "session.stopping", "session.stopped"], types
    assert await count_objects(host, record.id) == (0, 1)  # stopped: desktop gone, volume kept


async def test_resources_and_env_reach_the_desktop_and_env_is_never_echoed(
    client: Client, worker: SandboxWorker, docker_settings: Settings, redis: aioredis.Redis
) -> None:
    host = docker_settings.docker_host
    assert host
    secret = "s3cr3t-value-that-must-not-leak"
    env = {"API_TOKEN": secret, "MULTILINE": "one\ntwo $(not run) 'q' \\ \"", "PATH": "/opt/session/bin:" + IMAGE_PATH}
    resources = {"cpus": 0.5, "memory_mb": 512, "pids": 512}
    record = await client.create(resources=resources, env=env)
    sid = record.id
    events = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=READY)
    assert events[-1].type == "session.ready", [e.data for e in events]

    host_config = json.loads(await adocker("inspect", "--format", "{{json .HostConfig}}", desktop_name(sid), host=host))
    assert host_config["NanoCpus"] == 500_000_000
    assert host_config["Memory"] == 512 * 1024 * 1024
    assert host_config["PidsLimit"] == 512
    await assert_env_delivered_unseen(host, sid, env)

    assert record.spec.env_keys == ["API_TOKEN", "MULTILINE", "PATH"]
    listing = msgspec.json.encode([*await client.list(), await client.get(sid)]).decode()
    firehose = await redis.xrange(Keys(docker_settings.key_prefix).firehose)
    assert secret not in listing
    assert all(secret.encode() not in b"".join(fields[b"event"] for _, fields in [entry]) for entry in firehose)

    # Resumed (a new generation, a new container): delivered again, still unseen.
    await client.stop(sid)
    stopped = await client.wait_for(sid, {"session.stopped", "session.failed"}, timeout=60, after=events[-1].id)
    assert stopped[-1].type == "session.stopped"
    await client.start(sid)
    again = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=READY, after=stopped[-1].id)
    assert again[-1].type == "session.ready", [e.data for e in again]
    await assert_env_delivered_unseen(host, sid, env)


def strings(value: object) -> list[str]:
    """Every string in a decoded JSON document, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


async def assert_env_delivered_unseen(host: str, sid: str, env: dict[str, str]) -> None:
    """The session's env is where the desktop's processes get it, and nowhere ``docker inspect``
    (or anything else reading the container's configuration) shows it."""
    inspected = await desktop_json(host, sid)
    texts = [inspected, *strings(json.loads(inspected))]  # raw, and decoded (a newline is \n in JSON)
    assert [k for k, v in env.items() if any(v in t for t in texts)] == [], json.loads(inspected)[0]["Config"]["Env"]
    assert {k: (await delivered_env(host, sid)).get(k) for k in env} == env  # what the init started
    name = desktop_name(sid)
    for key, value in env.items():
        # Login shells read it too; a plain exec (the container's Env alone) does not.
        assert await adocker("exec", name, "sh", "-lc", f'printf %s "${key}"', host=host) == value
        assert await adocker("exec", name, "sh", "-c", f'printf %s "${{{key}-unset}}"', host=host) != value
        # Where the desktop's user runs (inside the user namespace under userns), too.
        assert await adocker("exec", name, "desktop-enter", "sh", "-lc", f'printf %s "${key}"', host=host) == value
    files = ("/etc/orchestrator", "/etc/orchestrator/session.env")
    # The desktop's root's only: as seen where its user runs (under userns, that root is the
    # range's first uid, which must read the file; from the sandbox it is that uid's).
    mode = await adocker("exec", name, "desktop-enter", "stat", "-c", "%a %U", *files, host=host)
    assert mode.splitlines() == ["700 root", "600 root"]


async def test_limits_beyond_the_sandbox_are_refused_with_422(client: Client, settings: Settings) -> None:
    with pytest.raises(Exception, match="422 resources_exceed_sandbox"):
        await client.create(resources={"cpus": settings.max_cpus + 1})
    assert await client.list() == []


async def test_preload_images_arrive_before_ready_with_their_event(
    client: Client, worker: SandboxWorker, docker_settings: Settings
) -> None:
    host = docker_settings.docker_host
    assert host
    record = await client.create(preload_images=[TEST_IMAGE])
    events = await client.wait_for(record.id, {"session.ready", "session.failed"}, timeout=READY)
    types = [e.type for e in events]
    assert types[-3:] == ["dockerd.ready", "images.loaded", "session.ready"], types
    loaded = events[-2].data["data"]
    assert loaded["images"] == [TEST_IMAGE] and loaded["bytes"] > 100_000 and loaded["seconds"] >= 0
    out = await adocker(
        "exec", desktop_name(record.id), "docker", "run", "--rm", TEST_IMAGE, "echo", "preloaded", host=host
    )
    assert out == "preloaded"

    missing = await client.create(preload_images=["orchestrator/none:missing"])
    events = await client.wait_for(missing.id, {"session.ready", "session.failed"}, timeout=READY)
    assert events[-1].type == "session.failed" and events[-1].data["data"]["code"] == "image_missing"


async def test_image_names_that_look_like_flags_are_refused(client: Client) -> None:
    for bad in ("--privileged", "../x", "a b", ""):
        with pytest.raises(Exception, match="400 invalid_request"):
            await client.create(preload_images=[bad])


@pytest.mark.parametrize("how", ["kill", "stop"])
async def test_a_desktop_stopped_from_outside_comes_back_with_its_data(
    client: Client, docker_settings: Settings, how: str
) -> None:
    """Policy: restart. Killed, Docker's restart policy brings it back; stopped (Docker then
    leaves it down), the reconciler starts it again. Either way desktop.health goes unhealthy,
    then healthy; the session stays ready; the inner images (on the volume) survive."""
    host = docker_settings.docker_host
    assert host
    settings = replace(docker_settings, health_interval_s=0.5, reconcile_interval_s=1.0)
    async with running_worker(settings) as worker:
        sid, events = await ready_session(client, env={"RESTART_SECRET": "kept-across-restarts"})
        before = (await delivered_env(host, sid)).get("RESTART_SECRET")
        await worker.runtime.images.copy_into(sid, [TEST_IMAGE])
        await worker.health.check()  # the first finding: healthy (no event for that)
        await adocker(how, desktop_name(sid), host=host)
        seen = await client.wait_for(sid, {"desktop.health"}, timeout=10, after=events[-1].id)
        assert seen[-1].data["data"]["status"] == "unhealthy", seen[-1].data
        back = await client.wait_for(sid, {"desktop.health"}, timeout=60, after=seen[-1].id)
        assert back[-1].data["data"]["status"] == "healthy", [e.data for e in back]
        types = [e.type for e in seen + back]
        assert "session.failed" not in types
        if how == "stop":
            assert "desktop.restarted" in types
        assert (await client.get(sid)).state == "ready"
        image = await adocker("exec", desktop_name(sid), "docker", "images", "-q", TEST_IMAGE, host=host)
        assert image, "the inner image did not survive the restart"
        # The env file is in the container's layer: the same container, restarted, reads it again.
        assert before == (await delivered_env(host, sid)).get("RESTART_SECRET") == "kept-across-restarts"


async def test_a_desktop_that_keeps_stopping_is_given_up_after_its_restart_budget(
    client: Client, docker_settings: Settings
) -> None:
    """The restart policy has a budget (MAX_RESTARTS in RESTART_WINDOW_S): a desktop stopped
    again after each of its restarts is restarted three times, then the session fails with
    desktop_lost and the desktop is removed (its volume kept for a stop and start)."""
    host = docker_settings.docker_host
    assert host
    settings = replace(docker_settings, health_interval_s=0.5, reconcile_interval_s=0.5)
    async with running_worker(settings):
        sid, events = await ready_session(client)
        last = events[-1].id
        for attempt in range(1, MAX_RESTARTS + 1):
            await adocker("stop", "-t", "1", desktop_name(sid), host=host)
            seen = await client.wait_for(sid, {"desktop.restarted", "session.failed"}, timeout=60, after=last)
            assert seen[-1].type == "desktop.restarted", [e.type for e in seen]
            assert seen[-1].data["data"]["attempt"] == attempt
            last = seen[-1].id
        await adocker("stop", "-t", "1", desktop_name(sid), host=host)
        seen = await client.wait_for(sid, {"desktop.restarted", "session.failed"}, timeout=60, after=last)
        assert seen[-1].type == "session.failed", [e.type for e in seen]
        assert seen[-1].data["data"]["code"] == "desktop_lost" and "kept stopping" in seen[-1].data["data"]["message"]
        assert await count_objects(host, sid) == (0, 1)  # desktop removed, volume kept
        # The volume is still there to resume from: stop, then start brings a new desktop.
        await client.stop(sid)
        stopped = await client.wait_for(sid, {"session.stopped"}, timeout=60, after=seen[-1].id)
        await client.start(sid)
        again = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=READY, after=stopped[-1].id)
        assert again[-1].type == "session.ready"
