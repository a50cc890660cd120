"""Files and ports of a real desktop under the default profile (userns), straight on the
sandbox's daemon (no API): workers/runtime/files.py and netns.py. Files travel streamed both
ways through desktop-enter and belong to the desktop's user (uid 0 inside, never the sandbox's
root); a port is reached in the desktop's own network namespace, whether its server listens on
the desktop's loopback only or is published by the desktop's dockerd. One desktop serves the
whole file."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import aiodocker
import pytest
import pytest_asyncio

from orchestrator.client import Client
from orchestrator.desktop_io import FileKind
from orchestrator.names import desktop_name
from workers.runtime.files import DesktopFiles, FileError
from workers.runtime.netns import DesktopPorts, PortError, open_desktop_port

from .conftest import (
    PROJECT_ROOT,
    SANDBOX_IMAGE,
    TEST_IMAGE,
    TOKENS,
    adocker,
    compose_sandbox_flags,
    make_settings,
    remove_sandbox_objects,
    require_images,
    running_api,
    running_worker,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

MB = 1_000_000


@dataclass
class Desktop:
    host: str
    sid: str
    docker: aiodocker.Docker
    files: DesktopFiles

    @property
    def name(self) -> str:
        return desktop_name(self.sid)

    async def run(self, *args: str, timeout: float = 60) -> str:
        """``args`` as the desktop's user would run them (in its namespaces); stdout."""
        return await adocker("exec", self.name, "desktop-enter", *args, host=self.host, timeout=timeout)

    async def outside(self, *args: str) -> str:
        """``args`` on the outer side of the desktop (the container's root, not the user's)."""
        return await adocker("exec", self.name, *args, host=self.host)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def desktop(docker_host: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Desktop]:
    host = require_images(docker_host)
    settings = replace(make_settings(redis_url, tmp_path_factory), docker_host=host)
    try:
        async with (
            running_worker(settings),
            running_api(settings) as url,
            Client(url, token=TOKENS["admin"]) as client,
            aiodocker.Docker(url=host) as docker,
        ):
            record = await client.create(preload_images=[TEST_IMAGE])
            events = await client.wait_for(record.id, {"session.ready", "session.failed"}, timeout=90)
            assert events[-1].type == "session.ready", [e.data for e in events]
            yield Desktop(host, record.id, docker, DesktopFiles(docker))
    finally:
        remove_sandbox_objects(host, settings.sandbox_id)


async def random_chunks(total: int, digest: hashlib._Hash, size: int = 1 << 20) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        chunk = os.urandom(min(size, total - sent))
        digest.update(chunk)
        sent += len(chunk)
        yield chunk


async def chunks_of(data: bytes, size: int = 1 << 16) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


async def read_all(desktop: Desktop, path: str) -> tuple[FileKind, int | None, bytes]:
    read = await desktop.files.read(desktop.sid, path)
    data = bytearray()
    async for chunk in read.chunks:
        data += chunk
    return read.kind, read.size, bytes(data)


async def no_uploads_left(desktop: Desktop, directory: str, timeout: float = 10) -> None:
    """Wait until no temporary upload file is left in ``directory``; fail loudly if one stays."""
    deadline = time.monotonic() + timeout
    while True:
        left = await desktop.run("find", directory, "-maxdepth", "1", "-name", ".orch-upload.*")
        if not left:
            return
        assert time.monotonic() < deadline, f"temporary uploads left: {left}"
        await asyncio.sleep(0.1)


# -- files ----------------------------------------------------------------------------------


async def test_a_100_mb_binary_file_makes_the_round_trip_unchanged(desktop: Desktop) -> None:
    sent, received = hashlib.sha256(), hashlib.sha256()
    total = 100 * MB
    started = time.monotonic()
    assert await desktop.files.write(desktop.sid, "/tmp/big.bin", random_chunks(total, sent), tar=False) == total
    written = time.monotonic() - started
    # The desktop's own view of it: every byte, no trailer, nothing left behind.
    assert (await desktop.run("sha256sum", "/tmp/big.bin")).split()[0] == sent.hexdigest()
    await no_uploads_left(desktop, "/tmp")

    started = time.monotonic()
    read = await desktop.files.read(desktop.sid, "/tmp/big.bin")
    assert (read.kind, read.size) == (FileKind.FILE, total)  # known before the first byte
    got = 0
    async for chunk in read.chunks:
        received.update(chunk)
        got += len(chunk)
    print(f"100 MB: write {total / written / MB:.0f} MB/s, read {total / (time.monotonic() - started) / MB:.0f} MB/s")
    assert (got, received.hexdigest()) == (total, sent.hexdigest())


