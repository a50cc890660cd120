"""Redis security on real servers started here from the redis-server binary: the ACL users of
docs/redis.md (loaded from the document itself), TLS with a CA of our own, and Sentinel, all
reached through orchestrator.redis_conn like the API and the workers reach them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import functools
import hashlib
import inspect
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
import pytest
import redis
from arq.worker import func
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from orchestrator.auth import hash_token
from orchestrator.config import Settings
from orchestrator.events import EventBus, make_event
from orchestrator.exec_store import ExecStore
from orchestrator.exec_types import ExecJob, ExecRecord, ExecState, OutputStream
from orchestrator.keys import Keys
from orchestrator.locks import SessionLocks
from orchestrator.queue import JobQueue, Operation, wake
from orchestrator.redis_conn import redacted_url, redis_client
from orchestrator.sandboxes import SandboxRegistry
from orchestrator.schemas import DrainRequest, SandboxInfo
from orchestrator.states import SandboxStatus, SessionState
from orchestrator.store import SessionStore
from tests.conftest import awaited, free_port
from tests.integration.conftest import ADMIN, TOKENS, running_api
from workers.jobs import ResilientWorker
from workers.uid_ranges import RedisSlotLedger

DOC = Path(__file__).resolve().parents[2] / "docs" / "redis.md"
PREFIX = "orchestrator:"
SERVER = shutil.which("redis-server")


# --- servers -------------------------------------------------------------------------------


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _answers(port: int, tls: ssl.SSLContext | None) -> bool:
    """Whether something on ``port`` answers PING like a Redis (NOAUTH counts: it is up)."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw,
            tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else contextlib.nullcontext(raw) as conn,
        ):
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def start_server(workdir: Path, *args: str, port: int | None = None, tls: ssl.SSLContext | None = None) -> Server:
    """A redis-server (or, with --sentinel in args, a sentinel) on loopback, polled until it
    answers (over TLS with the client context ``tls``, if given)."""
    if SERVER is None:
        pytest.fail("redis-server is not installed: run `make test` (scripts/env.sh installs it)")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "server.log"
    command = [SERVER, *args]
    if "--sentinel" not in args:
        command += ["--bind", "127.0.0.1", "--dir", str(workdir), "--save", "", "--appendonly", "no"]
        command += ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, port, log)
    deadline = time.monotonic() + 10
    while not _answers(port, tls):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{' '.join(command)} did not start (exit {proc.poll()}):\n{log.read_text()}")
        time.sleep(0.02)
    return server


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


def settings_for(url: str, **fields: Any) -> Settings:
    return Settings(redis_url=url, key_prefix=PREFIX, sandbox_id="sec", **fields)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- ACL -----------------------------------------------------------------------------------


def documented_acl() -> list[str]:
    """The ACL lines of docs/redis.md: its one ```acl block."""
    blocks = re.findall(r"^```acl\n(.*?)^```", DOC.read_text(), re.S | re.M)
    assert len(blocks) == 1, f"{DOC} must hold exactly one ```acl block, found {len(blocks)}"
    lines = [line for line in blocks[0].splitlines() if line.strip()]
    assert lines and all(line.startswith("user ") for line in lines), lines
    return lines


@dataclasses.dataclass
class AclServer:
    port: int
    # Passwords with characters that must be percent-encoded in a URL.
    api_password: str = dataclasses.field(default_factory=lambda: "a@p:i/" + secrets.token_hex(8))
    worker_password: str = dataclasses.field(default_factory=lambda: "w%o@r#k" + secrets.token_hex(8))
    admin_password: str = dataclasses.field(default_factory=lambda: secrets.token_hex(16))
    producer_password: str = dataclasses.field(default_factory=lambda: "p:r@d" + secrets.token_hex(8))

    def url(self, user: str, password: str) -> str:
        return f"redis://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}/0"

    @property
    def api(self) -> Settings:
        return settings_for(self.url("orchestrator-api", self.api_password))

    @property
    def worker(self) -> Settings:
        return settings_for(self.url("orchestrator-worker", self.worker_password))

    def admin(self) -> redis.Redis:
        return redis.Redis(port=self.port, username="test-admin", password=self.admin_password)


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    workdir = tmp_path_factory.mktemp("redis-acl")
    acl = AclServer(port=free_port())
    lines = [
        line.replace("API_PASSWORD_SHA256", sha256(acl.api_password))
        .replace("WORKER_PASSWORD_SHA256", sha256(acl.worker_password))
        .replace("PRODUCER_PASSWORD_SHA256", sha256(acl.producer_password))
        for line in documented_acl()
    ]
    # Test-only: a user to read ACL LOG with (the documented block has no administrator).
    lines.append(f"user test-admin on #{sha256(acl.admin_password)} ~* &* +@all")
    (workdir / "users.acl").write_text("\n".join(lines) + "\n")
    with running(start_server(workdir, "--aclfile", str(workdir / "users.acl"), port=acl.port)):
        yield acl


