"""``orchestrator``: serve the API, run a worker, manage sessions, follow events.

Exit codes: 0 ok; 1 the API refused (its code and message are printed); 2 usage;
3 the session failed; 4 timed out waiting; 5 the API could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import anyio
import httpx

from .auth import SCOPES, hash_token, new_token
from .client import ApiError, Client

EXIT_API, EXIT_USAGE, EXIT_FAILED, EXIT_TIMEOUT, EXIT_UNREACHABLE = 1, 2, 3, 4, 5


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


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _describe(event_type: str, data: dict[str, Any]) -> str:
    if event_type == "dockerd.ready":
        return (
            f"{data.get('storage_driver')} on {data.get('backing_filesystem')}, dockerd "
            f"{data.get('server_version')}, depth {data.get('depth')}, pool {data.get('address_pool')}, "
            f"{data.get('duration_ms')} ms after start"
        )
    if event_type == "session.failed":
        return f"{data.get('code')}: {data.get('message')}"
    return ""


async def _follow(client: Client, session_id: str, done: set[str], timeout: float, after: str | None = None) -> int:
    """Print a session's events as they arrive, timed from the first, until one of ``done``."""
    first: datetime | None = None
    try:
        with anyio.fail_after(timeout):
            async for event in client.events(session_id, after=after):
                ts = datetime.fromisoformat(event.data["ts"])
                first = first or ts
                elapsed = (ts - first).total_seconds()
                details = _describe(event.type, event.data.get("data", {}))
                print(f"  +{elapsed:6.3f}s  {event.type:18} {details}", flush=True)
                if event.type == "session.failed":
                    return EXIT_FAILED
                if event.type in done:
                    return 0
    except TimeoutError:
        wanted = " or ".join(sorted(done))
        print(f"orchestrator: no {wanted} for {session_id} within {timeout:g} s", file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_UNREACHABLE


async def _sessions(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        if args.action == "create":
            record = await client.create(args.id, _labels(args.label), args.sandbox)
            print(f"session {record['id']} on sandbox {record['sandbox']}: {record['state']}")
            if args.wait:
                return await _follow(client, record["id"], {"session.ready"}, args.timeout)
            return 0
        if args.action == "ls":
            rows = await client.list(args.state, args.label)
            if args.json:
                _print_json(rows)
                return 0
            print(f"{'ID':24} {'STATE':10} {'GEN':>4} {'SANDBOX':12} {'UPDATED':25} LABELS")
            for r in rows:
                labels = ",".join(f"{k}={v}" for k, v in sorted(r["spec"]["labels"].items()))
                row = f"{r['id']:24} {r['state']:10} {r['generation']:>4} {r['sandbox']:12}"
                print(f"{row} {r['updated_at']:25} {labels}")
            return 0
        if args.action == "get":
            _print_json(await client.get(args.id))
            return 0
        # --wait follows only what happens from now on: remember where the stream is.
        after = None
        if args.wait:
            async for event in client.events(args.id, follow=False):
                after = event.id
        verbs = {"stop": client.stop, "start": client.start, "rm": client.delete}
        record = await verbs[args.action](args.id)
        print(f"session {record['id']}: {record['state']}")
        if args.wait:
            done = {"stop": {"session.stopped"}, "start": {"session.ready"}, "rm": {"session.deleted"}}
            return await _follow(client, record["id"], done[args.action], args.timeout, after)
        return 0


async def _events(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        async for event in client.events(args.session, after=args.after, follow=args.follow):
            if args.json:
                print(json.dumps({"id": event.id, **event.data}), flush=True)
            else:
                env = event.data
                print(
                    f"{event.id:18} {env.get('ts', ''):24} {event.type:18} {env.get('session') or '-':24} "
                    f"{json.dumps(env.get('data', {}), sort_keys=True)}",
                    flush=True,
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
    )
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    from workers.worker import SandboxWorker

    from .config import Settings

    async def main() -> None:
        worker = SandboxWorker(Settings.from_env())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await worker.serve(stop)

    asyncio.run(main())
    return 0


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

    sessions = sub.add_parser("sessions", help="manage sessions").add_subparsers(dest="action", required=True)
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
    for verb, text in (("stop", "stop (keeps the volume)"), ("start", "start again"), ("rm", "delete")):
        p = sessions.add_parser(verb, help=text)
        p.add_argument("id")
        p.add_argument("--wait", action="store_true")
        p.add_argument("--timeout", type=float, default=180.0)

    token = sub.add_parser("token", help="API tokens").add_subparsers(dest="action", required=True)
    new = token.add_parser("new", help="make a token; prints it and the ORCH_TOKENS entry holding its hash")
    new.add_argument("--name", required=True)
    new.add_argument("--scope", action="append", required=True, choices=sorted(SCOPES))

    events = sub.add_parser("events", help="print events")
    events.add_argument("--session")
    events.add_argument("--after", help="start after this event id")
    events.add_argument("--follow", "-f", action="store_true", help="keep following")
    events.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.command == "api":
            return _serve_api(args)
        if args.command == "worker":
            return _run_worker(args)
        if args.command == "sessions":
            return asyncio.run(_sessions(args))
        if args.command == "token":
            raw = new_token()
            print(f"token:       {raw}")
            print(f"ORCH_TOKENS: {args.name}:{hash_token(raw)}:{'+'.join(args.scope)}")
            return 0
        return asyncio.run(_events(args))
    except UsageError as e:
        print(f"orchestrator: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ApiError as e:
        print(f"orchestrator: {e.code}: {e.message}", file=sys.stderr)
        return EXIT_API
    except httpx.TransportError as e:
        print(f"orchestrator: cannot reach the API at {_api_url(args)}: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
