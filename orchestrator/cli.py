"""``orchestrator``: serve the API, run a worker, manage sessions, follow events.

Exit codes: 0 ok; 1 the API refused (its code and message are printed); 2 usage;
3 the session failed; 4 timed out waiting; 5 the API could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import termios
import tty
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import anyio
import httpx
import msgspec
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import tracing
from .auth import SCOPES, new_token, token_entry
from .client import ApiError, Client
from .names import SESSION_ID_RE, TENANT_RE
from .placement import low_disk

EXIT_API, EXIT_USAGE, EXIT_FAILED, EXIT_TIMEOUT, EXIT_UNREACHABLE = 1, 2, 3, 4, 5
# Colors and the spinner only on a terminal; pipes and scripts get plain text.
console = Console(highlight=False)


# C0 controls (ESC among them), DEL and C1: what another client put in a label, an id or an
# error text must not drive the operator's terminal (L7).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _plain(text: object) -> str:
    """A value from the API as printable text: control characters dropped."""
    return _CONTROL.sub("", str(text))


def _markup(text: object) -> str:
    """A value from the API for a rich markup string: control characters dropped, markup escaped."""
    return escape(_plain(text))


def _api_url(args: argparse.Namespace) -> str:
    return str(args.api or os.environ.get("ORCH_API_URL") or "http://127.0.0.1:8080")


def _client(args: argparse.Namespace) -> Client:
    return Client(_api_url(args), token=args.token or os.environ.get("ORCH_TOKEN"))


class UsageError(Exception):
    pass


def _labels(items: Sequence[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"label {item!r} must look like key=value")
        labels[key] = value
    return labels


def _tenant(raw: str) -> str:
    if not TENANT_RE.fullmatch(raw):
        raise argparse.ArgumentTypeError(f"a tenant must match {TENANT_RE.pattern}")
    return raw


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _describe(event_type: str, data: dict[str, Any]) -> str:
    if event_type == "dockerd.ready":
        return (
            f"{data.get('storage_driver')} on {data.get('backing_filesystem')}, dockerd "
            f"{data.get('server_version')}, depth {data.get('depth')}, pool {data.get('address_pool')}, "
            f"{data.get('duration_ms')} ms after start"
        )
    if event_type == "display.ready":
        return (
            f"{data.get('width')}x{data.get('height')}x{data.get('depth')} on {data.get('display')}, "
            f"{data.get('duration_ms')} ms after start"
        )
    if event_type == "session.failed":
        return f"{data.get('code')}: {data.get('message')}"
    return ""


STYLES = {
    "ready": "bold green",
    "started": "green",
    "created": "green",
    "failed": "bold red",
    "expired": "yellow",
    "stopped": "yellow",
    "deleted": "yellow",
    "heartbeat": "dim",
}


def _style(event_type: str) -> str:
    return STYLES.get(event_type.rsplit(".", 1)[-1], "cyan")


async def _follow(client: Client, session_id: str, done: set[str], timeout: float, after: str | None = None) -> int:
    """Print a session's events as they arrive, timed from the first, until one of ``done``.
    On a terminal a spinner shows the phase in progress."""
    first: datetime | None = None
    with contextlib.ExitStack() as stack:
        status = stack.enter_context(console.status("waiting for the worker")) if console.is_terminal else None
        try:
            with anyio.fail_after(timeout):
                async for event in client.events(session_id, after=after):
                    ts = datetime.fromisoformat(event.data["ts"])
                    first = first or ts
                    elapsed = (ts - first).total_seconds()
                    details = _describe(event.type, event.data.get("data", {}))
                    console.print(
                        f"  +{elapsed:6.3f}s  [{_style(event.type)}]{_markup(event.type):18}[/] {_markup(details)}",
                        highlight=False,
                        soft_wrap=True,  # one event, one line, whatever the width: scripts read it
                    )
                    if status is not None:
                        status.update(f"{_markup(event.type)} (+{elapsed:.3f}s)")
                    if event.type == "session.failed":
                        return EXIT_FAILED
                    if event.type in done:
                        return 0
        except TimeoutError:
            wanted = " or ".join(sorted(done))
            print(f"orchestrator: no {wanted} for {session_id} within {timeout:g} s", file=sys.stderr)
            return EXIT_TIMEOUT
    return EXIT_UNREACHABLE


def _table(columns: list[str], rows: list[list[str]]) -> None:
    rows = [[_plain(cell) for cell in row] for row in rows]
    if console.is_terminal:
        table = Table(*columns, box=None, header_style="bold")
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        console.print(table)
        return
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    for row in [columns, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


async def _sessions(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        if args.action == "create":
            record = await client.create(args.id, _labels(args.label), args.sandbox)
            print(f"session {_plain(record.id)} on sandbox {_plain(record.sandbox)}: {record.state.value}")
            if args.wait:
                return await _follow(client, record.id, {"session.ready"}, args.timeout)
            return 0
        if args.action == "ls":
            rows = await client.list(args.state, args.label)
            if args.json:
                _print_json(msgspec.to_builtins(rows))
                return 0
            _table(
                ["ID", "STATE", "GEN", "SANDBOX", "UPDATED", "LABELS"],
                [
                    [
                        r.id,
                        r.state.value,
                        str(r.generation),
                        r.sandbox,
                        r.updated_at,
                        ",".join(f"{k}={v}" for k, v in sorted(r.spec.labels.items())),
                    ]
                    for r in rows
                ],
            )
            return 0
        if args.action == "get":
            _print_json(msgspec.to_builtins(await client.get(args.id)))
            return 0
        if args.action == "exec":
            return await _exec(client, args)
        if args.action == "shell":
            return await _shell(client, args)
        if args.action == "cp":
            return await _cp(client, args)
        if args.action == "screenshot":
            return await _screenshot(client, args)
        if args.action == "input":
            return await _input(client, args)
        # --wait follows only what happens from now on: remember where the stream is.
        after = None
        if args.wait:
            async for event in client.events(args.id, follow=False):
                after = event.id
        verbs = {"stop": client.stop, "start": client.start, "rm": client.delete}
        record = await verbs[args.action](args.id)
        print(f"session {_plain(record.id)}: {record.state.value}")
        if args.wait:
            done = {"stop": {"session.stopped"}, "start": {"session.ready"}, "rm": {"session.deleted"}}
            return await _follow(client, record.id, done[args.action], args.timeout, after)
        return 0


async def _exec(client: Client, args: argparse.Namespace) -> int:
    """Run a command in the session's desktop, its output streamed to this process's stdout and
    stderr as it comes; exits with its exit code (124 after its timeout, 137 when killed, 125
    when it could not run)."""
    cmd = list(args.cmd)
    if not cmd:
        print("error: give the command to run after the session id (use -- before its options)", file=sys.stderr)
        return 2
    options: dict[str, Any] = {"env": _labels(args.env), "timeout_s": args.timeout}
    if args.cwd:
        options["cwd"] = args.cwd
    if args.user:
        options["user"] = args.user
    if args.interactive:
        options["stdin_base64"] = base64.b64encode(sys.stdin.buffer.read()).decode()
    started = await client.exec_start(args.id, cmd, **options)
    out, err = sys.stdout.buffer, sys.stderr.buffer
    async for event in client.exec_stream(args.id, started.id):
        if event.type in ("stdout", "stderr"):
            target = out if event.type == "stdout" else err
            data = event.data.get("data")
            target.write(data.encode() if isinstance(data, str) else base64.b64decode(event.data.get("base64", "")))
            target.flush()
        elif event.type == "exit":
            final = event.data
            if final.get("state") == "failed":
                error = final.get("error") or {}
                print(f"exec failed: {error.get('code')}: {error.get('message')}", file=sys.stderr)
                return 125
            if final.get("timed_out"):
                return 124
            if final.get("killed"):
                return 137
            code = final.get("exit_code")
            return code if isinstance(code, int) else 125
    return 125


async def _shell(client: Client, args: argparse.Namespace) -> int:
    """An interactive shell in the session's desktop: this terminal in raw mode, its size sent
    at the start and on every change (SIGWINCH); exits with the shell's exit code."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    interactive = os.isatty(stdin)
    size = shutil.get_terminal_size()
    loop = asyncio.get_running_loop()
    keys: asyncio.Queue[bytes | os.terminal_size] = asyncio.Queue()  # keystrokes and new sizes, in order

    def on_input() -> None:
        try:
            data = os.read(stdin, 65536)
        except OSError:
            data = b""
        keys.put_nowait(data)
        if not data:
            loop.remove_reader(stdin)

    saved = termios.tcgetattr(stdin) if interactive else None
    async with client.terminal(args.id, cols=size.columns, rows=size.lines, user=args.user, cwd=args.cwd) as term:
        try:
            if saved is not None:
                tty.setraw(stdin, termios.TCSANOW)  # what was typed ahead is kept
            loop.add_reader(stdin, on_input)

            loop.add_signal_handler(signal.SIGWINCH, lambda: keys.put_nowait(shutil.get_terminal_size()))

            async def typing() -> None:
                while item := await keys.get():
                    if isinstance(item, os.terminal_size):
                        await term.resize(item.columns, item.lines)
                    else:
                        await term.send(item)

            sender = asyncio.create_task(typing())
            try:
                async for data in term:
                    os.write(stdout, data)
            finally:
                sender.cancel()
        finally:
            loop.remove_reader(stdin)
            loop.remove_signal_handler(signal.SIGWINCH)
            if saved is not None:
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
    return term.exit_code if term.exit_code is not None else 255