async def test_a_written_file_belongs_to_the_desktops_user_never_the_sandboxs_root(desktop: Desktop) -> None:
    await desktop.files.write(desktop.sid, "/root/owned.txt", chunks_of(b"mine\n"), tar=False)
    # uid 0 of the desktop's namespaces, made with the shell's mode (0666 less the umask)...
    assert await desktop.run("stat", "-c", "%u %g %a", "/root/owned.txt") == "0 0 644"
    # ...which is an unprivileged uid of the sandbox: not the sandbox's root (docker cp's).
    base = int(await desktop.outside("stat", "-c", "%u", "/root/owned.txt"))
    assert base >= 65536, base
    assert await desktop.run("cat", "/root/owned.txt") == "mine"

    # As another user of the desktop: theirs.
    await desktop.files.write(desktop.sid, "/tmp/nobodys.txt", chunks_of(b"x"), tar=False, user="nobody")
    assert await desktop.run("stat", "-c", "%u", "/tmp/nobodys.txt") == "65534"

    # Replacing a file keeps its mode and owner; the bytes are the new ones.
    await desktop.run("sh", "-c", "echo old > /tmp/kept && chmod 0640 /tmp/kept && chown nobody /tmp/kept")
    assert await desktop.files.write(desktop.sid, "/tmp/kept", chunks_of(b"new"), tar=False) == 3
    assert await desktop.run("sh", "-c", "stat -c '%a %u' /tmp/kept && cat /tmp/kept") == "640 65534\nnew"

    # Through a symlink: the file it points to is replaced, the link stays.
    await desktop.run("ln", "-sfn", "/tmp/kept", "/tmp/link")
    await desktop.files.write(desktop.sid, "/tmp/link", chunks_of(b"via link"), tar=False)
    assert await desktop.run("sh", "-c", "readlink /tmp/link && cat /tmp/kept") == "/tmp/kept\nvia link"

    # An empty file is a file.
    assert await desktop.files.write(desktop.sid, "/tmp/empty", chunks_of(b""), tar=False) == 0
    assert await read_all(desktop, "/tmp/empty") == (FileKind.FILE, 0, b"")


