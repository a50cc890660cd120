"""Who may call a route: the bearer token, its scopes, and the guards routes name."""

from __future__ import annotations

import re
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from . import auth
from .auth import authenticate, authorize


def token_of(connection: ASGIConnection[Any, Any, Any, Any]) -> auth.Token:
    header = connection.headers.get("authorization")
    # Browsers' EventSource and WebSocket cannot send headers: event streams, an exec's output,
    # terminals (and the dashboard page that opens them) may carry the token as ?access_token=;
    # nothing else does (a URL lands in logs, L2).
    if header is None and _token_in_url_allowed(connection) and "access_token" in connection.query_params:
        header = "Bearer " + connection.query_params["access_token"]
    return authenticate(header, connection.app.state.tokens)


_EXEC_OUTPUT = re.compile(r"/v1/sessions/[^/]+/execs/[^/]+/output")


def _token_in_url_allowed(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    path: str = connection.scope["path"]
    if str(connection.scope["type"]) == "websocket":
        return path.endswith("/terminal")
    return connection.scope.get("method") == "GET" and (
        path == "/dashboard" or path.endswith("/events") or _EXEC_OUTPUT.fullmatch(path) is not None
    )


def caller(request: Request[Any, Any, Any]) -> auth.Token:
    """The request's token (its guard has let it through; authenticating again is one hash)."""
    return token_of(request)


def require(*any_of: str) -> Any:
    """A guard: the request's bearer token must hold one of these scopes (any valid token if none)."""

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        token = token_of(connection)
        if any_of:
            authorize(token, *any_of)

    return guard


WRITE = [require(auth.SESSIONS_WRITE)]
READ = [require(auth.SESSIONS_WRITE, auth.EVENTS_READ)]
EVENTS = [require(auth.EVENTS_READ)]
ADMIN = [require(auth.ADMIN)]
ANY_TOKEN = [require()]
EXEC = [require(auth.SESSIONS_EXEC)]
