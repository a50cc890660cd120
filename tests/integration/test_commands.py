"""The command stream (docs/jobs.md) as producers use it: `redis-cli` alone and a Node.js
program drive a real session through every op under the documented producer ACL; placement
keeps the caps; a consumer killed between reading and acting leaves the command to another,
which acts once; the same request id twice acts once and is answered twice; bad commands are
refused with precise codes; stale commands are refused ``overloaded``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from orchestrator.auth import token_entry
from orchestrator.commands import CommandConsumer, StreamLag, session_id_for
from orchestrator.config import Settings
from orchestrator.core import Core, connect
from orchestrator.exec_service import ExecService
from orchestrator.exec_store import ExecStore
from orchestrator.keys import Keys
from orchestrator.names import DEFAULT_TENANT
from orchestrator.sandboxes import SandboxRegistry
from orchestrator.schemas import SandboxInfo
from orchestrator.service import Sessions
from tests.conftest import awaited, free_port

from .conftest import ADMIN, PROJECT_ROOT, running_api, running_worker
from .test_redis_security import AclServer, documented_acl, running, sha256, start_server

READY_TIMEOUT = 120.0
NODE_PRODUCER = PROJECT_ROOT / "tests" / "node_producer"


# --- a producer that only speaks Redis: the redis-cli binary ----------------------------------


@dataclasses.dataclass(frozen=True)
class Producer:
    host: str
    port: int
    prefix: str
    user: str | None = None
    password: str | None = None

    def _run(self, *args: str) -> tuple[int, str]:
        auth = ["--user", self.user] if self.user else []
        env = {**os.environ, "REDISCLI_AUTH": self.password} if self.password else dict(os.environ)
        done = subprocess.run(
            ["redis-cli", "-h", self.host, "-p", str(self.port), *auth, "-e", "--json", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        return done.returncode, (done.stdout + done.stderr).strip()

    async def cli(self, *args: str) -> Any:
        """One command, off the event loop; its reply as JSON. Fails on an error reply."""
        code, out = await asyncio.to_thread(self._run, *args)
        assert code == 0, f"redis-cli {args[0]}: {out}"
        return json.loads(out)

    async def refused(self, *args: str) -> str:
        code, out = await asyncio.to_thread(self._run, *args)
        assert code != 0, f"redis-cli {' '.join(args)} was allowed: {out}"
        return out

    async def send(self, command: dict[str, Any] | str, entry_id: str = "*") -> str:
        raw = command if isinstance(command, str) else json.dumps(command)
        entry: str = await self.cli("XADD", f"{self.prefix}commands", entry_id, "command", raw)
        return entry

    async def events(self, after: str = "-") -> list[tuple[str, dict[str, Any]]]:
        start = after if after == "-" else f"({after}"
        reply = await self.cli("XRANGE", f"{self.prefix}events", start, "+")
        return [(entry_id, json.loads(dict(zip(f[::2], f[1::2], strict=True))["event"])) for entry_id, f in reply]

    async def wait_for(
        self, match: Callable[[dict[str, Any]], bool], *, count: int = 1, timeout: float = 30
    ) -> list[dict[str, Any]]:
        """The firehose's events ``match`` picks, once there are ``count`` of them."""
        found: list[dict[str, Any]] = []
        last = "-"
        try:
            async with asyncio.timeout(timeout):
                while len(found) < count:
                    batch = await self.events(last)
                    if batch:
                        last = batch[-1][0]
                        found += [e for _, e in batch if match(e)]
                    else:
                        await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"{len(found)} of {count} events came within {timeout} s: {found}") from None
        return found

    async def answer(self, request_id: str, *, count: int = 1, timeout: float = 30) -> list[dict[str, Any]]:
        """The ``command.*`` answers to ``request_id``: their data."""
        events = await self.wait_for(
            lambda e: e["type"].startswith("command.") and e["data"].get("request_id") == request_id,
            count=count,
            timeout=timeout,
        )
        return [e["data"] | {"type": e["type"]} for e in events]

    async def follow(self, request_id: str, types: set[str], timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        events = await self.wait_for(
            lambda e: e["type"] in types and e["data"].get("request_id") == request_id, timeout=timeout
        )
        return events[0]


def producer_for(settings: Settings) -> Producer:
    url = httpx.URL(settings.redis_url)
    return Producer(url.host or "127.0.0.1", url.port or 6379, settings.key_prefix)


@pytest.fixture(autouse=True)
def _redis_cli() -> None:
    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli is missing (scripts/env.sh installs redis-tools)")


# --- the documented ACL, on a Redis server of this module's own ------------------------------


@pytest.fixture(scope="module")
def acl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    workdir = tmp_path_factory.mktemp("redis-acl-commands")
    server = AclServer(port=free_port())
    lines = [
        line.replace("API_PASSWORD_SHA256", sha256(server.api_password))
        .replace("WORKER_PASSWORD_SHA256", sha256(server.worker_password))
        .replace("PRODUCER_PASSWORD_SHA256", sha256(server.producer_password))
        for line in documented_acl()
    ]
    lines.append(f"user test-admin on #{sha256(server.admin_password)} ~* &* +@all")
    (workdir / "users.acl").write_text("\n".join(lines) + "\n")
    with running(start_server(workdir, "--aclfile", str(workdir / "users.acl"), port=server.port)):
        yield server


@contextlib.asynccontextmanager
async def acl_stack(acl: AclServer, docker_settings: Settings) -> AsyncIterator[Producer]:
    """The API and a real worker, each as its documented ACL user (the documented prefix),
    and a producer as its own."""
    with contextlib.closing(acl.admin()) as admin:
        admin.flushall()
        admin.acl_log_reset()
    base = dataclasses.replace(docker_settings, key_prefix="orchestrator:")
    api = dataclasses.replace(base, redis_url=acl.url("orchestrator-api", acl.api_password))
    worker = dataclasses.replace(base, redis_url=acl.url("orchestrator-worker", acl.worker_password))
    async with running_api(api) as url, running_worker(worker):
        yield Producer("127.0.0.1", acl.port, "orchestrator:", "orchestrator-producer", acl.producer_password)
        async with httpx.AsyncClient(base_url=url, headers=ADMIN) as http:  # the lag, as the API's user reads it
            assert "orchestrator_command_lag" in (await http.get("/metrics")).text
    with contextlib.closing(acl.admin()) as admin:
        entries: list[dict[str, Any]] = admin.acl_log(count=100)  # type: ignore[assignment]
    # Neither the API nor the worker was refused anything (the producer's refusals are the test's).
    assert [e for e in entries if e["username"] != "orchestrator-producer"] == []


async def test_redis_cli_alone_drives_a_session_through_every_op_under_the_producer_acl(
    acl: AclServer, docker_settings: Settings
) -> None:
    async with acl_stack(acl, docker_settings) as producer:
        await producer.send({"op": "create", "request_id": "rt-create", "labels": {"producer": "redis-cli"}})
        [created] = await producer.answer("rt-create")
        assert created["type"] == "command.accepted" and created["new"] is True, created
        session = created["session"]
        assert session == session_id_for(DEFAULT_TENANT, "rt-create")
        ready = await producer.follow("rt-create", {"session.ready", "session.failed"})
        assert ready["type"] == "session.ready" and ready["session"] == session, ready
        # Every event of the bring-up carries the request id: the API's and the worker's alike.
        bring_up = [e for _, e in await producer.events() if e.get("session") == session]
        assert {"session.pending", "session.creating", "dockerd.ready", "session.ready"} <= {
            e["type"] for e in bring_up
        }
        assert {e["data"].get("request_id") for e in bring_up} == {"rt-create"}, bring_up

        await producer.send({"op": "exec", "request_id": "rt-exec", "session": session, "shell": "echo hi; exit 5"})
        [run] = await producer.answer("rt-exec")
        exited = await producer.follow("rt-exec", {"exec.exited"}, timeout=60)
        assert exited["data"]["exit_code"] == 5
        output = await producer.cli("XRANGE", f"orchestrator:exec-output:{run['exec']}", "-", "+")
        assert ["s", "stdout", "d", "hi\n"] in [fields for _, fields in output], output

        for op, state in (("stop", "session.stopped"), ("start", "session.ready"), ("delete", "session.deleted")):
            await producer.send({"op": op, "request_id": f"rt-{op}", "session": session})
            [answer] = await producer.answer(f"rt-{op}")
            assert answer["type"] == "command.accepted" and answer["session"] == session, answer
            reached = await producer.follow(f"rt-{op}", {state, "session.failed"})
            assert reached["type"] == state, reached

        # All through the stream, which holds nothing once handled.
        with contextlib.closing(acl.admin()) as admin:
            assert admin.xlen("orchestrator:commands") == 0
        # And nothing else: no administration, no records, no sandbox's queue, no forged events.
        for command in (
            ("FLUSHALL",),
            ("GET", f"orchestrator:session:{session}"),
            ("SMEMBERS", "orchestrator:sessions"),
            ("ZADD", "orchestrator:queue:" + docker_settings.sandbox_id, "1", "create_session:x:1"),
            ("SET", "arq:job:create_session:x:1", "{}"),
            ("XADD", "orchestrator:exec-jobs:" + docker_settings.sandbox_id, "*", "job", "{}"),
            ("XADD", "orchestrator:events", "*", "event", "{}"),
            ("XRANGE", "orchestrator:commands", "-", "+"),
            ("XREADGROUP", "GROUP", "control", "p", "STREAMS", "orchestrator:commands", ">"),
            ("XADD", "orchestrator:commands:other", "*", "command", "{}"),
            ("KEYS", "*"),
        ):
            assert "NOPERM" in await producer.refused(*command)


def npm_install(target: Path) -> None:
    """The Node producer with its one dependency, installed from the npm registry."""
    for name in ("package.json", "producer.mjs"):
        shutil.copy(NODE_PRODUCER / name, target / name)
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=target,
        check=True,
        capture_output=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def node_producer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed (scripts/env.sh installs nodejs and npm)")
    target = tmp_path_factory.mktemp("node-producer")
    try:
        npm_install(target)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"npm install failed: {e.stderr.decode(errors='replace')}")
    return target / "producer.mjs"