def denials(acl: AclServer) -> list[str]:
    """ACL LOG, as 'reason object' strings, without redis-py's ignored CLIENT SETINFO (Redis >= 7.2)."""
    with contextlib.closing(acl.admin()) as admin:
        entries: list[dict[str, Any]] = admin.acl_log(count=1000)  # type: ignore[assignment]
    found = [f"{e['reason']} {e['object']} ({e['username']})" for e in entries]
    return [d for d in found if "setinfo" not in d]


async def test_documented_acl_lets_api_and_worker_do_their_work(acl_server: AclServer) -> None:
    with contextlib.closing(acl_server.admin()) as admin:
        admin.acl_log_reset()
    keys = Keys(PREFIX)
    worker_redis = redis_client(acl_server.worker)
    api_redis = redis_client(acl_server.api)
    try:
        for client in (worker_redis, api_redis):
            assert await client.ping()
        # Records, indexes, the pool list, leases: plain commands and a transaction.
        assert await worker_redis.set(keys.sandbox("sec"), b"{}", ex=30)
        async with worker_redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.session("s1"), b"record")
            pipe.sadd(keys.session_index, "s1")
            await pipe.execute()
        assert await api_redis.get(keys.session("s1")) == b"record"
        assert await api_redis.mget([keys.session("s1"), keys.sandbox("sec")]) == [b"record", b"{}"]
        assert await awaited(api_redis.smembers(keys.session_index)) == {b"s1"}
        await awaited(worker_redis.rpush(keys.pool("sec"), "w1", "w2"))
        assert await awaited(worker_redis.lrange(keys.pool("sec"), 0, -1)) == [b"w1", b"w2"]
        # Placement reads the first warm desktop before it claims it.
        # (redis-py annotates LINDEX as str | None; without decode_responses it is bytes.)
        first: object = await awaited(api_redis.lindex(keys.pool("sec"), 0))
        assert first == b"w1"
        assert await awaited(worker_redis.lrem(keys.pool("sec"), 1, "w2")) == 1
        # The commands the API's and the worker's Lua scripts use, run by EVALSHA as they are.
        script = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], 60)
