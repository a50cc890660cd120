"""What an access into a desktop is: its kind and its ticket.

A ticket is what the API decided (who, which session, what to do, with which parameters),
written to Redis for one use and a few seconds: the worker takes it (GETDEL) and does what it
says, nothing else. The connection that carries the bytes (orchestrator/access.py) only names
the ticket, so neither route needs a credential of its own, and whatever reaches a worker's
access port without a live ticket gets nothing."""

from __future__ import annotations

import enum
import secrets

import msgspec

from .screen_types import ScreenOp

TICKET_TTL_MS = 15_000


class AccessKind(enum.StrEnum):
    TERMINAL = "terminal"
    FILE_WRITE = "file_write"
    FILE_READ = "file_read"
    FILE_LIST = "file_list"
    PORT = "port"
    SCREEN = "screen"  # a screenshot or an input action (orchestrator/screen_types.py)


class AccessRoute(enum.StrEnum):
    """How the API reaches a sandbox's worker (ORCH_ACCESS_ROUTE): ``auto`` takes the direct
    path when the sandbox advertises one and it answers, else the relay."""

    AUTO = "auto"
    DIRECT = "direct"
    RELAY = "relay"


class AccessTicket(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    id: str
    kind: AccessKind
    session: str
    sandbox: str
    by: str
    created_at: float
    tenant: str | None = None
    # terminal
    cols: int = 80
    rows: int = 24
    argv: list[str] = []
    env: dict[str, str] = {}
    cwd: str | None = None
    user: str | None = None
    # files
    path: str | None = None
    tar: bool = False
    # port
    port: int | None = None
    # screen
    screen: ScreenOp | None = None


def new_ticket_id() -> str:
    return "acc_" + secrets.token_hex(16)


def encode_ticket(ticket: AccessTicket) -> bytes:
    return msgspec.json.encode(ticket)


def decode_ticket(raw: bytes) -> AccessTicket:
    return msgspec.json.decode(raw, type=AccessTicket)