def tar_of(entries: dict[str, tuple[int, bytes | None]]) -> bytes:
    """A tar of ``name: (mode, content)``; content None is a directory."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, (mode, content) in entries.items():
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.mtime = mode, 1234, 1234, 1_700_000_000
            if content is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
        link = tarfile.TarInfo("tree/to-run")
        link.type, link.linkname = tarfile.SYMTYPE, "bin/run.sh"
        archive.addfile(link)
    return out.getvalue()


TREE = {
    "tree": (0o755, None),
    "tree/bin": (0o750, None),
    "tree/bin/run.sh": (0o755, b"#!/bin/sh\necho run\n"),
    "tree/secret": (0o600, b"s3cret"),
    "tree/deep/er/est/file.txt": (0o644, b"deep\n" * 1000),
}


async def test_a_directory_travels_as_a_tar_both_ways(desktop: Desktop) -> None:
    # Into a directory that does not exist yet: made, with its parents.
    archive = tar_of(TREE)
    assert await desktop.files.write(desktop.sid, "/tmp/up/here", chunks_of(archive, 1000), tar=True) == len(archive)
    listed = await desktop.run("find", "/tmp/up/here", "-mindepth", "1", "-printf", "%P %y %m %U\\n")
    assert sorted(listed.splitlines()) == [
        "tree d 755 0",
        "tree/bin d 750 0",
        "tree/bin/run.sh f 755 0",
        "tree/deep d 755 0",  # made for the file, by tar
        "tree/deep/er d 755 0",
        "tree/deep/er/est d 755 0",
        "tree/deep/er/est/file.txt f 644 0",
        "tree/secret f 600 0",
        "tree/to-run l 777 0",
    ]  # the archive's modes; the owner is the writer (1234 in the archive), as docker cp does
    assert await desktop.run("/tmp/up/here/tree/to-run") == "run"

    # Out again: a tar of the directory, its modes and bytes as they are in the desktop.
    kind, size, out = await read_all(desktop, "/tmp/up/here/tree")
    assert (kind, size) == (FileKind.DIRECTORY, None)
    with tarfile.open(fileobj=io.BytesIO(out)) as back:
        members = {m.name.removeprefix("./"): m for m in back.getmembers() if m.name != "."}
        assert sorted(members) == [
            "bin",
            "bin/run.sh",
            "deep",
            "deep/er",
            "deep/er/est",
            "deep/er/est/file.txt",
            "secret",
            "to-run",
        ]
        for name, (mode, content) in TREE.items():
            if name == "tree":
                continue
            member = members[name.removeprefix("tree/")]
            assert member.mode == mode, (name, oct(member.mode))
            if content is not None:
                extracted = back.extractfile(member)
                assert extracted is not None and extracted.read() == content, name
        assert members["to-run"].issym() and members["to-run"].linkname == "bin/run.sh"


async def test_refusals_name_what_is_wrong(desktop: Desktop) -> None:
    files, sid = desktop.files, desktop.sid
    await desktop.run("sh", "-c", "mkfifo /tmp/fifo; ln -sfn /proc /tmp/to-proc; echo hi > /tmp/plain")

    async def write_error(path: str, *, tar: bool = False, user: str | None = None) -> tuple[str, str]:
        asked = []

        async def upload() -> AsyncIterator[bytes]:
            asked.append(True)
            yield b"data"

        with pytest.raises(FileError) as caught:
            await files.write(sid, path, upload(), tar=tar, user=user)
        # Refused before a byte of the upload was asked for (the API can answer before reading
        # the body), except for what only the bytes can tell (a tar that is not one).
        assert asked == ([True] if path == "/tmp/not-a-tar" else []), path
        return caught.value.code, caught.value.message

    async def read_error(path: str) -> tuple[str, str]:
        with pytest.raises(FileError) as caught:
            await files.read(sid, path)
        return caught.value.code, caught.value.message

    assert await write_error("tmp/relative") == (
        "invalid_path",
        "path must be absolute (start with /), got 'tmp/relative'",
    )
    assert (await read_error("relative"))[0] == "invalid_path"
    assert await write_error("/tmp/../etc/passwd") == ("invalid_path", "path must not contain a '..' component")
    assert await read_error("/no/such/file") == ("not_found", "/no/such/file does not exist")
    assert await write_error("/no/such/dir/file") == ("not_found", "/no/such/dir does not exist")
    assert await write_error("/tmp/plain/file") == ("not_a_directory", "/tmp/plain is not a directory")
    assert await read_error("/tmp/plain/file") == ("not_a_directory", "/tmp/plain is not a directory")
    assert await write_error("/tmp/plain", tar=True) == ("not_a_directory", "/tmp/plain is not a directory")
    assert await write_error("/tmp") == ("is_a_directory", "/tmp is a directory")
    assert await write_error("/tmp/fifo") == ("invalid_path", "/tmp/fifo is not a regular file")
    assert await read_error("/tmp/fifo") == ("invalid_path", "/tmp/fifo is not a regular file or a directory")
    assert await read_error("/tmp/to-proc/cpuinfo") == (
        "invalid_path",
        "/tmp/to-proc/cpuinfo resolves to /proc/cpuinfo, in a pseudo filesystem",
    )
    assert await write_error("/root/theirs", user="nobody") == ("permission_denied", "/root is not writable by nobody")
    assert await write_error("/root/sub/dir", tar=True, user="nobody") == (
        "permission_denied",
        "/root is not writable by nobody",
    )
    assert (await write_error("/tmp/x", user="no-such-user"))[0] == "unknown_user"
    with pytest.raises(FileError) as caught:
        await files.list(sid, "/tmp/plain")
    assert caught.value.code == "not_a_directory"
    # A tar that is not one: tar's own words, and the directory it was for stays as it was.
    code, message = await write_error("/tmp/not-a-tar", tar=True)
    assert code == "file_failed" and "tar could not extract" in message, message
    with pytest.raises(FileError) as caught:
        await files.read("s-no-such-session", "/tmp")
    assert caught.value.code == "desktop_gone"
    # None of it left a temporary file behind.
    await no_uploads_left(desktop, "/tmp")


async def test_an_interrupted_upload_leaves_the_file_as_it_was(desktop: Desktop) -> None:
    await desktop.run("sh", "-c", "echo before > /tmp/precious")

    class SenderGone(Exception):
        pass

    async def stops_midway() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * (1 << 20)
        raise SenderGone

    with pytest.raises(SenderGone):
        await desktop.files.write(desktop.sid, "/tmp/precious", stops_midway(), tar=False)
    await no_uploads_left(desktop, "/tmp")
    assert await desktop.run("cat", "/tmp/precious") == "before"


async def test_a_read_given_up_midway_ends_in_the_desktop_too(desktop: Desktop) -> None:
    await desktop.run("sh", "-c", "head -c 50000000 /dev/zero > /tmp/abandoned")
    read = await desktop.files.read(desktop.sid, "/tmp/abandoned")
    assert (read.kind, read.size) == (FileKind.FILE, 50 * MB)
    async for chunk in read.chunks:
        assert chunk
        break
    await read.aclose()
    # The script's cat (its args: just "cat") sees its output closed and ends.
    deadline = time.monotonic() + 10
    while "cat" in (await desktop.run("ps", "-eo", "args")).splitlines():
        assert time.monotonic() < deadline, "the read's process still runs in the desktop"
        await asyncio.sleep(0.1)


async def test_a_listing_says_what_each_entry_is(desktop: Desktop) -> None:
    await desktop.run(
        "sh", "-c", "mkdir -p /tmp/ls/sub && printf abc > /tmp/ls/f && chmod 4750 /tmp/ls/f && "
        "ln -s f /tmp/ls/link && mkfifo /tmp/ls/pipe && touch -d @1700000000.5 /tmp/ls/f",
    )  # fmt: skip
    entries = await desktop.files.list(desktop.sid, "/tmp/ls")
    assert [(e.name, e.kind, e.mode) for e in entries] == [
        ("f", FileKind.FILE, 0o4750),
        ("link", FileKind.SYMLINK, 0o777),
        ("pipe", FileKind.OTHER, 0o644),
        ("sub", FileKind.DIRECTORY, 0o755),
    ]
    f = entries[0]
    assert (f.size, f.mtime) == (3, 1_700_000_000.5)
    assert len(await desktop.files.list(desktop.sid, "/tmp/ls", limit=2)) == 2


# -- ports ----------------------------------------------------------------------------------

HTTP_GET = b"GET / HTTP/1.0\r\nHost: desktop\r\n\r\n"


async def get(desktop: Desktop, port: int, timeout: float = 20) -> bytes:
    """GET / on the desktop's 127.0.0.1:``port`` through its network namespace, once something
    listens there (port_closed until then); fails saying what it saw at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader, writer = await open_desktop_port(desktop.docker, desktop.sid, port, timeout_s=5)
            break
        except PortError as e:
            assert e.code == "port_closed", (e.code, e.message)
            assert time.monotonic() < deadline, f"nothing listened on port {port} within {timeout} s"
            await asyncio.sleep(0.1)
    try:
        writer.write(HTTP_GET)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def test_a_server_on_the_desktops_loopback_only_is_reached(desktop: Desktop) -> None:
    await desktop.run("sh", "-c", "mkdir -p /tmp/www && echo served-on-loopback > /tmp/www/index.html")
    await adocker(
        "exec", "-d", desktop.name, "desktop-enter",
        "python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory", "/tmp/www", "8123",
        host=desktop.host,
    )  # fmt: skip
    answer = await get(desktop, 8123)
    assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"served-on-loopback\n"), answer
    # It is the namespaces' loopback: the desktop's outer side has nothing on that port.
    probe = "import socket; s = socket.socket(); print(s.connect_ex(('127.0.0.1', 8123)))"
    assert await desktop.outside("python3", "-c", probe) != "0"