def _remote(spec: str) -> tuple[str, str] | None:
    """``SESSION:/abs/path`` as (session, path); None for a local path."""
    session, colon, path = spec.partition(":")
    if colon and path.startswith("/") and SESSION_ID_RE.fullmatch(session):
        return session, path
    return None


async def _cp(client: Client, args: argparse.Namespace) -> int:
    """Copy between this machine and a desktop, like `docker cp`: a file, or a directory's
    contents (as a tar, streamed)."""
    source, target = _remote(args.src), _remote(args.dst)
    if (source is None) == (target is None):
        raise UsageError("cp: exactly one of SRC and DST is SESSION:/absolute/path")
    if target is not None:
        written = await client.upload_path(target[0], args.src, target[1])
        print(f"{written['bytes']} bytes to {target[0]}:{written['path']}")
        return 0
    assert source is not None
    total = await client.download_to(source[0], source[1], args.dst)
    print(f"{total} bytes from {source[0]}:{source[1]}")
    return 0


async def _screenshot(client: Client, args: argparse.Namespace) -> int:
    """A graphical session's screen to a file (or stdout, ``-o -``); its sizes on stderr."""
    shot = await client.screenshot(
        args.id, format=args.format, quality=args.quality, scale=args.scale, max_width=args.max_width
    )
    if args.output == "-":
        sys.stdout.buffer.write(shot.data)
        sys.stdout.buffer.flush()
    else:
        await anyio.Path(args.output).write_bytes(shot.data)
    print(
        f"{len(shot.data)} bytes of {shot.format}: {shot.image_width}x{shot.image_height} of the"
        f" {shot.screen_width}x{shot.screen_height} screen, scale {shot.scale:g}",
        file=sys.stderr,
    )
    return 0


