"""Files through the API into a real desktop (real API, worker, dockerd, Redis), by both roads
of the access route: a 100 MB binary round trip with equal checksums, a directory as a tar
both ways, a listing, `orchestrator sessions cp` both ways, refusals with precise codes, and
every write and read an event without its content."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from orchestrator.client import ApiError, Client
from orchestrator.config import Settings

from .conftest import TOKENS, running_api, running_worker
from .test_cli import cli
from .test_exec import ready_session

pytestmark = pytest.mark.docker

SIZE = 100 * 2**20


async def _random_chunks(total: int, seed: bytes) -> AsyncIterator[bytes]:
    """Deterministic, incompressible bytes, made as they are sent (never whole in memory)."""
    block = hashlib.sha256(seed).digest() * (2**16 // 32)  # 64 KiB
    sent, n = 0, 0
    while sent < total:
        piece = hashlib.sha256(block + n.to_bytes(8, "big")).digest() * (2**20 // 32)
        piece = piece[: total - sent]
        sent += len(piece)
        n += 1
        yield piece


def _digest_of(total: int, seed: bytes) -> str:
    block = hashlib.sha256(seed).digest() * (2**16 // 32)
    digest, sent, n = hashlib.sha256(), 0, 0
    while sent < total:
        piece = (hashlib.sha256(block + n.to_bytes(8, "big")).digest() * (2**20 // 32))[: total - sent]
        digest.update(piece)
        sent += len(piece)
        n += 1
    return digest.hexdigest()


@pytest.mark.parametrize("route", ["direct", "relay"])
async def test_a_100_mb_file_round_trips_and_a_directory_as_tar(
    route: str, docker_settings: Settings, tmp_path: Path
) -> None:
    settings = dataclasses.replace(docker_settings, access_route=route)
    async with (
        running_worker(settings),
        running_api(settings) as api,
        Client(api, token=TOKENS["admin"]) as admin,
        Client(api, token=TOKENS["sessions:exec"], timeout=120) as user,
        ready_session(admin) as sid,
    ):
        written = await user.upload(sid, "/root/big.bin", _random_chunks(SIZE, b"x"))
        assert written == {"path": "/root/big.bin", "bytes": SIZE, "tar": False}
        inside = await admin.exec(sid, shell="sha256sum /root/big.bin; stat -c '%u %s' /root/big.bin")
        assert inside.stdout.split()[0] == _digest_of(SIZE, b"x"), inside
        assert inside.stdout.split()[2:] == ["0", str(SIZE)]  # the desktop's root owns it
        digest, total = hashlib.sha256(), 0
        async for chunk in user.download(sid, "/root/big.bin"):
            digest.update(chunk)
            total += len(chunk)
        assert (total, digest.hexdigest()) == (SIZE, _digest_of(SIZE, b"x"))

        # A directory, as a tar both ways (modes kept, nested files).
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, data, mode in (("a.txt", b"alpha", 0o644), ("sub/run.sh", b"#!/bin/sh\necho hi\n", 0o755)):
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), mode
                tar.addfile(info, io.BytesIO(data))
        await user.upload(sid, "/root/project", buffer.getvalue(), tar=True)
        ran = await admin.exec(sid, shell="cat /root/project/a.txt; /root/project/sub/run.sh")
        assert ran.stdout == "alphahi\n", ran
        tar_bytes = b"".join([c async for c in user.download(sid, "/root/project")])
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        assert {"a.txt", "sub/run.sh"} <= set(members), sorted(members)
        assert members["sub/run.sh"].mode & 0o777 == 0o755

        listing = {e["name"]: e for e in await user.list_files(sid, "/root/project")}
        assert listing["a.txt"]["kind"] == "file" and listing["a.txt"]["size"] == 5
        assert listing["sub"]["kind"] == "directory"

        events = [e async for e in admin.events(sid, follow=False) if e.type.startswith("files.")]
        kinds = [(e.type, e.data["data"]["path"]) for e in events]
        assert ("files.written", "/root/big.bin") in kinds and ("files.read", "/root/big.bin") in kinds, kinds
        assert all(e.data["data"]["by"] == "sessions-exec" for e in events)
        assert "alpha" not in json.dumps([e.data for e in events])  # never the content


async def test_file_refusals_and_the_cli_cp(api: str, client: Client, worker: object, tmp_path: Path) -> None:
    async with ready_session(client) as sid:
        for path, status, expected in (
            ("relative/path", 400, "invalid_path"),
            ("/root/../etc/passwd", 400, "invalid_path"),
            ("/proc/1/environ", 400, "invalid_path"),
            ("/no/such/file", 404, "file_not_found"),
        ):
            with pytest.raises(ApiError) as refused:
                _ = [c async for c in client.download(sid, path)]
            assert (refused.value.status, refused.value.code) == (status, expected), (path, refused.value)
        with pytest.raises(ApiError) as missing_dir:
            await client.upload(sid, "/no/such/dir/file", b"data")
        assert (missing_dir.value.status, missing_dir.value.code) == (404, "file_not_found")
        with pytest.raises(ApiError) as unknown:
            await client.upload("no-such-session", "/root/x", b"data")
        assert unknown.value.status == 404
        # Not a token with sessions:exec: 403; no token: 401.
        async with httpx.AsyncClient(base_url=api) as raw:
            headers = {"Authorization": f"Bearer {TOKENS['sessions:write']}"}
            forbidden = await raw.get(f"/v1/sessions/{sid}/files", params={"path": "/root"}, headers=headers)
            assert forbidden.status_code == 403
            anonymous = await raw.put(f"/v1/sessions/{sid}/files", params={"path": "/root/x"}, content=b"x")
            assert anonymous.status_code == 401

        # The CLI, both ways: a file, and a directory's contents.
        local = tmp_path / "up"
        (local / "deep").mkdir(parents=True)
        (local / "deep" / "note.txt").write_bytes(b"from the cli\n")
        (tmp_path / "one.bin").write_bytes(os.urandom(300_000))
        code, out, err = await cli(api, "sessions", "cp", str(tmp_path / "one.bin"), f"{sid}:/root/")
        assert code == 0 and "300000 bytes" in out, (out, err)
        code, out, err = await cli(api, "sessions", "cp", str(local), f"{sid}:/root/tree")
        assert code == 0, err
        back = tmp_path / "back"
        code, out, err = await cli(api, "sessions", "cp", f"{sid}:/root/tree", str(back))
        assert code == 0, err
        assert (back / "deep" / "note.txt").read_bytes() == b"from the cli\n"
        code, out, err = await cli(api, "sessions", "cp", f"{sid}:/root/one.bin", str(tmp_path / "again.bin"))
        assert code == 0, err
        assert (tmp_path / "again.bin").read_bytes() == (tmp_path / "one.bin").read_bytes()
        code, out, err = await cli(api, "sessions", "cp", f"{sid}:/root/none", str(tmp_path / "x"))
        assert code != 0 and "file_not_found" in err, (code, err)