redis.call('SADD', KEYS[2], ARGV[1])
local placed = redis.call('SCARD', KEYS[2])
redis.call('SREM', KEYS[2], ARGV[1])
local warm = redis.call('LLEN', KEYS[3])
local claimed = redis.call('LPOP', KEYS[3])
local id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', 100, '*', 'event', ARGV[1])
local exists = redis.call('EXISTS', KEYS[1])
redis.call('DEL', KEYS[1])
return {placed, warm, claimed, exists, redis.call('GET', KEYS[1]) or ''}
"""
        script_keys = [keys.session("s-script"), keys.placed("sec"), keys.pool("sec"), keys.session_events("s0")]
        for client in (api_redis, worker_redis):
            await awaited(worker_redis.rpush(keys.pool("sec"), "w3"))
            result = await client.register_script(script)(keys=script_keys, args=["x"])
            assert result[:4] == [1, 2, b"w1" if client is api_redis else b"w3", 1], result
        # Events: the publish script, then XREAD / XRANGE / XREVRANGE as SSE and the hub read.
        for client in (worker_redis, api_redis):
            bus = EventBus(client, keys)
            entry = await bus.publish(make_event("security.test", sandbox="sec", session="s1"))
            assert await bus.last_id(keys.session_events("s1")) == entry
            assert [i for i, _ in await bus.read(keys.firehose, "0-0", count=100)][-1] == entry
        # Leases: SET NX PX, the renew script (PEXPIRE) and the release script (DEL). The lease is
        # 1 s: held past that, under the token it was taken with, only if the renewals worked.
        locks = SessionLocks(worker_redis, keys, lease_s=1.0, owner="sec-worker")
        async with locks.hold("s1", "test"):
            token = await worker_redis.get(keys.lock("s1"))
            assert token is not None
            await asyncio.sleep(1.3)  # the lease's own 1 s and then some: three renewals (lease / 3)
            assert await worker_redis.get(keys.lock("s1")) == token
        assert await locks.holder("s1") is None

        # The sandbox protocol's scripts: a worker beats and leaves, the API retires its
        # sandbox, and a later beat is refused.
        worker_registry, api_registry = SandboxRegistry(worker_redis, keys), SandboxRegistry(api_redis, keys)
        left = SandboxInfo(
            id="gone", depth=1, version="0", hostname="h", sessions=0, capacity=1, load=0.0,
            free_disk_bytes=0, privilege="caps", ts="2026-01-01T00:00:00.000Z", status=SandboxStatus.DRAINED,
        )  # fmt: skip
        assert await worker_registry.mark_alive("gone", 60.0)
        assert await worker_registry.beat(left)
        assert await api_registry.request_drain("gone", DrainRequest())
        assert await api_registry.declare_lost("gone", left.ts)
        assert await api_registry.known("gone") and await api_registry.retire("gone")
        await api_registry.forget_placed("gone")
        assert not await worker_registry.mark_alive("gone", 60.0)
        assert not await worker_registry.beat(left)

        # The machine's uid range ledger (workers/uid_ranges.py): claim, record, sweep, release.
        ledger = RedisSlotLedger(worker_redis, keys, sandbox_id="sec", machine="sec-machine")
        assert await ledger.claim("u1", {"u0": 0}) == 1
        assert await ledger.record({"u0": 0}) == ([], ["u0"])

        async def volumes() -> dict[str, int]:
            return {"u1": 1}

        assert await ledger.sweep(volumes, now=time.time() + 3600, grace_s=60) == ["u0"]
        await ledger.release("u1")

        # Execs (orchestrator/exec_store.py): the API submits and follows, the worker runs.
        api_execs, worker_execs = ExecStore(api_redis, keys, keep_s=60), ExecStore(worker_redis, keys, keep_s=60)
        await worker_execs.ensure_group("sec")
        queued = ExecRecord(
            id="x" + "1" * 20, session="s1", sandbox="sec", state=ExecState.QUEUED, by="t", created_at=time.time(),
            timeout_s=30, max_output_bytes=100,
        )  # fmt: skip
        job = ExecJob(
            id=queued.id, session="s1", argv=["true"], env={}, cwd=None, user=None, stdin_base64="", timeout_s=30,
            max_output_bytes=100,
        )  # fmt: skip
        await api_execs.submit(queued, job, "sec", per_session=4)
        [(entry_id, _)] = await worker_execs.next_jobs("sec", "w1", 10, 100)
        assert await worker_execs.claim_abandoned("sec", "w1", 0) != []
        running = await worker_execs.start(queued.id, "w1", time.time())
        assert running is not None
        await worker_execs.append(queued.id, [(OutputStream.STDOUT, b"hi")])
        assert await worker_execs.renew([queued.id], "w1") == 1
        await api_execs.request_kill(running)
        position = await worker_execs.control_position("sec")
        assert (await worker_execs.kill_requests("sec", "0-0", 100))[1] == [queued.id] and position != "0-0"
        assert (await api_execs.settle(queued.id)) == running  # its lease is held
        assert await worker_execs.finish(msgspec.structs.replace(running, state=ExecState.EXITED, exit_code=0))
        await worker_execs.done_with("sec", entry_id)
        assert len(await api_execs.read_output(queued.id, "0-0", block_ms=None)) == 2  # the chunk, the end

        # The command stream (orchestrator/commands.py): the API processes' consumer group.
        await api_redis.xgroup_create(keys.commands(), "control", id="0", mkstream=True)
        entry = await api_redis.xadd(keys.commands(), {"command": "{}"})
        assert await api_redis.xreadgroup("control", "api-1", {keys.commands(): ">"}, count=1)
        await api_redis.xautoclaim(keys.commands(), "control", "api-2", min_idle_time=0, start_id="0-0")
        await api_redis.xinfo_consumers(keys.commands(), "control")
        await api_redis.xgroup_delconsumer(keys.commands(), "control", "api-2")
        await api_redis.xack(keys.commands(), "control", entry)
        await api_redis.xdel(keys.commands(), entry)
        await api_redis.set(keys.command_done("default", "r1"), "{}", ex=60)

        # Jobs: the API enqueues (once), the worker's arq consumer runs it and keeps the result.
        ran: list[dict[str, Any]] = []

        async def create_session(ctx: dict[str, Any], **kwargs: Any) -> str:
            ran.append(kwargs)
            return "ok"

        # (A valid session id: the worker screens out jobs whose arguments the function refuses.)
        # Jobs travel on the same client as everything else (arq takes our pool).
        queue = JobQueue(api_redis, keys)
        assert await queue.enqueue(Operation.CREATE, "sec", "job-s1", 1)
        assert not await queue.enqueue(Operation.CREATE, "sec", "job-s1", 1)
        # The enqueue woke the queue's worker (LPUSH, LTRIM, PEXPIRE), which waits in BLPOP; the
        # worker's reconciler enqueues, and so wakes, too.
        woken = await awaited(worker_redis.blpop([keys.queue_wake("sec")], timeout=1))
        assert list(woken) == [keys.queue_wake("sec").encode(), b"1"]
        await wake(worker_redis, keys.queue("sec"))
        worker = ResilientWorker(
            functions=[func(create_session, name=Operation.CREATE.value)],
            redis_pool=worker_redis,
            queue_name=keys.queue("sec"),
            job_serializer=worker_redis.job_serializer,
            job_deserializer=worker_redis.job_deserializer,
            poll_delay=0.01,
            burst=True,
            handle_signals=False,
            fallback_s=1.0,
        )
        try:
            async with asyncio.timeout(20):
                await worker.async_run()
            assert await worker.release_orphaned_jobs() == 0
        finally:
            await worker.close()
        assert ran == [{"session": "job-s1", "generation": 1}]
        # Finished with its result kept: the API (reading arq:result:*) still refuses a duplicate.
        assert not await queue.enqueue(Operation.CREATE, "sec", "job-s1", 1)

        assert denials(acl_server) == [], "the documented ACL refused a command the components use"
    finally:
        await api_redis.aclose()
        await worker_redis.aclose()


async def test_documented_acl_refuses_everything_else(acl_server: AclServer) -> None:
    worker_redis = redis_client(acl_server.worker)
    api_redis = redis_client(acl_server.api)
    try:
        for client in (worker_redis, api_redis):
            for command in (
                client.flushall,
                functools.partial(client.config_get, "*"),
                functools.partial(client.keys, "*"),
                client.acl_list,
                client.shutdown,
            ):
                with pytest.raises(NoPermissionError):
                    await command()
            with pytest.raises(NoPermissionError):  # outside the key prefix
                await client.set("other:key", "x")
            with pytest.raises(NoPermissionError):  # EVAL of arbitrary text: only EVALSHA
                await awaited(client.eval("return 1", 0))
            with pytest.raises(NoPermissionError):
                await client.publish("channel", "x")
        with pytest.raises(NoPermissionError):  # the API only reads results...
            await api_redis.set("arq:result:x", "forged")
        with pytest.raises(NoPermissionError):  # ...and does not run the consumer
            await api_redis.info()
        logged = set(denials(acl_server))
        for user in ("orchestrator-api", "orchestrator-worker"):
            for entry in ("command flushall", "command config|get", "command keys", "key other:key", "command eval"):
                assert f"{entry} ({user})" in logged, logged
        assert {"key arq:result:x (orchestrator-api)", "command info (orchestrator-api)"} <= logged
    finally:
        await api_redis.aclose()
        await worker_redis.aclose()


# Key families of keys.py the API never touches (the worker's alone).
WORKER_ONLY_KEYS = {"pool_making", "userns_slots", "userns_owners"}


def test_the_api_user_names_every_key_family_it_uses() -> None:
    """Key patterns add up, so the API's user lists its families one by one: each family of
    keys.py is covered (but the worker's own), and the env only by its write-only pattern."""
    [api_line] = [line for line in documented_acl() if line.startswith("user orchestrator-api ")]
    patterns = [(word[1:], "rw") for word in api_line.split() if word.startswith("~")]
    patterns += [(word[3:], word[1].lower()) for word in api_line.split() if word[:3] in ("%R~", "%W~")]
    keys = Keys(PREFIX)
    families = {
        name: member(*["x"] * len(inspect.signature(member).parameters)) if callable(member) else member
        for name, member in ((n, getattr(keys, n)) for n in dir(Keys) if not n.startswith("_") and n != "prefix")
    }
    assert len(families) >= 17, families  # keys.py as it is: a family vanishing here is a bug
    for name, key in families.items():
        matching = {access for pattern, access in patterns if fnmatch.fnmatchcase(key, pattern)}
        if name in WORKER_ONLY_KEYS:
            assert not matching, f"{name} ({key}) is the worker's alone, yet the API's user may touch it"
        elif name == "session_env":
            assert matching == {"w"}, f"the API's user must only write {key}, has {matching}"
        else:
            assert matching, f"{key} ({name}) is in none of the API's key patterns: add it to docs/redis.md"


ENV_MARKER = "ENV-MARKER-acl-5e1f"


def _beat(sandbox: str, status: SandboxStatus) -> SandboxInfo:
    return SandboxInfo(
        id=sandbox, depth=1, version="0", hostname="h", sessions=0, capacity=4, load=0.0,
        free_disk_bytes=0, privilege="caps", ts="2026-01-01T00:00:00.000Z", status=status,
    )  # fmt: skip


async def test_the_api_writes_session_env_but_never_reads_it(acl_server: AclServer) -> None:
    """Through the real API under its documented ACL user: creates store env (both paths: the
    fallback's record script and placement's reservation), a delete and a retire remove it, and
    /metrics, listings and reads all work; yet no command of that user can read an env key."""
    with contextlib.closing(acl_server.admin()) as admin:
        admin.acl_log_reset()
    keys = Keys(PREFIX)
    sandbox, fallback = "sec-env", "sec-env-default"
    tokens = ";".join(f"{s.replace(':', '-')}:{hash_token(raw)}:{s}" for s, raw in TOKENS.items())
    api_settings = dataclasses.replace(acl_server.api, default_sandbox=fallback, tokens=tokens)
    worker_redis, api_redis = redis_client(acl_server.worker), redis_client(acl_server.api)
    env = {"SECRET": ENV_MARKER}
    try:
        async with running_api(api_settings) as url, httpx.AsyncClient(base_url=url, headers=ADMIN) as http:
            # No sandbox has beaten: the create is stored for the default sandbox (CAS_LUA).
            first = await http.post("/v1/sessions", json={"id": "env-fallback", "env": env})
            assert first.status_code == 202, first.text
            registry = SandboxRegistry(worker_redis, keys)
            assert await registry.mark_alive(sandbox, 60.0)
            assert await registry.beat(_beat(sandbox, SandboxStatus.AVAILABLE))
            # A live sandbox: placement reserves it and stores the env (RESERVE_LUA).
            placed = await http.post("/v1/sessions", json={"id": "env-placed", "env": env, "sandbox": sandbox})
            assert placed.status_code == 202, placed.text
            # An idempotent retry needs no read of the env: the record lists its keys.
            again = await http.post("/v1/sessions", json={"id": "env-placed", "env": env, "sandbox": sandbox})
            assert again.status_code == 200, again.text
            for path in ("/v1/sessions", "/v1/sessions/env-placed", "/v1/sandboxes", "/metrics"):
                response = await http.get(path)
                assert response.status_code == 200, (path, response.text)
                assert ENV_MARKER not in response.text
            with contextlib.closing(acl_server.admin()) as admin:
                stored = admin.mget([keys.session_env("env-fallback"), keys.session_env("env-placed")])
            assert stored == [b'{"SECRET":"%s"}' % ENV_MARKER.encode()] * 2

            # The API's user cannot read it: not by GET or MGET (commands it has), not by a script.
            env_key = keys.session_env("env-placed")
            for read in (
                functools.partial(api_redis.get, env_key),
                functools.partial(api_redis.mget, [keys.session("env-placed"), env_key]),
            ):
                with pytest.raises(NoPermissionError):
                    await read()
            read_script = api_redis.register_script("return redis.call('GET', KEYS[1] or ARGV[1])")
            with pytest.raises(NoPermissionError):  # a declared key is checked for reading too
                await read_script(keys=[env_key])
            with pytest.raises(ResponseError, match="can't access"):  # and so is each call inside
                await read_script(args=[env_key])
            # The worker's user reads it (the bring-up does).
            assert await worker_redis.get(env_key) == b'{"SECRET":"%s"}' % ENV_MARKER.encode()

            # Delete: the API moves the session to deleting (the record script, no env read)...
            deleting = await http.delete("/v1/sessions/env-fallback")
            assert deleting.status_code == 202 and deleting.json()["state"] == "deleting", deleting.text
            # ...and the worker's deleted transition removes the env with the record.
            worker_store = SessionStore(worker_redis, EventBus(worker_redis, keys))
            await worker_store.transition("env-fallback", SessionState.DELETED)
            # Retire: the API itself deletes the sandbox's sessions, env included.
            assert await registry.beat(_beat(sandbox, SandboxStatus.DRAINED))  # gone: no alive key
            retired = await http.post(f"/v1/sandboxes/{sandbox}/retire")
            assert retired.status_code == 202 and retired.json()["sessions"] == ["env-placed"], retired.text
            with contextlib.closing(acl_server.admin()) as admin:
                assert admin.exists(keys.session_env("env-fallback"), keys.session_env("env-placed")) == 0
                assert admin.exists(keys.session("env-fallback"), keys.session("env-placed")) == 0

        # Refused: exactly the four reads above (GET, MGET, the declared key, the call inside),
        # all of the API's user, none of any command the API itself ran.
        with contextlib.closing(acl_server.admin()) as admin:
            entries: list[dict[str, Any]] = admin.acl_log(count=1000)  # type: ignore[assignment]
        refused = sorted(
            (e["reason"], e["context"], e["object"], e["username"], int(e["count"]))
            for e in entries
            if "setinfo" not in e["object"]
        )
        assert refused == [
            ("key", "lua", env_key, "orchestrator-api", 1),
            ("key", "toplevel", env_key, "orchestrator-api", 3),
        ], refused
    finally:
        await api_redis.aclose()
        await worker_redis.aclose()


async def test_wrong_or_no_password_is_refused(acl_server: AclServer) -> None:
    wrong = settings_for(acl_server.url("orchestrator-worker", "not-the-password"))
    client = redis_client(wrong)
    try:
        with pytest.raises(AuthenticationError, match="invalid username-password pair"):
            await client.ping()
    finally:
        await client.aclose()
    anonymous = redis_client(settings_for(f"redis://127.0.0.1:{acl_server.port}/0"))
    try:
        with pytest.raises(AuthenticationError):  # the default user is off
            await anonymous.ping()
    finally:
        await anonymous.aclose()
    assert "not-the-password" not in redacted_url(wrong.redis_url)


# --- TLS -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


def _issue(directory: Path, name: str, subject: str, extensions: str) -> None:
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", subject, cwd=directory)  # fmt: skip
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=directory)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed (and the venv has no `cryptography` to make certificates)")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=orchestrator test CA", cwd=d)  # fmt: skip
    # The server's certificate names 127.0.0.1 only: connecting as "localhost" must fail.
    _issue(d, "server", "/CN=redis", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _issue(d, "client", "/CN=orchestrator-worker", "extendedKeyUsage=clientAuth\n")
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key")


def start_tls_server(workdir: Path, pki: Pki, auth_clients: str) -> Server:
    tls_args = ["--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key)]
    tls_args += ["--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", auth_clients]
    probe = ssl.create_default_context(cafile=str(pki.ca))
    probe.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    try:
        return start_server(workdir, *tls_args, tls=probe)
    except RuntimeError as e:
        if re.search(r"Bad directive|wrong number of arguments|not compiled|TLS.*not supported", str(e), re.I):
            pytest.skip(f"this redis-server has no TLS support: {str(e).strip().splitlines()[-1]}")
        raise


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Server]:
    with running(start_tls_server(tmp_path_factory.mktemp("redis-tls"), pki, "no")) as server:
        yield server


async def round_trip(settings: Settings) -> None:
    client = redis_client(settings)
    try:
        key = f"{PREFIX}tls:{secrets.token_hex(4)}"
        await client.set(key, b"over tls")
        assert await client.get(key) == b"over tls"
        job = await client.enqueue_job("tls_job", _queue_name=f"{PREFIX}queue:tls")  # jobs: the same client
        assert job is not None and (await job.info()) is not None
    finally:
        await client.aclose()


async def test_tls_with_our_ca(tls_server: Server, pki: Pki) -> None:
    await round_trip(settings_for(f"rediss://127.0.0.1:{tls_server.port}/0", redis_tls_ca=str(pki.ca)))


async def test_tls_refuses_an_unverified_server(tls_server: Server, pki: Pki) -> None:
    for settings in (
        settings_for(f"rediss://127.0.0.1:{tls_server.port}/0"),  # the system CAs do not know ours
        settings_for(f"rediss://localhost:{tls_server.port}/0", redis_tls_ca=str(pki.ca)),  # wrong name
    ):
        client = redis_client(settings)
        try:
            with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.ping()
        finally:
            await client.aclose()


async def test_tls_client_certificate(tmp_path: Path, pki: Pki) -> None:
    with running(start_tls_server(tmp_path, pki, "yes")) as server:
        url = f"rediss://127.0.0.1:{server.port}/0"
        await round_trip(
            settings_for(url, redis_tls_ca=str(pki.ca), redis_tls_cert=str(pki.client_cert),
                         redis_tls_key=str(pki.client_key))
        )  # fmt: skip
        client = redis_client(settings_for(url, redis_tls_ca=str(pki.ca)))
        try:
            with pytest.raises(redis.exceptions.ConnectionError):  # no client certificate
                await client.ping()
        finally:
            await client.aclose()


# --- Sentinel ------------------------------------------------------------------------------

MASTER_PASSWORD = "m@ster:" + secrets.token_hex(6)
SENTINEL_PASSWORD = "sentinel-" + secrets.token_hex(6)


def start_sentinel(workdir: Path, master_port: int, requirepass: str | None = None) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = [
        "bind 127.0.0.1",
        f"port {port}",
        f'dir "{workdir}"',
        "sentinel resolve-hostnames no",
        f"sentinel monitor mymaster 127.0.0.1 {master_port} 1",
        f'sentinel auth-pass mymaster "{MASTER_PASSWORD}"',
    ]
    if requirepass:
        conf.append(f'requirepass "{requirepass}"')
    (workdir / "sentinel.conf").write_text("\n".join(conf) + "\n")
    server = start_server(workdir, str(workdir / "sentinel.conf"), "--sentinel", port=port)
    # Up is not ready: wait until it names the master (and has checked it is one).
    probe = redis.Redis(port=port, password=requirepass, decode_responses=True)
    deadline = time.monotonic() + 15
    try:
        while True:
            with contextlib.suppress(redis.exceptions.RedisError):
                # redis-py leaves its SENTINEL commands unannotated (untyped, in mypy's words).
                state: dict[str, Any] = probe.sentinel_master("mymaster")  # type: ignore[no-untyped-call]
                if (state.get("ip"), state.get("port")) == ("127.0.0.1", master_port) and (
                    state.get("is_master") and not state.get("is_sdown") and state.get("role-reported") == "master"
                ):
                    return server
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"sentinel on {port} never reported the master:\n{server.log.read_text()}")
            time.sleep(0.05)
    finally:
        probe.close()


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """A master with a password, a sentinel without one and one with one."""
    base = tmp_path_factory.mktemp("redis-sentinel")
    with (
        running(start_server(base / "master", "--requirepass", MASTER_PASSWORD)) as master,
        running(start_sentinel(base / "open", master.port)) as open_sentinel,
        running(start_sentinel(base / "locked", master.port, requirepass=SENTINEL_PASSWORD)) as locked,
    ):
        yield open_sentinel, locked