# The positional values each input action takes, by name (the body's fields).
INPUT_POINTS = {
    "move": ("x", "y"),
    "click": ("x", "y"),
    "double_click": ("x", "y"),
    "drag": ("x", "y", "to_x", "to_y"),
    "scroll": ("x", "y"),
}


async def _input(client: Client, args: argparse.Namespace) -> int:
    """One input action; prints where the pointer is after it (JSON)."""
    fields: dict[str, Any] = {}
    if args.input_action in INPUT_POINTS:
        names = INPUT_POINTS[args.input_action]
        if len(args.values) != len(names) or not all(v.lstrip("-").isdigit() for v in args.values):
            raise UsageError(f"input {args.input_action}: give {' '.join(n.upper() for n in names)} as integers")
        fields = {name: int(value) for name, value in zip(names, args.values, strict=True)}
        fields |= {"scale": args.scale, "button": args.button if args.input_action not in ("move", "scroll") else None}
        if args.input_action == "scroll":
            fields |= {"dx": args.dx, "dy": args.dy}
    elif args.input_action == "type":
        if len(args.values) != 1:
            raise UsageError("input type: give the TEXT as one argument (quote it), or - to read stdin")
        fields["text"] = sys.stdin.read() if args.values == ["-"] else args.values[0]
    else:
        if not args.values:
            raise UsageError("input key: give one or more combinations, e.g. ctrl+c Return")
        fields["keys"] = list(args.values)
    done = await client.input(args.id, args.input_action, **fields)
    _print_json(msgspec.to_builtins(done))
    return 0