async def test_a_node_producer_drives_a_session_through_every_op(
    acl: AclServer, docker_settings: Settings, node_producer: Path
) -> None:
    async with acl_stack(acl, docker_settings):
        env = {
            **os.environ,
            "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": str(acl.port),
            "REDIS_USER": "orchestrator-producer",
            "REDIS_PASSWORD": acl.producer_password,
            "PREFIX": "orchestrator:",
            "TIMEOUT_MS": str(int(READY_TIMEOUT * 1000)),
        }
        proc = await asyncio.create_subprocess_exec(
            "node", str(node_producer), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), READY_TIMEOUT + 30)
        assert proc.returncode == 0, err.decode()
        seen = json.loads(out.decode().strip().splitlines()[-1])
        assert seen["create"]["new"] is True and seen["ready"] == "session.ready", seen
        assert (seen["exit_code"], seen["stdout"]) == (3, "from-node\n"), seen
        assert (seen["stop"], seen["start"], seen["delete"]) == ("session.stopped", "session.ready", "session.deleted")


# --- without desktops: the API's consumer, or consumers of the test's own ------------------


def beat(capacity: int, sandbox: str) -> SandboxInfo:
    return SandboxInfo(
        id=sandbox,
        depth=1,
        version="0.1.0",
        hostname="h",
        sessions=0,
        capacity=capacity,
        load=0.0,
        free_disk_bytes=0,
        privilege="caps",
        ts="2026-01-01T00:00:00.000Z",
        max_cpus=4.0,
        max_memory_mb=4096,
        max_pids=4096,
        lost_after_s=120.0,
    )


