"""Security headers on every HTTP answer (L2), errors and Litestar's own 404s included: a
``before_send`` hook (it sees every message the app sends), so no route can forget them. The
API serves JSON and one page (the dashboard, whose address carries its token): nothing may
frame it, nothing leaves it in a Referer, and the page loads nothing from elsewhere (its
third-party script, xterm.js, is served by the API itself)."""

from __future__ import annotations

from litestar.types import Message, Scope

_COMMON = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
# JSON answers: a browser must run nothing from them.
API_CSP = b"default-src 'none'; frame-ancestors 'none'"
# The dashboard: its own inline script and style, plus its origin's files for the vendored xterm.js
# (/dashboard/assets/, served by the API: no other origin's code); its origin's API, event streams
# and terminal WebSocket: CSP3's 'self' matches ws:/wss: to the same host and port, so no ws:
# source is named (a bare `ws:` would allow any host).
PAGE_CSP = (
    b"default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
    b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGES = frozenset({"/dashboard"})
# Set in the scope by the port proxy (orchestrator/api_ports.py) once it answers with the
# upstream's response: that answer is the desktop's page, with its own policy (its scripts, its
# framing: port URLs are for iframes), so none of the API's is added to it. Its errors are ours.
PROXIED = "orchestrator.proxied"


async def add_security_headers(message: Message, scope: Scope) -> None:
    if message["type"] != "http.response.start" or scope.get(PROXIED):
        return
    page = scope["path"] in PAGES
    added = [
        *_COMMON,
        (b"content-security-policy", PAGE_CSP if page else API_CSP),
        # The page's URL holds a token: no cache keeps it.
        *([(b"cache-control", b"no-store")] if page else []),
    ]
    headers = list(message.get("headers", []))
    present = {bytes(name).lower() for name, _ in headers}
    message["headers"] = [*headers, *(h for h in added if h[0] not in present)]
