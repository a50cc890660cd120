"""The dashboard: its page (behind a token) and the third-party code it loads (public).

The page is one file, ``static/dashboard.html``; its terminal is xterm.js and its screen noVNC's
client (ES modules, under ``novnc/``), which
``scripts/fetch-web-assets.sh`` takes from the npm registry (pinned, integrity checked) into
``static/vendor/`` (gitignored, package data of the wheel). The API serves those files itself:
no CDN at runtime, so the page's CSP allows scripts from its own origin only."""

from __future__ import annotations

import re
from pathlib import Path

from litestar import Response, get
from litestar.params import FromPath

from .errors import ServiceError
from .guards import ANY_TOKEN

STATIC = Path(__file__).parent / "static"
VENDOR = STATIC / "vendor"
DASHBOARD = (STATIC / "dashboard.html").read_bytes()

# The only names /dashboard/assets/ serves, with their types: a fixed list, never a path from
# the request (no traversal to think about), and a type per file, which `nosniff` requires
# (Litestar adds `; charset=utf-8` to text types).
ASSETS: dict[str, str] = {
    "xterm.js": "text/javascript",
    "xterm.css": "text/css",
    "addon-fit.js": "text/javascript",
    "xterm.LICENSE": "text/plain",
    "addon-fit.LICENSE": "text/plain",
    "novnc.LICENSE": "text/plain",
    "pako.LICENSE": "text/plain",
}
# noVNC's modules import each other by relative paths, so its trees are served as laid out: a
# name there is served when it has this shape (no dot but the extension's: no ``..``) and the
# fetch script listed it (SHA256SUMS), still never a path from the request read as such.
NOVNC_MODULE = re.compile(r"novnc/(core|vendor/pako/lib)(/[a-z0-9_-]+)+\.js")
_modules: set[str] = set()


def _media_type(name: str) -> str | None:
    if name in ASSETS:
        return ASSETS[name]
    if not NOVNC_MODULE.fullmatch(name):
        return None
    if not _modules:  # read once it is there (fetched after the start: looked for again)
        try:
            listed = (VENDOR / "SHA256SUMS").read_text().splitlines()
        except FileNotFoundError:
            return None
        _modules.update(n for n in (line.partition("  ")[2] for line in listed) if NOVNC_MODULE.fullmatch(n))
    return "text/javascript" if name in _modules else None


_loaded: dict[str, bytes] = {}


def _asset(name: str) -> bytes | None:
    """Read once per process; a missing file is looked for again (fetched after the start)."""
    if name not in _loaded:
        try:
            _loaded[name] = (VENDOR / name).read_bytes()
        except FileNotFoundError:
            return None
    return _loaded[name]


@get("/dashboard", include_in_schema=False, guards=ANY_TOKEN, media_type="text/html")
async def dashboard() -> bytes:
    """Sandboxes, sessions and a live event feed, a page per session (its record, events,
    bring-up phases, terminal and files); open as /dashboard?access_token=<token>."""
    return DASHBOARD


# No guard, on purpose: these are public static code (the npm registry's), nothing of a session
# or a tenant. A <script src> cannot send an Authorization header, and a token in a script's URL
# would land in access logs and caches (L2): the page's own address is the only one carrying it.
@get("/dashboard/assets/{name:path}", include_in_schema=False)
async def dashboard_asset(name: FromPath[str]) -> Response[bytes]:
    name = name.removeprefix("/")
    media_type = _media_type(name)
    if media_type is None:
        raise ServiceError(404, "asset_not_found", f"no dashboard asset named {name!r}", "name")
    body = _asset(name)
    if body is None:
        raise ServiceError(
            404, "asset_not_built", f"{name} is not installed: run scripts/fetch-web-assets.sh (make venv)", "name"
        )
    # Pinned versions under fixed names: an hour of caching, revalidated after an upgrade's deploy.
    return Response(body, media_type=media_type, headers={"cache-control": "public, max-age=3600"})


ROUTES = [dashboard, dashboard_asset]