async def test_thirty_creates_on_three_sandboxes_of_ten_land_ten_each_and_the_31st_is_refused(
    settings: Settings, redis: aioredis.Redis
) -> None:
    keys = Keys(settings.key_prefix)
    registry = SandboxRegistry(redis, keys)
    boxes = [f"{settings.sandbox_id}-{n}" for n in range(3)]
    for box in boxes:  # heartbeats only: nothing starts a desktop
        assert await registry.mark_alive(box, 120.0)
        assert await registry.beat(beat(10, box))
    producer = producer_for(settings)
    async with running_api(settings):
        for n in range(31):
            await producer.send({"op": "create", "request_id": f"place-{n:02}"})
        answers = {}
        for n in range(31):
            [answers[n]] = await producer.answer(f"place-{n:02}")
    assert [a["type"] for a in answers.values()] == ["command.accepted"] * 30 + ["command.rejected"]
    assert answers[30]["code"] == "no_capacity", answers[30]
    placed = [a["sandbox"] for a in list(answers.values())[:30]]
    assert sorted(placed.count(b) for b in boxes) == [10, 10, 10], placed
    # Each create job sits on the queue of the sandbox its record names.
    for box in boxes:
        jobs = [j.decode() for j in await redis.zrange(keys.queue(box), 0, -1)]
        mine = [a["session"] for a in answers.values() if a.get("sandbox") == box]
        assert sorted(jobs) == sorted(f"create_session:{session}:1" for session in mine)
    assert await awaited(redis.scard(keys.session_index)) == 30


