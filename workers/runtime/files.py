"""Files in a desktop, streamed both ways: a file written (atomically: a temporary name in its
directory, then a rename) or a tar extracted, a file or a directory's tar read, a directory
listed. Each is one docker exec of a small POSIX sh script through ``enter_argv`` (enter.py),
so it runs where the user's commands run: inside a userns desktop's namespaces, as its root or
the user asked. What it writes belongs to that user (uid 0 inside, never the sandbox's root,
which is what ``docker cp`` would give: an unmapped uid, ``nobody`` inside), and it sees the
desktop's mounts as the user does.

Nothing is held whole in memory: stdin is written a chunk at a time, each write waiting for
the connection to drain (backpressure reaches the sender), and output is handed on as Docker
delivers it. The scripts say what went wrong on stderr (``orch-files: CODE: message``, exit 3),
which becomes a ``FileError`` with that code.

A file upload ends with a trailer (a per-upload nonce and the byte count) that the script
checks and cuts off before the rename: an upload whose sender stopped, or whose worker died,
ends without it, and its temporary file is removed instead of replacing the target. A tar
upload has no such guard (tar extracts as it reads): an interrupted one leaves what it had
extracted, as ``docker cp`` does."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import get_args

import aiodocker
from aiodocker.exceptions import DockerError
from aiodocker.stream import Stream

from orchestrator.desktop_io import FileEntry, FileErrorCode, FileKind
from orchestrator.desktop_paths import check_desktop_path
from orchestrator.errors import CodedError, ServiceError
from orchestrator.exec_types import OutputStream
from orchestrator.names import desktop_name

from .enter import enter_argv
from .execs import DockerExecProcess, _close_stdin

CODES: frozenset[str] = frozenset(get_args(FileErrorCode))
# What the scripts keep of stderr for a message (its end, where the reason is).
STDERR_KEPT = 8192
MAX_HEADER = 64
LIST_LIMIT = 10_000
_KINDS = {"f": FileKind.FILE, "d": FileKind.DIRECTORY, "l": FileKind.SYMLINK}


class FileError(CodedError):
    code: FileErrorCode

    def __init__(self, code: FileErrorCode, message: str) -> None:
        super().__init__(code, message)


# Shared by every script. $real: the path with its symlinks resolved as far as they exist;
# nothing resolving into a pseudo filesystem is read or written (the edge refused the names,
# this refuses the links). `missing` says why a path is not there: its first existing
# ancestor is a file, or may not be searched, or the path just does not exist.
PRELUDE = r"""
fail() { printf 'orch-files: %s: %s\n' "$1" "$2" >&2; exit 3; }
me() { id -un 2>/dev/null || id -u; }
check_real() {
  real=$(realpath -m -- "$1") || fail file_failed "could not resolve $1"
  case "$real" in
    /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) fail invalid_path "$1 resolves to $real, in a pseudo filesystem" ;;
  esac
}
ancestor() {  # up: the nearest ancestor of $1 that exists
  up=$1
  while [ "$up" != / ]; do
    up=${up%/*}; [ -n "$up" ] || up=/
    [ ! -e "$up" ] || return 0
  done
}
missing() {
  ancestor "$1"
  [ -d "$up" ] || fail not_a_directory "$up is not a directory"
  [ -x "$up" ] || fail permission_denied "$up may not be searched by $(me)"
  fail not_found "$1 does not exist"
}
"""

# $1 the path, $2 the upload's nonce. The target is the resolved path: writing to a symlink
# replaces the file it points to, never the link. An existing file keeps its mode (and, when
# root writes, its owner); a new one gets 0666 less the umask, as a shell's `>` makes it.
WRITE_FILE = (
    PRELUDE
    + r"""
check_real "$1"
nonce=$2 target=$real
[ ! -d "$target" ] || fail is_a_directory "$1 is a directory"
dir=${target%/*}; [ -n "$dir" ] || dir=/
[ -e "$dir" ] || missing "$dir"
[ -d "$dir" ] || fail not_a_directory "$dir is not a directory"
[ ! -e "$target" ] || [ -f "$target" ] || fail invalid_path "$1 is not a regular file"
{ [ -w "$dir" ] && [ -x "$dir" ]; } || fail permission_denied "$dir is not writable by $(me)"
[ ! -e "$target" ] || [ -w "$target" ] || fail permission_denied "$1 is not writable by $(me)"
tmp=$(mktemp -p "$dir" .orch-upload.XXXXXXXXXX) || fail file_failed "could not make a temporary file in $dir"
trap 'rm -f -- "$tmp"' EXIT
trap 'exit 129' HUP INT TERM PIPE
echo ready
cat > "$tmp" || fail file_failed "could not write $1"
size=$(stat -c %s -- "$tmp")
n=$((size - 36))
{ [ "$n" -ge 0 ] && [ "$(tail -c 36 -- "$tmp")" = "$nonce$(printf %020d "$n")" ]; } \
  || fail file_failed "the upload of $1 ended before its end"
truncate -s "$n" -- "$tmp" || fail file_failed "could not write $1"
if [ -e "$target" ]; then
  chmod --reference="$target" -- "$tmp"
  [ "$(id -u)" != 0 ] || chown --reference="$target" -- "$tmp" 2>/dev/null || :
else
  chmod "$(printf %o $((0666 & ~$(umask))))" -- "$tmp"
fi
mv -f -- "$tmp" "$target" || fail file_failed "could not rename the upload to $1"
echo "$n"
"""
)

# $1 the directory (made with its parents if missing). Owners are the writer's, as docker cp
# does by default; modes are the archive's. Bytes after the archive's end are read and dropped,
# so the sender never writes into a closed pipe.
WRITE_TAR = (
    PRELUDE
    + r"""
check_real "$1"
dest=$real
if [ -e "$dest" ]; then
  [ -d "$dest" ] || fail not_a_directory "$1 is not a directory"
elif ! mkdir -p -- "$dest" 2>/dev/null; then
  ancestor "$dest"
  [ -d "$up" ] || fail not_a_directory "$up is not a directory"
  [ -w "$up" ] || fail permission_denied "$up is not writable by $(me)"
  fail file_failed "could not make the directory $1"
fi
{ [ -w "$dest" ] && [ -x "$dest" ]; } || fail permission_denied "$1 is not writable by $(me)"
echo ready
tar -x -f - -C "$dest" --no-same-owner --preserve-permissions \
  || fail file_failed "tar could not extract the archive into $1"
cat > /dev/null
"""
)

# $1 the path. The first line on stdout says what follows: `file SIZE` (then its bytes) or
# `directory` (then a tar of it). A tar of / leaves out the pseudo filesystems.
READ = (
    PRELUDE
    + r"""
check_real "$1"
p=$real
[ -e "$p" ] || missing "$1"
if [ -d "$p" ]; then
  { [ -r "$p" ] && [ -x "$p" ]; } || fail permission_denied "$1 may not be read by $(me)"
  echo directory
  if [ "$p" = / ]; then set -- --exclude=./proc --exclude=./sys --exclude=./dev; else set --; fi
  exec tar -c -f - -C "$p" --warning=no-file-ignored "$@" .
fi
[ -f "$p" ] || fail invalid_path "$1 is not a regular file or a directory"
[ -r "$p" ] || fail permission_denied "$1 may not be read by $(me)"
exec 3< "$p"
echo "file $(stat -L -c %s /proc/self/fd/3)"
exec cat <&3
"""
)

# $1 the directory, $2 the most entries. Five NUL-terminated fields an entry (a name may hold
# any byte but / and NUL): name, type (find's %y), size, permission bits (octal), mtime.
LIST = (
    PRELUDE
    + r"""
check_real "$1"
p=$real
[ -e "$p" ] || missing "$1"
[ -d "$p" ] || fail not_a_directory "$1 is not a directory"
{ [ -r "$p" ] && [ -x "$p" ]; } || fail permission_denied "$1 may not be read by $(me)"
find -H "$p" -mindepth 1 -maxdepth 1 -printf '%f\0%y\0%s\0%m\0%T@\0' 2>/dev/null | head -z -n "$(($2 * 5))"
"""
)


class FileRead:
    """A read under way: what it is (known before its first byte) and its bytes. ``chunks``
    raises FileError if the read fails past its start (the file shrank, tar failed); the
    caller then has a partial stream to abort. ``aclose`` ends it early."""

    def __init__(self, kind: FileKind, size: int | None, chunks: AsyncIterator[bytes]) -> None:
        self.kind = kind
        self.size = size
        self._chunks = chunks

    @property
    def chunks(self) -> AsyncIterator[bytes]:
        return self._chunks

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()


class _Run:
    """One script's exec: its stdout as it comes (``stdout``, one iterator for the whole run),
    stderr's end kept on the side for a message."""

    def __init__(self, process: DockerExecProcess, stream: Stream) -> None:
        self.process = process
        self.stream = stream
        self._output = process.output()
        self.stderr = bytearray()
        self.stdout = self._stdout()

    async def _stdout(self) -> AsyncGenerator[bytes, None]:
        async for stream, data in self._output:
            if stream is OutputStream.STDOUT:
                yield data
            else:
                self.stderr += data
                del self.stderr[:-STDERR_KEPT]

    async def error(self) -> FileError:
        """Why the script failed (after its output ended)."""
        return script_error(await self.process.exit_code(), bytes(self.stderr))

    async def close(self) -> None:
        """Ends the exec's connection; a script still running sees its stdout closed (and its
        stdin end) and ends."""
        with contextlib.suppress(Exception):
            await self.stdout.aclose()
            await self._output.aclose()  # type: ignore[attr-defined]  # an async generator
        await self.process.close()


async def _send(stream: Stream, data: bytes) -> bool:
    """Write to the script's stdin, waiting for the connection to drain; False once it closed
    under the writes (the script ended: its end says why)."""
    try:
        await stream.write_in(data)
    except (ConnectionError, RuntimeError):  # aiohttp's "Connection lost", aiodocker's "closed transport"
        return False
    return True


async def first_line(run: _Run) -> tuple[bytes, bytes] | None:
    """The script's first line on stdout and what came after it in the same chunks; None if
    its stdout ended first (it failed: ``run.error()`` says why)."""
    head = bytearray()
    async for data in run.stdout:
        head += data
        if b"\n" in head or len(head) > MAX_HEADER:
            break
    line, newline, rest = bytes(head).partition(b"\n")
    if newline:
        return line, rest
    if len(head) > MAX_HEADER:
        raise FileError("file_failed", f"the desktop answered {bytes(head[:MAX_HEADER])!r}")
    return None


def script_error(exit_code: int | None, stderr: bytes) -> FileError:
    """The FileError a script's end means: its own coded line, or desktop-enter's and the
    wrapper's exits, or file_failed with the end of what it said."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    for index in range(len(lines) - 1, -1, -1):
        code, _, message = lines[index].removeprefix("orch-files: ").partition(": ")
        if lines[index].startswith("orch-files: ") and code in CODES:
            said = [line for line in lines[:index] if not line.startswith("orch-files: ")][-2:]
            return FileError(code, message + (f" ({'; '.join(said)})" if said else ""))  # type: ignore[arg-type]
    tail = "; ".join(lines[-3:]) or "no message"
    if exit_code == 125:  # desktop-enter: the namespaces are not up (starting, or gone)
        return FileError("desktop_gone", f"the desktop is not running: {tail}")
    if exit_code == 126 and "no user" in tail:  # the wrapper (enter.py)
        return FileError("unknown_user", tail)
    return FileError("file_failed", f"the file operation failed (exit {exit_code}): {tail}")


class DesktopFiles:
    """Files of the desktops on one Docker daemon (the sandbox's)."""

    def __init__(self, docker: aiodocker.Docker) -> None:
        self._docker = docker

    async def _start(self, session_id: str, script: str, args: Sequence[str], *, user: str | None, stdin: bool) -> _Run:
        try:  # the API checked it already; a caller that did not gets the same answer
            args = [check_desktop_path(args[0]), *args[1:]]
        except ServiceError as e:
            raise FileError("invalid_path", e.message) from e
        argv = enter_argv(["/bin/sh", "-c", script, "orch-files", *args], env={}, cwd="/", user=user)
        container = self._docker.containers.container(desktop_name(session_id))
        try:
            exec_ = await container.exec(argv, stdin=stdin, tty=False)
        except DockerError as e:
            if e.status in (404, 409):  # no desktop, or not running
                raise FileError("desktop_gone", f"the desktop is not running: {e.message}") from e
            raise FileError("file_failed", f"docker refused the exec: {e.message}") from e
        stream = exec_.start(detach=False)
        try:
            await stream.__aenter__()
        except DockerError as e:
            await stream.close()
            raise FileError("file_failed", f"docker could not start the exec: {e.message}") from e
        return _Run(DockerExecProcess(exec_, stream), stream)

    async def write(
        self, session_id: str, path: str, chunks: AsyncIterator[bytes], *, tar: bool, user: str | None = None
    ) -> int:
        """Write ``chunks`` to the file ``path`` (its directory must exist), or with ``tar``
        extract them into the directory ``path`` (made if missing); the bytes received. A
        refusal of the path (not_found, permission_denied...) comes before the first chunk is
        asked for: the caller has not read a byte of its upload then."""
        nonce = secrets.token_hex(8)
        run = await self._start(
            session_id, WRITE_TAR if tar else WRITE_FILE, [path] if tar else [path, nonce], user=user, stdin=True
        )
        sent = 0
        try:
            first = await first_line(run)  # `ready` once the script's checks passed
            if first is None:
                raise await run.error()
            if first[0] != b"ready":
                raise FileError("file_failed", f"the desktop answered {first[0]!r}")
            said = bytearray(first[1])

            async def collect() -> None:
                async for data in run.stdout:
                    said.extend(data[: MAX_HEADER - len(said)])

            output = asyncio.create_task(collect())
            try:
                async for chunk in chunks:
                    if output.done():  # the script ended early: it says why below
                        break
                    if chunk and not await _send(run.stream, chunk):
                        break
                    sent += len(chunk)
                else:
                    if tar or await _send(run.stream, f"{nonce}{sent:020d}".encode()):
                        _close_stdin(run.stream)
                await output
            finally:
                output.cancel()
        finally:
            await run.close()
        if await run.process.exit_code() != 0:
            raise await run.error()
        if not tar and said.strip() != str(sent).encode():
            wrote = said.strip().decode(errors="replace")
            raise FileError("file_failed", f"the desktop wrote {wrote!r}, not {sent} bytes")
        return sent

    async def read(self, session_id: str, path: str, *, user: str | None = None) -> FileRead:
        """Start reading ``path``: a file's bytes or a directory's tar, and which it is first."""
        run = await self._start(session_id, READ, [path], user=user, stdin=False)
        try:
            first = await first_line(run)  # what follows: `file SIZE` or `directory`
            if first is None:
                raise await run.error()
            line, rest = first
            kind, _, size_text = line.decode(errors="replace").partition(" ")
            if kind == "directory":
                return FileRead(FileKind.DIRECTORY, None, self._content(run, rest, None))
            if kind == "file" and size_text.isdigit():
                size = int(size_text)
                return FileRead(FileKind.FILE, size, self._content(run, rest, size))
            raise FileError("file_failed", f"the desktop answered {line!r}")
        except BaseException:
            await run.close()
            raise

    async def _content(self, run: _Run, first: bytes, size: int | None) -> AsyncIterator[bytes]:
        try:
            got = 0
            if first:
                got += len(first)
                yield first if size is None else first[:size]
            async for data in run.stdout:
                if size is not None and got + len(data) > size:  # it grew meanwhile: the size said goes
                    data = data[: size - got]
                got += len(data)
                if data:
                    yield data
                if size is not None and got >= size:
                    break
            else:
                code = await run.process.exit_code()
                # tar's 1: a file changed while it was read (its archive is still whole).
                if code != 0 and not (size is None and code == 1):
                    raise await run.error()
            if size is not None and got < size:
                raise FileError("file_failed", f"the file shrank while it was read: {got} of {size} bytes")
        finally:
            await run.close()

    async def list(
        self, session_id: str, path: str, *, user: str | None = None, limit: int = LIST_LIMIT
    ) -> list[FileEntry]:
        """The entries of the directory ``path`` (at most ``limit``, by name)."""
        run = await self._start(session_id, LIST, [path, str(limit)], user=user, stdin=False)
        try:
            raw = bytearray()
            async for data in run.stdout:
                raw += data
            code = await run.process.exit_code()
            if code != 0:
                raise await run.error()
        finally:
            await run.close()
        fields = bytes(raw).split(b"\0")[:-1]
        entries = []
        for at in range(0, len(fields) - 4, 5):
            name, kind, size, mode, mtime = fields[at : at + 5]
            entries.append(
                FileEntry(
                    name=name.decode(errors="replace"),
                    kind=_KINDS.get(kind.decode(), FileKind.OTHER),
                    size=int(size),
                    mode=int(mode, 8),
                    mtime=float(mtime),
                )
            )
        return sorted(entries, key=lambda entry: entry.name)
