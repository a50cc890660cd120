"""Exec in a real desktop (real API, real worker, real dockerd, real Redis), under the default
profile: the command runs inside the desktop's user namespace, its output apart and capped,
its stdin, env, cwd and user as asked; a timeout or a kill ends its whole tree and keeps what
it printed; the output resumes from the middle; a worker SIGKILLed mid-exec ends it
``worker_lost``; and every exec is an event without its content."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
import urllib.parse
from collections.abc import AsyncIterator

import httpx
import pytest

from orchestrator.client import ApiError, Client, ServerEvent
from orchestrator.config import Settings
from workers.worker import SandboxWorker

from .conftest import TOKENS, running_api, running_worker, worker_env
from .test_cli import cli

READY_TIMEOUT = 120.0


@contextlib.asynccontextmanager
async def ready_session(client: Client, **options: object) -> AsyncIterator[str]:
    record = await client.create(**options)  # type: ignore[arg-type]
    await client.wait_ready(record.id, timeout=READY_TIMEOUT)
    yield record.id


async def test_exec_runs_inside_the_desktop_with_its_io_apart(
    client: Client, worker: SandboxWorker, docker_settings: Settings
) -> None:
    async with ready_session(client, env={"FROM_SESSION": "session value"}) as sid:
        done = await client.exec(sid, shell="echo out; echo err >&2; exit 3")
        assert (done.state, done.exit_code, done.stdout, done.stderr) == ("exited", 3, "out\n", "err\n")
        assert not done.truncated and not done.timed_out and done.duration_ms is not None

        # Inside the desktop's user namespace: uid 0 there is an unprivileged uid outside.
        uid_map = (await client.exec(sid, ["cat", "/proc/self/uid_map"])).stdout.split()
        assert uid_map[0] == "0" and int(uid_map[1]) >= 65536, uid_map
        # ...where the desktop's own dockerd answers.
        info = await client.exec(sid, ["docker", "info", "--format", "{{.Driver}}"])
        assert info.stdout.strip() == "overlay2", info

        assert (await client.exec(sid, ["cat"], stdin="hello\nthere")).stdout == "hello\nthere"
        raw = await client.exec(sid, ["od", "-An", "-tx1"], stdin_base64="AAH/")
        assert raw.stdout.split() == ["00", "01", "ff"]
        env = await client.exec(sid, shell='printf "%s|%s" "$FOO" "$FROM_SESSION"', env={"FOO": "a b\nc"})
        assert env.stdout == "a b\nc|session value"
        assert (await client.exec(sid, ["pwd"], cwd="/tmp")).stdout == "/tmp\n"
        nobody = await client.exec(sid, shell="id -u; echo $HOME", user="nobody")
        assert nobody.stdout.split() == ["65534", "/nonexistent"]
        missing = await client.exec(sid, ["pwd"], cwd="/no/such/dir")
        assert missing.exit_code == 126 and "/no/such/dir" in missing.stderr
        absent = await client.exec(sid, ["no-such-program"])
        assert absent.exit_code == 127

        # 50 MB printed, 1 MiB kept: truncated, the full count known.
        big = await client.exec(sid, shell="head -c 50000000 /dev/zero", max_output_bytes=2**20, timeout_s=120)
        assert big.exit_code == 0 and big.truncated
        assert len(big.stdout) == 2**20
        status = await client.exec_status(sid, big.id)
        assert status.stdout_bytes == 50_000_000

        # A timeout kills the whole tree (a background child too) and keeps what was printed.
        slow = await client.exec(sid, shell="sleep 1001 & echo started; sleep 1002", timeout_s=2)
        assert slow.timed_out and slow.stdout == "started\n", slow
        left = await client.exec(sid, shell="ps -eo args | grep -c '^sleep 100[12]' || true")
        assert left.stdout.strip() == "0", left

        events = [e async for e in client.events(sid, follow=False)]
        exec_events = [e for e in events if e.type.startswith("exec.")]
        exited = [e.data["data"] for e in exec_events if e.type == "exec.exited"]
        assert len(exited) == len([e for e in exec_events if e.type == "exec.started"]) >= 12
        first = next(d for d in exited if d["exec"] == done.id)
        assert first["exit_code"] == 3 and first["stdout_bytes"] == 4 and first["by"] == "admin"
        # Never the content: no command, env value, stdin or output in any exec event.
        for secret in ("a b", "hello", "-tx1", "FOO", "session value", "sleep 1001", "/dev/zero"):
            assert all(secret not in str(e.data) for e in exec_events), secret


async def test_exec_output_resumes_after_a_disconnect_and_kill_ends_it(
    client: Client, api: str, worker: SandboxWorker, docker_settings: Settings
) -> None:
    async with ready_session(client) as sid:
        # The CLI streams both outputs apart and exits with the command's code.
        code, out, err = await cli(
            api, "sessions", "exec", sid, "--env", "X=1", "--", "sh", "-c", "echo o$X; echo e >&2; exit 5"
        )
        assert (code, out, err) == (5, "o1\n", "e\n")
        code, _, _ = await cli(api, "sessions", "exec", sid, "--timeout", "1", "--", "sleep", "30")
        assert code == 124

        started = await client.exec_start(
            sid, shell="for i in 1 2 3 4 5 6; do echo line$i; sleep 0.2; done; echo bye >&2", timeout_s=30
        )
        assert started.state == "queued"
        first: list[ServerEvent] = []
        async for event in client.exec_stream(sid, started.id):
            first.append(event)
            if len(first) == 2:
                break  # the client goes away mid-run
        rest = [e async for e in client.exec_stream(sid, started.id, after=first[-1].id)]
        events = first + rest
        assert "".join(e.data["data"] for e in events if e.type == "stdout") == "".join(
            f"line{i}\n" for i in range(1, 7)
        )
        assert [e.data["data"] for e in events if e.type == "stderr"] == ["bye\n"]
        assert events[-1].type == "exit" and events[-1].data["exit_code"] == 0
        # From the start again, any number of times, while it is kept.
        again = [e async for e in client.exec_stream(sid, started.id)]
        assert [e.id for e in again] == [e.id for e in events]

        long = await client.exec_start(sid, shell="echo going; exec sleep 1000", timeout_s=600)
        async for event in client.exec_stream(sid, long.id):
            if event.type == "stdout":
                break
        await client.exec_kill(sid, long.id)
        ended = [e async for e in client.exec_stream(sid, long.id)][-1]
        assert ended.type == "exit" and ended.data["killed"] is True and not ended.data["timed_out"]
        assert (await client.exec_status(sid, long.id)).state == "exited"


async def test_exec_refuses_bad_requests_clearly(
    client: Client, api: str, worker: SandboxWorker, docker_settings: Settings
) -> None:
    async with ready_session(client) as sid:
        cases = [
            ({"cmd": ["true"], "shell": "true"}, 400, "invalid_request"),
            ({}, 400, "invalid_request"),
            ({"cmd": []}, 400, "invalid_request"),
            ({"cmd": ["true"], "cwd": "relative"}, 400, "invalid_request"),
            ({"cmd": ["a\x00b"]}, 400, "invalid_request"),
            ({"cmd": ["true"], "env": {"1BAD": "x"}}, 400, "invalid_request"),
            ({"cmd": ["true"], "timeout_s": 10**9}, 400, "invalid_request"),
            ({"cmd": ["true"], "max_output_bytes": 2**40}, 400, "invalid_request"),
            ({"cmd": ["true"], "stdin_base64": "***"}, 400, "invalid_request"),
            ({"cmd": ["true"], "stdin": "a", "stdin_base64": "YQ=="}, 400, "invalid_request"),
            ({"cmd": ["true"], "user": "root; rm"}, 400, "invalid_request"),
            ({"cmd": ["true"], "surprise": 1}, 400, "invalid_request"),
        ]
        async with httpx.AsyncClient(base_url=api) as http:
            for body, status, code in cases:
                response = await http.post(
                    f"/v1/sessions/{sid}/exec", json=body, headers={"Authorization": f"Bearer {TOKENS['admin']}"}
                )
                assert (response.status_code, response.json()["code"]) == (status, code), (body, response.text)
            for scope in ("sessions:write", "events:read"):
                response = await http.post(
                    f"/v1/sessions/{sid}/exec",
                    json={"cmd": ["true"]},
                    headers={"Authorization": f"Bearer {TOKENS[scope]}"},
                )
                assert response.status_code == 403, (scope, response.text)
            assert (await http.post(f"/v1/sessions/{sid}/exec", json={"cmd": ["true"]})).status_code == 401
        with pytest.raises(ApiError) as unknown:
            await client.exec("no-such-session", ["true"])
        assert (unknown.value.status, unknown.value.code) == (404, "session_not_found")
        with pytest.raises(ApiError) as no_exec:
            await client.exec_status(sid, "x" + "0" * 20)
        assert (no_exec.value.status, no_exec.value.code) == (404, "exec_not_found")
        await client.stop(sid)
        await client.wait_for(sid, {"session.stopped"}, timeout=60)
        with pytest.raises(ApiError) as stopped:
            await client.exec(sid, ["true"])
        assert (stopped.value.status, stopped.value.code) == (409, "session_not_ready")


async def test_an_exec_whose_worker_is_killed_ends_worker_lost(client: Client, docker_settings: Settings) -> None:
    async with running_worker(docker_settings), ready_session(client) as sid:
        pass
    # The same sandbox, now served by a worker process that is SIGKILLed mid-exec.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator.cli",
        "worker",
        env=worker_env(docker_settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        running = await client.exec_start(sid, shell="echo begun; sleep 600", timeout_s=900)
        async for event in client.exec_stream(sid, running.id):
            if event.type == "stdout":
                break
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        # Its lease lapses (10 s); the next reader finds it gone: a clear end, never a hang.
        async with asyncio.timeout(60):
            events = [e async for e in client.exec_stream(sid, running.id)]
        end = events[-1]
        assert end.type == "exit" and end.data["state"] == "failed", end
        assert end.data["error"]["code"] == "worker_lost"
        assert "".join(e.data.get("data", "") for e in events if e.type == "stdout") == "begun\n"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_hundred_execs_run_at_once_beside_lifecycle_jobs(docker_settings: Settings) -> None:
    settings = dataclasses.replace(docker_settings, exec_max_per_session=150)
    async with (
        running_api(settings) as url,
        Client(url, token=TOKENS["admin"], max_connections=200) as client,
        running_worker(settings),
        ready_session(client) as sid,
    ):
        if True:
            # Each waits until all 100 have started: they can only finish if they run at once.
            marker = "/tmp/started"
            script = f"echo x >> {marker}; until [ $(wc -l < {marker}) -ge 100 ]; do sleep 0.1; done; echo done"
            runs = [asyncio.create_task(client.exec(sid, shell=script, timeout_s=120)) for _ in range(100)]
            # Meanwhile a lifecycle job goes through: a second session comes up.
            other = await client.create()
            await client.wait_ready(other.id, timeout=READY_TIMEOUT)
            results = await asyncio.gather(*runs)
            assert [(r.exit_code, r.stdout) for r in results] == [(0, "done\n")] * 100


async def redis_cli(settings: Settings, *args: str) -> str:
    """A producer that only speaks Redis: the redis-cli binary."""
    url = urllib.parse.urlparse(settings.redis_url)
    proc = await asyncio.create_subprocess_exec(
        "redis-cli", "-h", url.hostname or "127.0.0.1", "-p", str(url.port or 6379), "--no-raw", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    return out.decode()


async def test_a_redis_cli_producer_runs_an_exec_through_the_command_stream(
    client: Client, worker: SandboxWorker, docker_settings: Settings
) -> None:
    prefix = docker_settings.key_prefix
    async with ready_session(client) as sid:
        command = {"op": "exec", "request_id": "build-7", "session": sid, "shell": "echo from-the-queue; exit 4"}
        for _ in range(2):  # sent twice: acts once
            await redis_cli(docker_settings, "XADD", f"{prefix}commands", "*", "command", json.dumps(command))
        bad = {"op": "exec", "request_id": "bad-1", "session": sid, "cmd": ["true"], "cwd": "relative"}
        await redis_cli(docker_settings, "XADD", f"{prefix}commands", "*", "command", json.dumps(bad))
        await redis_cli(docker_settings, "XADD", f"{prefix}commands", "*", "command", "{not json")
        events = await client.wait_for(sid, {"exec.exited"}, timeout=60)
        firehose = [e async for e in client.events(None, after="0", follow=False)]
        accepted = [e.data["data"] for e in firehose if e.type == "command.accepted"]
        rejected = [e.data["data"] for e in firehose if e.type == "command.rejected"]
        # Answered twice, the second saying it is the first's answer again.
        assert [(a["request_id"], a["duplicate"]) for a in accepted] == [("build-7", False), ("build-7", True)]
        assert accepted[0]["exec"] == accepted[1]["exec"], accepted
        assert sorted((r["request_id"], r["code"]) for r in rejected if r["request_id"]) == [
            ("bad-1", "invalid_request")
        ]
        assert any(r["code"] == "invalid_json" for r in rejected), rejected
        exited = next(e.data["data"] for e in events if e.type == "exec.exited")
        assert exited["request_id"] == "build-7" and exited["exit_code"] == 4
        # Its output, read the same way: the exec's stream, from the id the acceptance named.
        out = await redis_cli(docker_settings, "XRANGE", f"{prefix}exec-output:{accepted[0]['exec']}", "-", "+")
        assert "from-the-queue" in out
        # Handled entries are removed; none is left pending.
        assert (await redis_cli(docker_settings, "XLEN", f"{prefix}commands")).strip() == "(integer) 0"
        execs = [e for e in events if e.type == "exec.started"]
        assert len(execs) == 1  # once, though sent twice