async def test_the_same_request_id_twice_acts_once_and_is_answered_twice(
    settings: Settings, redis: aioredis.Redis
) -> None:
    keys = Keys(settings.key_prefix)
    producer = producer_for(settings)
    async with running_api(settings):
        for _ in range(2):
            await producer.send({"op": "create", "request_id": "twice", "labels": {"a": "b"}})
        first, second = await producer.answer("twice", count=2)
        session = session_id_for(DEFAULT_TENANT, "twice")
        assert (first["type"], first["session"], first["new"], first["duplicate"]) == (
            "command.accepted",
            session,
            True,
            False,
        )
        assert (second["type"], second["session"], second["duplicate"]) == ("command.accepted", session, True)
        for _ in range(2):
            await producer.send({"op": "stop", "request_id": "stop-twice", "session": session})
        stops = await producer.answer("stop-twice", count=2)
        # A pending session cannot stop: refused twice (a refused command did nothing, and is
        # tried again when sent again), with the HTTP API's code.
        assert [(s["type"], s["code"]) for s in stops] == [("command.rejected", "invalid_state")] * 2
    assert await awaited(redis.smembers(keys.session_index)) == {session.encode()}
    assert await redis.zrange(keys.queue(settings.sandbox_id), 0, -1) == [f"create_session:{session}:1".encode()]
    pending = [e for _, e in await producer.events() if e["type"] == "session.pending"]
    assert len(pending) == 1 and pending[0]["data"]["request_id"] == "twice"