def sentinel_settings(sentinel: Server, **fields: Any) -> Settings:
    # The URL's host is unreachable on purpose: only the master that the sentinel names works.
    url = f"redis://:{quote(MASTER_PASSWORD, safe='')}@192.0.2.1:1/0"
    return settings_for(url, redis_sentinels=(("127.0.0.1", sentinel.port),), **fields)


async def jobs_through(settings: Settings, session: str) -> None:
    """App keys and jobs on one client, through the sentinel-discovered master."""
    client = redis_client(settings)
    try:
        key = f"{PREFIX}sentinel:{secrets.token_hex(4)}"
        await client.set(key, b"via sentinel")
        assert await client.get(key) == b"via sentinel"
        keys = Keys(PREFIX)
        queue = keys.queue(f"sentinel-{session}")
        assert await JobQueue(client, keys).enqueue(Operation.STOP, f"sentinel-{session}", session, 3)
        [job] = await client.queued_jobs(queue_name=queue)
        assert (job.function, job.kwargs) == (Operation.STOP.value, {"session": session, "generation": 3})
        assert await client.zcard(queue) == 1
    finally:
        await client.aclose()


async def test_sentinel_client_and_arq(sentinels: tuple[Server, Server]) -> None:
    await jobs_through(sentinel_settings(sentinels[0]), "s9")


