"""Tenancy's pure parts: token entries with and without a tenant, the CLI's entry, the per-tenant
Idempotency-Key ids, the event encoding the bus's script splices the tenant into, the filter."""

from __future__ import annotations

import msgspec
import pytest

from orchestrator import cli
from orchestrator.auth import authenticate, hash_token, parse_tokens, token_entry
from orchestrator.events import MAX_EVENT_BYTES, encode_event, make_event
from orchestrator.queue import Operation
from orchestrator.records import new_record
from orchestrator.schemas import Event, SessionCreate, SessionRecord
from orchestrator.service import id_from_idempotency_key
from orchestrator.sse import EventFilter
from tests.fakes import SANDBOX, open_stack

H = hash_token("raw")


def test_an_entry_without_a_tenant_is_the_default_tenants_as_before() -> None:
    (old,) = parse_tokens(f"ci:{H}:sessions:write+events:read")
    assert (old.name, old.tenant, old.scopes) == ("ci", "default", frozenset({"sessions:write", "events:read"}))
    assert old.visible_tenant == "default" and not old.sees_all


def test_an_entry_names_its_tenant_after_its_scopes() -> None:
    tokens = parse_tokens(
        f"a:{H}:sessions:write:tenant=acme; b:{hash_token('b')}:sessions:write,events:read:tenant=b-2"
        f"\nops:{hash_token('o')}:admin:tenant=ops"
    )
    assert [(t.name, t.tenant) for t in tokens] == [("a", "acme"), ("b", "b-2"), ("ops", "ops")]
    assert tokens[1].scopes == frozenset({"sessions:write", "events:read"})
    # admin owns its tenant's sessions, and sees every tenant's.
    assert tokens[2].sees_all and tokens[2].visible_tenant is None
    assert authenticate("Bearer b", tokens).tenant == "b-2"


@pytest.mark.parametrize(
    "tenant",
    ["", "Acme", "-acme", "ac me", "acme/x", "acme:tenant=b", "a" * 64, "ac\tme", "..", "acme_1"],
)
def test_a_tenant_name_outside_the_pattern_is_refused_and_not_echoed(tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant must match") as refused:
        parse_tokens(f"a:{H}:admin:tenant={tenant}")
    if len(tenant) > 2:
        assert tenant not in str(refused.value)


def test_a_tenant_in_place_of_the_scopes_is_an_unknown_scope() -> None:
    with pytest.raises(ValueError, match="unknown or missing scopes"):
        parse_tokens(f"a:{H}:tenant=acme")


def test_token_entry_round_trips_through_the_parser() -> None:
    entry = token_entry("ci", "secret-raw", ["sessions:write", "events:read"], "acme")
    assert "secret-raw" not in entry
    (token,) = parse_tokens(entry)
    assert (token.tenant, authenticate("Bearer secret-raw", (token,)).name) == ("acme", "ci")
    assert parse_tokens(token_entry("ci", "r", ["admin"]))[0].tenant == "default"


def test_the_cli_makes_an_entry_with_a_tenant(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["token", "new", "--name", "ci", "--scope", "sessions:write", "--tenant", "acme"]) == 0
    out = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    (token,) = parse_tokens(out["ORCH_TOKENS"].strip())
    assert token.tenant == "acme" and token.scopes == frozenset({"sessions:write"})
    assert authenticate(f"Bearer {out['token'].strip()}", (token,)) == token
    with pytest.raises(SystemExit) as refused:
        cli.main(["token", "new", "--name", "ci", "--scope", "admin", "--tenant", "Not Valid"])
    assert refused.value.code == 2
    assert "a tenant must match" in capsys.readouterr().err


def test_idempotency_key_ids_are_per_tenant_and_the_default_tenants_unchanged() -> None:
    acme, beta = id_from_idempotency_key("order-1", "acme"), id_from_idempotency_key("order-1", "beta")
    assert acme != beta and acme == id_from_idempotency_key("order-1", "acme")
    # Before tenancy (and still, for the default tenant): from the key alone.
    # "k-" + base32(sha256(b"order-1"))[:24], lowercase: a retry across the upgrade finds its session.
    assert (
        id_from_idempotency_key("order-1")
        == id_from_idempotency_key("order-1", "default")
        == "k-box6eikw2juyyfb3qycairwt"
    )


def test_an_event_without_a_tenant_ends_as_the_bus_script_expects() -> None:
    """events.PUBLISH_LUA replaces this tail with the record's tenant: if the encoding changes
    (a field after ``tenant``, another encoder), the script would silently publish no tenant."""
    event = make_event("dockerd.ready", sandbox="s", session="x", generation=1, data={"a": 1})
    assert encode_event(event).endswith(b',"tenant":null}')
    huge = make_event("desktop.health", sandbox="s", session="x", data={"x": "y" * MAX_EVENT_BYTES})
    assert encode_event(huge).endswith(b',"tenant":null}')  # truncated, still the envelope's tail
    spliced = encode_event(event)[: -len(b',"tenant":null}')] + b',"tenant":"acme"}'
    assert msgspec.json.decode(spliced, type=Event) == msgspec.structs.replace(event, tenant="acme")
    assert encode_event(make_event("x", sandbox="s", session="x", tenant="acme")).endswith(b',"tenant":"acme"}')


def test_a_record_without_a_tenant_field_is_the_default_tenants() -> None:
    raw = (
        b'{"id":"old-one","state":"ready","generation":1,"sandbox":"s","spec":{},'
        b'"created_at":"2026-01-01T00:00:00.000Z","updated_at":"2026-01-01T00:00:00.000Z"}'
    )
    assert msgspec.json.decode(raw, type=SessionRecord).tenant == "default"


def test_the_filter_shows_a_tenant_only_events_carrying_it() -> None:
    mine = make_event("session.ready", sandbox="s", session="a", tenant="acme")
    theirs = make_event("session.ready", sandbox="s", session="b", tenant="beta")
    sandbox = make_event("sandbox.heartbeat", sandbox="s")
    assert [EventFilter(tenant="acme").shows(e) for e in (mine, theirs, sandbox)] == [True, False, False]
    assert all(EventFilter().shows(e) for e in (mine, theirs, sandbox))  # admin: everything


async def test_every_event_of_a_tenants_session_carries_its_tenant_through_the_lifecycle(redis_url: str) -> None:
    """The worker's own events (volume, desktop, dockerd, images) name no tenant: the bus
    fills it in from the record. The real lifecycle over the fake Docker, to ready and deleted."""
    async with open_stack(redis_url) as stack:
        record = new_record(SessionCreate(id="acme-one"), SANDBOX, stack.settings, "acme")
        assert (await stack.store.create(record))[0]
        await stack.queue.enqueue(Operation.CREATE, SANDBOX, record.id, 1)
        assert await stack.run_queued() == ["ready"]
        await stack.sessions.delete(record.id)
        assert await stack.run_queued() == ["deleted"]
        events = await stack.events(record.id)
        types = [e.type for e in events]
        assert {"volume.created", "desktop.started", "dockerd.ready", "session.ready", "session.deleted"} <= set(types)
        assert {e.tenant for e in events} == {"acme"}, [(e.type, e.tenant) for e in events]
        assert not await stack.redis.exists(stack.keys.tenant_sessions("acme"))  # the delete took it out