async def test_a_warm_desktop_serves_a_create_command_and_a_retry_after_a_crash_finds_it(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """A create without ``session`` takes a warm desktop, as an HTTP create without an id does;
    its answer lost (the API died before recording it: the done key gone), the same request
    id again finds that session instead of making a second."""
    keys = Keys(settings.key_prefix)
    registry = SandboxRegistry(redis, keys)
    box = f"{settings.sandbox_id}-w"
    assert await registry.mark_alive(box, 120.0)
    assert await registry.beat(beat(10, box))
    await awaited(redis.rpush(keys.pool(box), "w-warm-0", "w-warm-1"))
    producer = producer_for(settings)
    async with running_api(settings):
        await producer.send({"op": "create", "request_id": "warm-1"})
        [first] = await producer.answer("warm-1")
        assert (first["type"], first["session"], first["new"]) == ("command.accepted", "w-warm-0", True)
        await redis.delete(keys.command_done(DEFAULT_TENANT, "warm-1"))
        await producer.send({"op": "create", "request_id": "warm-1"})
        again = (await producer.answer("warm-1", count=2))[-1]
        assert (again["type"], again["session"], again["new"]) == ("command.accepted", "w-warm-0", False)
    assert await awaited(redis.smembers(keys.session_index)) == {b"w-warm-0"}
    assert await awaited(redis.lrange(keys.pool(box), 0, -1)) == [b"w-warm-1"]
    ready = [e for _, e in await producer.events() if e["type"] == "session.ready"]
    assert [(e["session"], e["data"]["warm"], e["data"]["request_id"]) for e in ready] == [("w-warm-0", True, "warm-1")]


async def test_bad_commands_are_refused_with_precise_codes_and_the_consumer_keeps_serving(
    settings: Settings, redis: aioredis.Redis
) -> None:
    keys = Keys(settings.key_prefix)
    producer = producer_for(settings)
    bad: list[tuple[dict[str, Any] | str, str | None, str]] = [
        ("{not json", None, "invalid_json"),
        ('["create"]', None, "invalid_request"),
        ({"op": "resize", "request_id": "b-op", "session": "abc"}, "b-op", "unknown_op"),
        ({"request_id": "b-noop"}, "b-noop", "invalid_request"),
        ({"op": "stop", "request_id": "b-id", "session": "BAD!"}, "b-id", "invalid_session_id"),
        ({"op": "create", "request_id": "b-id2", "session": "-x"}, "b-id2", "invalid_session_id"),
        ({"op": "stop", "request_id": "bad request id", "session": "abc"}, "bad request id", "invalid_request_id"),
        ({"op": "create", "request_id": "b-spec", "resources": {"memory_mb": 1}}, "b-spec", "invalid_request"),
        ({"op": "create", "request_id": "b-field", "colour": "red"}, "b-field", "invalid_request"),
        ({"op": "create", "request_id": "b-specid", "id": "abc"}, "b-specid", "invalid_request"),
        ({"op": "create", "request_id": "b-box", "sandbox": "nowhere"}, "b-box", "unknown_sandbox"),
        ({"op": "delete", "request_id": "b-none", "session": "no-such"}, "b-none", "session_not_found"),
        ({"op": "exec", "request_id": "b-exec", "session": "no-such", "cmd": []}, "b-exec", "invalid_request"),
        (json.dumps({"op": "create", "request_id": "b-big", "labels": {"k": "v" * 70_000}}), None, "command_too_large"),
    ]
    async with running_api(settings):
        # A heartbeat, so that placement (not the default sandbox's queue) decides.
        registry = SandboxRegistry(redis, keys)
        assert await registry.mark_alive(settings.sandbox_id, 120.0)
        assert await registry.beat(beat(10, settings.sandbox_id))
        for command, _, _ in bad:
            await producer.send(command)
        await producer.send({"op": "create", "request_id": "good"})  # after all of them
        [good] = await producer.answer("good")
        rejected = [e["data"] for _, e in await producer.events() if e["type"] == "command.rejected"]
    assert good["type"] == "command.accepted", good
    assert [(r["request_id"], r["code"]) for r in rejected] == [(rid, code) for _, rid, code in bad], rejected
    assert all(r["message"] for r in rejected)
    assert {r["field"] for r in rejected if r["request_id"] == "b-spec"} == {"resources"}
    # Nothing but the good one was made, and the stream holds nothing.
    assert await awaited(redis.smembers(keys.session_index)) == {good["session"].encode()}
    assert await redis.xlen(keys.commands()) == 0


async def test_a_tenants_stream_makes_its_sessions_within_its_quota_and_sees_no_other(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """``commands:<tenant>``: its sessions are the tenant's, counted in its quota; another
    tenant's session is as unknown to it as over HTTP."""
    keys = Keys(settings.key_prefix)
    tokens = ";".join([settings.tokens, token_entry("acme", "acme-token", ["sessions:write"], "acme")])
    stack = dataclasses.replace(settings, tokens=tokens, tenant_max_sessions=1)
    default = acme = producer_for(settings)  # (the tenant is the stream: no ACL here)
    acme_stream = keys.commands("acme")
    async with running_api(stack):
        await default.send({"op": "create", "request_id": "theirs"})
        [theirs] = await default.answer("theirs")
        for rid in ("a-1", "a-2"):
            await acme.cli("XADD", acme_stream, "*", "command", json.dumps({"op": "create", "request_id": rid}))
        await acme.cli(
            "XADD",
            acme_stream,
            "*",
            "command",
            json.dumps({"op": "stop", "request_id": "a-3", "session": theirs["session"]}),
        )
        # The answers are on the one firehose, with their tenant.
        first, second, third = [(await default.answer(rid))[0] for rid in ("a-1", "a-2", "a-3")]
    assert first["type"] == "command.accepted" and first["session"] == session_id_for("acme", "a-1")
    assert (second["type"], second["code"]) == ("command.rejected", "quota_exceeded")
    assert (third["type"], third["code"]) == ("command.rejected", "session_not_found")
    record = json.loads(await redis.get(keys.session(first["session"])) or b"{}")
    assert record["tenant"] == "acme" and record["request_id"] == "a-1"
    answers = [e for _, e in await default.events() if e["type"].startswith("command.")]
    assert {e["tenant"] for e in answers if e["data"]["request_id"].startswith("a-")} == {"acme"}


async def test_a_stale_command_is_refused_overloaded(settings: Settings, redis: aioredis.Redis) -> None:
    """Producers outran the control side: a command older than ORCH_COMMAND_DEADLINE when read
    is not acted on (its entry id says when it was added, by Redis's clock)."""
    producer = producer_for(settings)
    seconds, _ = await redis.time()
    async with running_api(dataclasses.replace(settings, command_deadline_s=2.0)) as url:
        # As if it had waited 10 s behind others.
        await producer.send({"op": "create", "request_id": "stale"}, entry_id=f"{(seconds - 10) * 1000}-0")
        [stale] = await producer.answer("stale")
        await producer.send({"op": "create", "request_id": "fresh"})
        [fresh] = await producer.answer("fresh")
        async with httpx.AsyncClient(base_url=url, headers=ADMIN) as http:
            metrics = (await http.get("/metrics")).text
    assert (stale["type"], stale["code"]) == ("command.rejected", "overloaded"), stale
    assert fresh["type"] == "command.accepted"
    assert await awaited(redis.smembers(Keys(settings.key_prefix).session_index)) == {fresh["session"].encode()}
    assert 'orchestrator_command_lag{tenant="default"} 0.0' in metrics
    assert 'orchestrator_command_pending{tenant="default"} 0.0' in metrics


# --- consumers killed midway -------------------------------------------------------------


@contextlib.asynccontextmanager
async def consumer(
    settings: Settings,
    name: str,
    fault: Callable[[str], Awaitable[None]] | None = None,
    deadline_s: float = 300.0,
    forget_after_s: float = 3600.0,
) -> AsyncIterator[tuple[CommandConsumer, Core]]:
    core = connect(settings)
    sessions = Sessions(core.store, core.queue, core.sandboxes, settings)
    execs = ExecService(ExecStore(core.redis, core.keys, keep_s=60), sessions, settings)
    made = CommandConsumer(
        core.redis,
        core.keys,
        core.bus,
        execs,
        tenants=frozenset(),
        consumer=name,
        claim_idle_s=0.5,
        deadline_s=deadline_s,
        forget_after_s=forget_after_s,
        fault=fault,
    )
    try:
        yield made, core
    finally:
        await core.aclose()


@pytest.mark.parametrize("point", ["read", "acted"])
async def test_a_consumer_killed_midway_leaves_the_command_to_another_which_acts_once(
    settings: Settings, redis: aioredis.Redis, point: str
) -> None:
    """Killed after reading (nothing done) or after acting (before answering and acknowledging):
    either way another consumer claims the entry, and one session is made and announced."""
    keys = Keys(settings.key_prefix)
    producer = producer_for(settings)
    stopped = asyncio.Event()

    async def die_at(where: str) -> None:
        if where == point:
            stopped.set()
            await asyncio.Event().wait()  # until killed (cancelled): never acknowledges

    async with consumer(settings, "doomed", die_at) as (doomed, _):
        task = asyncio.create_task(doomed.run())
        await producer.send({"op": "create", "request_id": f"killed-{point}"})
        async with asyncio.timeout(10):
            await stopped.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert await redis.xpending(keys.commands(), "control") is not None
    made_before = await awaited(redis.scard(keys.session_index))
    assert made_before == (1 if point == "acted" else 0)

    # A deadline shorter than the claim's wait: a claimed command is acted on whatever its age.
    async with consumer(settings, "heir", deadline_s=0.2) as (heir, _):
        task = asyncio.create_task(heir.run())
        try:
            [answer] = await producer.answer(f"killed-{point}", timeout=20)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    session = session_id_for(DEFAULT_TENANT, f"killed-{point}")
    assert (answer["type"], answer["session"], answer["new"]) == ("command.accepted", session, point == "read")
    assert await awaited(redis.smembers(keys.session_index)) == {session.encode()}
    assert await redis.zrange(keys.queue(settings.sandbox_id), 0, -1) == [f"create_session:{session}:1".encode()]
    assert len([e for _, e in await producer.events() if e["type"] == "session.pending"]) == 1
    assert len(await producer.answer(f"killed-{point}")) == 1  # answered once
    assert (await redis.xpending(keys.commands(), "control"))["pending"] == 0
    assert await redis.xlen(keys.commands()) == 0


async def test_the_lag_counts_what_waits_and_what_a_dead_consumer_holds(
    settings: Settings, redis: aioredis.Redis
) -> None:
    producer = producer_for(settings)
    async with consumer(settings, "idle") as (idle, _):
        await idle._ensure_groups()
        for n in range(3):
            await producer.send({"op": "create", "request_id": f"lag-{n}"})
        assert (await idle.lag())[DEFAULT_TENANT] == StreamLag(lag=3, pending=0)
        await redis.xreadgroup("control", "dead", {Keys(settings.key_prefix).commands(): ">"}, count=1)
        assert (await idle.lag())[DEFAULT_TENANT] == StreamLag(lag=2, pending=1)


async def test_consumers_of_gone_processes_are_forgotten_unless_they_hold_commands(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """Each API process reads as its own consumer: without pruning, every restart would leave
    one in the group for ever. One holding an unacknowledged command is kept (deleting it would
    drop the command's pending entry before anyone claims it)."""
    stream = Keys(settings.key_prefix).commands()
    producer = producer_for(settings)
    async with consumer(settings, "pruner", forget_after_s=0.0) as (pruner, _):
        await pruner._ensure_groups()
        for n in range(3):
            await producer.send({"op": "create", "request_id": f"held-{n}"})
        [[_, [(done, _)]]] = await redis.xreadgroup("control", "gone", {stream: ">"}, count=1)
        await redis.xack(stream, "control", done)  # handled: holds none
        await redis.xreadgroup("control", "holder", {stream: ">"}, count=1)
        await redis.xreadgroup("control", "pruner", {stream: ">"}, count=1)

        def names(listed: list[dict[str, Any]]) -> set[str]:
            return {c["name"].decode() for c in listed}

        assert names(await redis.xinfo_consumers(stream, "control")) == {"gone", "holder", "pruner"}
        await pruner._forget_consumers(stream)
        assert names(await redis.xinfo_consumers(stream, "control")) == {"holder", "pruner"}