async def test_a_port_published_by_the_desktops_dockerd_is_reached(desktop: Desktop) -> None:
    await desktop.run(
        "docker", "run", "-d", "--name", "published", "-p", "8000:80", TEST_IMAGE,
        "sh", "-c", "mkdir -p /www && echo published-by-dockerd > /www/index.html && exec httpd -f -p 80 -h /www",
    )  # fmt: skip
    answer = await get(desktop, 8000)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"published-by-dockerd\n"), answer


async def test_a_closed_port_and_a_gone_desktop_are_told_apart(desktop: Desktop) -> None:
    with pytest.raises(PortError) as caught:
        await open_desktop_port(desktop.docker, desktop.sid, 8999, timeout_s=5)
    assert caught.value.code == "port_closed"
    with pytest.raises(PortError) as caught:
        await open_desktop_port(desktop.docker, "s-no-such-session", 8000, timeout_s=5)
    assert caught.value.code == "desktop_gone"


async def test_a_stopped_desktop_is_gone_and_an_unseen_one_unreachable(desktop: Desktop) -> None:
    # A desktop container that exists but does not run: Docker refuses the exec (409), its
    # inspect says so.
    stopped = "s-stopped-" + os.urandom(4).hex()
    await adocker("create", "--name", desktop_name(stopped), TEST_IMAGE, "true", host=desktop.host)
    try:
        with pytest.raises(FileError) as caught:
            await desktop.files.list(stopped, "/")
        assert caught.value.code == "desktop_gone", caught.value.message
        with pytest.raises(PortError) as port_caught:
            await open_desktop_port(desktop.docker, stopped, 80, timeout_s=5)
        assert port_caught.value.code == "desktop_gone", port_caught.value.message
    finally:
        await adocker("rm", "-f", desktop_name(stopped), host=desktop.host)
    # A worker that does not share the sandbox dockerd's pid namespace: the pid Docker gives
    # names nothing here (or another process), which is told apart from a closed port.
    blind = DesktopPorts(desktop.docker, visible=lambda pid, container: False)
    with pytest.raises(PortError) as port_caught:
        await blind.open(desktop.sid, 8000, timeout_s=5)
    assert port_caught.value.code == "port_unreachable", port_caught.value.message


