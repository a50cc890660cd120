"""The local half of ``sessions cp`` (``Client.upload_path``, ``Client.download_to``): what is
sent from this machine's files and where what comes back is written. No HTTP here; tarfile
runs in threads, fed through pipes, so neither side holds a whole tree in memory."""

from __future__ import annotations

import os
import tarfile
from collections.abc import AsyncIterator

import anyio

_CHUNK = 1 << 20


async def upload_source(local: str, path: str) -> tuple[str, AsyncIterator[bytes], bool]:
    """What uploading ``local`` to ``path`` sends: (the desktop's path, the bytes, whether they
    are a tar). A directory's contents go as a tar into the directory ``path``; a file goes to
    the file ``path``, or into it when it ends with /."""
    if await anyio.Path(local).is_dir():
        return path, _tar_of(local), True
    if path.endswith("/"):
        path += os.path.basename(local)
    return path, _chunks_of(local), False


async def save(chunks: AsyncIterator[bytes], local: str, *, tar: bool, remote_path: str) -> int:
    """Write a download to ``local``: a tar extracted into the directory ``local`` (made if
    missing), or a file to ``local`` (into it, named as ``remote_path``, when it is a
    directory). The bytes read."""
    if tar:
        await anyio.Path(local).mkdir(parents=True, exist_ok=True)
        return await _untar(chunks, local)
    if await anyio.Path(local).is_dir():
        local = os.path.join(local, os.path.basename(remote_path.rstrip("/")))
    total = 0
    async with await anyio.open_file(local, "wb") as out:
        async for chunk in chunks:
            total += len(chunk)
            await out.write(chunk)
    return total


async def _chunks_of(local: str) -> AsyncIterator[bytes]:
    async with await anyio.open_file(local, "rb") as source:
        while chunk := await source.read(_CHUNK):
            yield chunk


async def _tar_of(local: str) -> AsyncIterator[bytes]:
    """A tar of the directory's contents, made in a thread into a pipe as it is sent."""
    read_end, write_end = os.pipe()

    def make() -> None:
        with os.fdopen(write_end, "wb") as sink, tarfile.open(fileobj=sink, mode="w|") as tar:
            for name in sorted(os.listdir(local)):
                tar.add(os.path.join(local, name), arcname=name)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(anyio.to_thread.run_sync, make)
        with os.fdopen(read_end, "rb") as source:
            while chunk := await anyio.to_thread.run_sync(source.read, _CHUNK):
                yield chunk


async def _untar(chunks: AsyncIterator[bytes], local: str) -> int:
    """Extract a streamed tar into ``local`` (tarfile's ``data`` filter: nothing outside it,
    no devices, no setuid bits), fed from the response through a pipe."""
    read_end, write_end = os.pipe()
    total = 0

    def extract() -> None:
        with os.fdopen(read_end, "rb") as source, tarfile.open(fileobj=source, mode="r|") as tar:
            tar.extractall(local, filter="data")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(anyio.to_thread.run_sync, extract)
        with os.fdopen(write_end, "wb") as sink:
            async for chunk in chunks:
                total += len(chunk)
                await anyio.to_thread.run_sync(sink.write, chunk)
    return total