async def test_sentinel_with_a_password(sentinels: tuple[Server, Server]) -> None:
    locked = sentinels[1]
    client = redis_client(sentinel_settings(locked, redis_sentinel_password=SENTINEL_PASSWORD))
    try:
        assert await client.ping()
    finally:
        await client.aclose()
    refused = redis_client(sentinel_settings(locked))
    try:
        with pytest.raises((ResponseError, redis.exceptions.ConnectionError)):
            await refused.ping()
    finally:
        await refused.aclose()
    # Jobs too: arq uses our client, so a sentinel password (arq 0.28 alone cannot pass one) works.
    await jobs_through(sentinel_settings(locked, redis_sentinel_password=SENTINEL_PASSWORD), "s10")


async def test_a_producer_sends_commands_and_reads_events_and_output_only(acl_server: AclServer) -> None:
    """docs/redis.md's producer user: what docs/jobs.md tells a producer to do, and nothing else."""
    keys = Keys(PREFIX)
    producer = redis.asyncio.Redis.from_url(acl_server.url("orchestrator-producer", acl_server.producer_password))
    try:
        assert await producer.xadd(keys.commands(), {"command": "{}"})
        await producer.xread({keys.firehose: "0-0"}, count=1)
        await producer.xrange(keys.exec_output("x" + "0" * 20))
        refused = [
            producer.get(keys.session("s1")),  # no session records,
            producer.xrange(keys.commands()),  # not the commands of others,
            producer.xadd(keys.exec_jobs("sec"), {"job": "{}"}),  # no sandbox's exec stream,
            producer.zadd(keys.queue("sec"), {"job": 1}),  # no sandbox's job queue,
            producer.xadd(keys.firehose, {"event": "{}"}),  # no forged events,
            producer.xadd(keys.commands("other-tenant"), {"command": "{}"}),  # no other tenant's stream
            producer.xreadgroup("control", "p", {keys.commands(): ">"}),
        ]
        for call in refused:
            with pytest.raises(NoPermissionError):
                await call
    finally:
        await producer.aclose()