# The shape of a userns desktop's network (a network namespace owned by a user namespace of its
# own, a pid namespace down), entered from a sandbox container started as docker-compose.yml
# starts it (its capabilities and seccomp profile): where the worker really runs.
IN_SANDBOX = r"""
import asyncio, os, subprocess
from workers.runtime.netns import namespaces_pid, socket_in_namespace
SERVE = ("import socket; s = socket.socket(); s.bind(('127.0.0.1', 7000)); s.listen(); print('up', flush=True);"
         " c, _ = s.accept(); c.sendall(b'hello-from-the-namespace'); c.close()")
async def main():
    server = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "sh", "-c",
         f'ip link set lo up && exec python3 -c "{SERVE}"'],
        stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "up"
    sock = await socket_in_namespace(namespaces_pid(os.getpid()))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", 7000))
    reader, _ = await asyncio.open_connection(sock=sock)
    print((await reader.read()).decode())
asyncio.run(main())
"""


async def test_the_namespace_is_entered_with_the_sandbox_containers_privileges(docker_host: str) -> None:
    out = await adocker(
        "run", "--rm", *compose_sandbox_flags(), "-v", f"{PROJECT_ROOT}:/src:ro", "-e", "PYTHONPATH=/src",
        "--entrypoint", "python3", SANDBOX_IMAGE, "-c", IN_SANDBOX,
        host=docker_host, timeout=60,
    )  # fmt: skip
    assert out == "hello-from-the-namespace"