async def _sandboxes(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        if args.action in ("drain", "undrain"):
            if args.action == "drain":
                info = await client.drain(args.sandbox, stop_desktops=args.stop_desktops)
            else:
                info = await client.undrain(args.sandbox)
            print(f"sandbox {_plain(info.id)}: {info.status}")
            return 0
        if args.action == "retire":
            retired = await client.retire(args.sandbox)
            print(f"sandbox {_plain(retired.id)}: retired, {len(retired.sessions)} sessions deleted")
            for session in retired.sessions:
                print(f"  {_plain(session)}")
            return 0
        rows = await client.sandboxes()
    if args.json:
        _print_json(msgspec.to_builtins(rows))
        return 0
    _table(
        ["ID", "STATUS", "DEPTH", "PLACED", "CAPACITY", "LOAD", "FREE DISK", "PRIVILEGE", "SEEN"],
        [
            [
                s.id,
                s.status,
                str(s.depth),
                str(s.placed),
                str(s.capacity),
                f"{s.load:.2f}",
                f"{s.free_disk_bytes / 2**30:.1f} GiB" + (" (low)" if low_disk(s) else ""),
                s.privilege,
                s.ts,
            ]
            for s in rows
        ],
    )
    return 0


async def _events(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        async for event in client.events(args.session, after=args.after, follow=args.follow):
            if args.json:
                print(json.dumps({"id": event.id, **event.data}), flush=True)
            else:
                env = event.data
                data = _markup(json.dumps(env.get("data", {}), sort_keys=True))
                console.print(
                    f"{_markup(event.id):18} {_markup(env.get('ts', '')):24} "
                    f"[{_style(event.type)}]{_markup(event.type):18}[/] {_markup(env.get('session') or '-'):24} {data}",
                    highlight=False,
                    soft_wrap=True,
                )
    return 0


def _serve_api(args: argparse.Namespace) -> int:
    import uvicorn

    from .api import create_app
    from .config import Settings

    settings = Settings.from_env()
    uvicorn.run(
        create_app(settings),
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        log_level="info",
        access_log=False,
        # Open event streams never end by themselves: cut them after this on shutdown.
        timeout_graceful_shutdown=5,
        # h11, not httptools: only h11 bounds the request line and headers (httptools took
        # 7 MiB + 8 MiB from a client with no token); more is refused before the app runs.
        http="h11",
        h11_max_incomplete_event_size=settings.max_header_bytes,
        limit_concurrency=settings.max_connections,
    )
    return 0


def _run_worker() -> int:
    """The worker is its own program (``python -m workers``): the CLI imports no worker code,
    so an operator's machine needs none of it; this replaces the process with it."""
    os.execv(sys.executable, [sys.executable, "-m", "workers"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__.split("\n")[0])
    parser.add_argument("--api", help="API base URL (default $ORCH_API_URL or http://127.0.0.1:8080)")
    parser.add_argument("--token", help="API token (default $ORCH_TOKEN)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    sub.add_parser("worker", help="run this sandbox's worker")
    _add_sessions(sub.add_parser("sessions", help="manage sessions").add_subparsers(dest="action", required=True))
    _add_sandboxes(sub.add_parser("sandboxes", help="sandboxes").add_subparsers(dest="action", required=True))

    token = sub.add_parser("token", help="API tokens").add_subparsers(dest="action", required=True)
    new = token.add_parser("new", help="make a token; prints it and the ORCH_TOKENS entry holding its hash")
    new.add_argument("--name", required=True)
    new.add_argument("--scope", action="append", required=True, choices=sorted(SCOPES))
    new.add_argument("--tenant", type=_tenant, help="whose sessions it makes and sees (default: the `default` tenant)")

    events = sub.add_parser("events", help="print events")
    events.add_argument("--session")
    events.add_argument("--after", help="start after this event id")
    events.add_argument("--follow", "-f", action="store_true", help="keep following")
    events.add_argument("--json", action="store_true")
    return parser


def _add_sessions(sessions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    create = sessions.add_parser("create", help="create a session")
    create.add_argument("--id", help="client-chosen id (idempotent create)")
    create.add_argument("--label", action="append", default=[], metavar="K=V")
    create.add_argument("--sandbox")
    create.add_argument("--wait", action="store_true", help="follow its events until it is ready")
    create.add_argument("--timeout", type=float, default=180.0)
    ls = sessions.add_parser("ls", help="list sessions")
    ls.add_argument("--state")
    ls.add_argument("--label", action="append", default=[], metavar="K=V")
    ls.add_argument("--json", action="store_true")
    get = sessions.add_parser("get", help="show one session")
    get.add_argument("id")
    run = sessions.add_parser("exec", help="run a command in the session's desktop: exec ID [options] -- CMD...")
    run.add_argument("id")
    run.add_argument("--env", action="append", default=[], metavar="K=V")
    run.add_argument("--cwd")
    run.add_argument("--user")
    run.add_argument("--timeout", type=float, default=60.0)
    run.add_argument("-i", "--interactive", action="store_true", help="send this process's stdin (read to its end)")
    run.add_argument("cmd", nargs="*", help="the command and its arguments (after --, to pass options)")
    shell = sessions.add_parser("shell", help="an interactive shell in the session's desktop")
    shell.add_argument("id")
    shell.add_argument("--user")
    shell.add_argument("--cwd")
    cp = sessions.add_parser("cp", help="copy a file or a directory's contents: cp SRC DST, one of them ID:/path")
    cp.add_argument("src")
    cp.add_argument("dst")
    shot = sessions.add_parser("screenshot", help="a graphical session's screen as PNG or JPEG: screenshot ID -o FILE")
    shot.add_argument("id")
    shot.add_argument("-o", "--output", required=True, help="the file to write (- for stdout)")
    shot.add_argument("--format", choices=["png", "jpeg"], default="png")
    shot.add_argument("--quality", type=int, help="jpeg only, 1..100")
    shot.add_argument("--scale", type=float, help="0.05..1: the image's size against the screen's")
    shot.add_argument("--max-width", type=int, help="scale down to at most this width")
    act = sessions.add_parser(
        "input",
        help="an input action on a graphical session: input ID click X Y | type TEXT | key COMBO...",
    )
    act.add_argument("id")
    act.add_argument("input_action", choices=[*INPUT_POINTS, "type", "key"], metavar="ACTION")
    act.add_argument("values", nargs="*", help="X Y (drag: X Y TO_X TO_Y), the TEXT, or the key combinations")
    act.add_argument("--button", choices=["left", "middle", "right"], default="left")
    act.add_argument("--scale", type=float, help="the coordinates are on a screenshot taken at this scale")
    act.add_argument("--dx", type=int, default=0, help="scroll: wheel steps, positive right")
    act.add_argument("--dy", type=int, default=0, help="scroll: wheel steps, positive down")
    for verb, text in (("stop", "stop (keeps the volume)"), ("start", "start again"), ("rm", "delete")):
        p = sessions.add_parser(verb, help=text)
        p.add_argument("id")
        p.add_argument("--wait", action="store_true")
        p.add_argument("--timeout", type=float, default=180.0)


def _add_sandboxes(sandboxes: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sandboxes.add_parser("ls", help="known sandboxes and their status").add_argument("--json", action="store_true")
    drain = sandboxes.add_parser("drain", help="stop placing sessions there; its worker finishes and exits")
    drain.add_argument("sandbox")
    drain.add_argument("--stop-desktops", action="store_true", help="also stop its ready sessions (volumes kept)")
    sandboxes.add_parser("undrain", help="take sessions again").add_argument("sandbox")
    sandboxes.add_parser(
        "retire", help="for an unavailable or drained sandbox that will not return: delete its sessions, forget it"
    ).add_argument("sandbox")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # `sessions exec ID [options] -- CMD...`: what follows -- is the command, untouched
    # (argparse's subparsers would take its options for theirs).
    command: list[str] = []
    if "--" in words:
        at = words.index("--")
        words, command = words[:at], words[at + 1 :]
    args = build_parser().parse_args(words)
    if command:
        if getattr(args, "action", None) != "exec":
            build_parser().error("-- is only for `sessions exec`")
        args.cmd = [*args.cmd, *command]
    tracing.install()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s [%(trace)s]: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.command == "api":
            return _serve_api(args)
        if args.command == "worker":
            return _run_worker()
        if args.command == "sessions":
            return asyncio.run(_sessions(args))
        if args.command == "sandboxes":
            return asyncio.run(_sandboxes(args))
        if args.command == "token":
            raw = new_token()
            print(f"token:       {raw}")
            print(f"ORCH_TOKENS: {token_entry(args.name, raw, args.scope, args.tenant)}")
            return 0
        return asyncio.run(_events(args))
    except UsageError as e:
        print(f"orchestrator: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ApiError as e:
        print(f"orchestrator: {_plain(e.code)}: {_plain(e.message)}", file=sys.stderr)
        return EXIT_API
    except httpx.TransportError as e:
        print(f"orchestrator: cannot reach the API at {_api_url(args)}: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
