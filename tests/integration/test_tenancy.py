"""Tenancy over the real API and a real Redis (no worker, no Docker): two tenants, each sees and
acts only on its own sessions and events (another's is 404, as an unknown id is), admin sees
all; Idempotency-Keys are per tenant; a tenant's quota holds under concurrent creates. The
worker's part (its transitions, its events) is played by hand through the store and the bus,
as it would write them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
import redis.asyncio as aioredis

from orchestrator.auth import token_entry
from orchestrator.client import ApiError, Client, ServerEvent, SseParser
from orchestrator.config import Settings
from orchestrator.events import EventBus, make_event
from orchestrator.keys import Keys
from orchestrator.sandboxes import SandboxRegistry
from orchestrator.schemas import SandboxInfo
from orchestrator.service import id_from_idempotency_key
from orchestrator.states import SessionState as S
from orchestrator.store import SessionStore
from tests.conftest import awaited

from .conftest import running_api

QUOTA = 3
# name: (scopes, tenant); the admin token names none: the default tenant's.
TOKENS = {
    "acme-writer": (["sessions:write"], "acme"),
    "acme-reader": (["events:read"], "acme"),
    "beta-writer": (["sessions:write", "events:read"], "beta"),
    "root": (["admin"], None),
}
RAW = {name: f"raw-token-of-{name}" for name in TOKENS}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {RAW[name]}"}


@dataclasses.dataclass
class Fleet:
    url: str
    settings: Settings
    redis: aioredis.Redis
    keys: Keys
    store: SessionStore
    bus: EventBus
    acme: Client
    acme_reader: Client
    beta: Client
    admin: Client

    async def to_ready(self, session_id: str) -> None:
        """What a worker's create job stores."""
        for target in (S.CREATING, S.STARTING, S.READY):
            await self.store.transition(session_id, target)

    async def worker_event(self, session_id: str, type: str = "dockerd.ready") -> None:
        """A worker's own event: it names the session, not its tenant (the bus fills that in)."""
        await self.bus.publish(make_event(type, sandbox=self.settings.sandbox_id, session=session_id, generation=1))

    async def queued(self) -> list[bytes]:
        jobs: list[bytes] = await self.redis.zrange(self.keys.queue(self.settings.sandbox_id), 0, -1)
        return jobs

    async def beat(self) -> None:
        """One heartbeat of the test's sandbox, as workers/heartbeat.py sends it: creates are
        then placed (RESERVE_LUA) instead of waiting for ORCH_DEFAULT_SANDBOX (CAS_LUA)."""
        registry = SandboxRegistry(self.redis, self.keys)
        assert await registry.mark_alive(self.settings.sandbox_id, 120.0)
        info = SandboxInfo(
            id=self.settings.sandbox_id,
            depth=1,
            version="0.1.0",
            hostname="h",
            sessions=0,
            capacity=50,
            load=0.0,
            free_disk_bytes=0,
            privilege="caps",
            ts="2026-01-01T00:00:00.000Z",
            max_cpus=4.0,
            max_memory_mb=4096,
            max_pids=4096,
            lost_after_s=120.0,
        )
        assert await registry.beat(info)


@pytest.fixture
async def fleet(settings: Settings, redis: aioredis.Redis) -> AsyncIterator[Fleet]:
    tokens = ";".join(token_entry(name, RAW[name], scopes, tenant) for name, (scopes, tenant) in TOKENS.items())
    settings = dataclasses.replace(settings, tokens=tokens, tenant_max_sessions=QUOTA)
    keys = Keys(settings.key_prefix)
    bus = EventBus(redis, keys)
    async with (
        running_api(settings) as url,
        Client(url, token=RAW["acme-writer"]) as acme,
        Client(url, token=RAW["acme-reader"]) as acme_reader,
        Client(url, token=RAW["beta-writer"]) as beta,
        Client(url, token=RAW["root"]) as admin,
    ):
        yield Fleet(url, settings, redis, keys, SessionStore(redis, bus), bus, acme, acme_reader, beta, admin)


async def stored(client: Client, session_id: str | None = None) -> list[ServerEvent]:
    """What the firehose (or a session's stream) holds for this client's token, then the end."""
    return [e async for e in client.events(session_id, follow=False)]


def sessions_of(events: list[ServerEvent]) -> set[str | None]:
    return {e.data["session"] for e in events}


VERBS = [  # (token, method, path): each verb with a token whose scope allows it
    ("acme-writer", "GET", "/v1/sessions/{}"),
    ("acme-reader", "GET", "/v1/sessions/{}"),
    ("acme-writer", "POST", "/v1/sessions/{}/stop"),
    ("acme-writer", "POST", "/v1/sessions/{}/start"),
    ("acme-writer", "DELETE", "/v1/sessions/{}"),
    ("acme-reader", "GET", "/v1/sessions/{}/events?follow=false"),
]


async def test_each_tenant_sees_and_acts_only_on_its_own_sessions(fleet: Fleet) -> None:
    a1 = await fleet.acme.create("acme-one", labels={"team": "x"})
    b1 = await fleet.beta.create("beta-one", labels={"team": "x"})
    assert (a1.tenant, b1.tenant) == ("acme", "beta")
    assert (await fleet.admin.create("root-one")).tenant == "default"  # admin owns its own tenant's
    await fleet.to_ready("beta-one")
    b1 = await fleet.admin.get("beta-one")

    assert [s.id for s in await fleet.acme.list()] == ["acme-one"]
    assert [s.id for s in await fleet.acme_reader.list(labels=["team=x"])] == ["acme-one"]
    assert [s.id for s in await fleet.beta.list(state="ready")] == ["beta-one"]
    assert {s.id for s in await fleet.admin.list()} == {"acme-one", "beta-one", "root-one"}
    jobs = await fleet.queued()

    # Another tenant's session answers exactly as an id nobody holds: no existence oracle.
    async with httpx.AsyncClient(base_url=fleet.url) as http:
        for token, method, path in VERBS:
            theirs = await http.request(method, path.format("beta-one"), headers=bearer(token))
            nobody = await http.request(method, path.format("nobody-one"), headers=bearer(token))
            assert (theirs.status_code, nobody.status_code) == (404, 404), (token, method, path, theirs.text)
            expected = {**nobody.json(), "message": nobody.json()["message"].replace("nobody-one", "beta-one")}
            assert theirs.json() == expected, (method, path)
            assert theirs.json()["code"] == "session_not_found"
    assert await fleet.admin.get("beta-one") == b1  # untouched: same state, same revision
    assert await fleet.queued() == jobs  # and nothing enqueued for it

    # Its own tenant acts on it; admin acts on every tenant's.
    assert (await fleet.beta.stop("beta-one")).state == "stopping"
    assert (await fleet.admin.delete("acme-one")).state == "deleting"
    with pytest.raises(ApiError, match="404 session_not_found"):
        await fleet.beta.delete("acme-one")


async def test_event_streams_show_a_tenant_only_its_own_sessions_events(fleet: Fleet) -> None:
    await fleet.acme.create("acme-one", labels={"team": "x"})
    await fleet.beta.create("beta-one", labels={"team": "x"})
    await fleet.to_ready("acme-one")
    await fleet.to_ready("beta-one")
    await fleet.worker_event("acme-one")
    await fleet.worker_event("beta-one")
    await fleet.bus.publish(make_event("sandbox.heartbeat", sandbox=fleet.settings.sandbox_id, data={}))
    await fleet.worker_event("no-record-one")  # its record is gone (or never was): no tenant

    mine, theirs, everything = [await stored(c) for c in (fleet.acme_reader, fleet.beta, fleet.admin)]
    assert sessions_of(mine) == {"acme-one"} and {e.data["tenant"] for e in mine} == {"acme"}
    assert sessions_of(theirs) == {"beta-one"} and {e.data["tenant"] for e in theirs} == {"beta"}
    # The worker's event got its tenant from the record, inside the publishing script.
    assert [e.type for e in mine] == [
        *(f"session.{s}" for s in ("pending", "creating", "starting", "ready")),
        "dockerd.ready",
    ]
    assert "dockerd.ready" in [e.type for e in theirs]
    # Sandbox events and events of no known session are admin's only.
    assert sessions_of(everything) == {"acme-one", "beta-one", "no-record-one", None}
    assert {e.data["tenant"] for e in everything if e.data["session"] in (None, "no-record-one")} == {None}

    # Filters narrow within the tenant, never beyond it.
    async with httpx.AsyncClient(base_url=fleet.url, headers=bearer("acme-reader")) as http:
        other = await http.get("/v1/events", params={"follow": "false", "session": "beta-one"})
        labelled = await http.get("/v1/events", params={"follow": "false", "label": "team=x"})
        stream = await http.get("/v1/sessions/beta-one/events", params={"follow": "false"})
    assert other.status_code == 200 and "beta-one" not in other.text
    assert "beta-one" not in labelled.text and "acme-one" in labelled.text
    assert stream.status_code == 404 and stream.json()["code"] == "session_not_found"
    assert sessions_of(await stored(fleet.acme_reader, "acme-one")) == {"acme-one"}

    # Live, through the shared reader (hub.py): beta's events pass acme's follower by.
    async with (
        httpx.AsyncClient(base_url=fleet.url, headers=bearer("acme-reader"), timeout=20) as http,
        http.stream("GET", "/v1/events") as live,
    ):
        assert live.status_code == 200  # its start is fixed: everything after it is delivered
        await fleet.beta.create("beta-two")
        await fleet.worker_event("beta-two")
        await fleet.acme.create("acme-two")  # after beta's, in the firehose: the marker
        seen: list[ServerEvent] = []
        parser = SseParser()
        with anyio.fail_after(10):
            async for line in live.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    seen.append(event)
                    if event.data["session"] == "acme-two":
                        break
    assert sessions_of(seen) == {"acme-two"}, [(e.type, e.data["session"]) for e in seen]


async def test_a_deleted_sessions_stream_stays_its_tenants_even_when_the_id_is_made_anew(fleet: Fleet) -> None:
    await fleet.acme.create("reused-one")
    await fleet.acme.delete("reused-one")
    await fleet.store.transition("reused-one", S.DELETED)  # the worker's last step: the record goes
    assert await fleet.redis.get(fleet.keys.session("reused-one")) is None

    # The record is gone; the stream's newest events say whose it was.
    kept = await stored(fleet.acme_reader, "reused-one")
    assert [e.type for e in kept] == ["session.pending", "session.deleting", "session.deleted"]
    with pytest.raises(ApiError, match="404 session_not_found"):
        await stored(fleet.beta, "reused-one")

    # The id is free again: another tenant takes it, and the stream key with it.
    assert (await fleet.beta.create("reused-one")).tenant == "beta"
    with pytest.raises(ApiError, match="404 session_not_found"):
        await stored(fleet.acme_reader, "reused-one")
    anew = await stored(fleet.beta, "reused-one")
    assert [(e.type, e.data["tenant"]) for e in anew] == [("session.pending", "beta")]  # none of acme's
    assert len(await stored(fleet.admin, "reused-one")) == 4


async def test_idempotency_keys_are_per_tenant(fleet: Fleet) -> None:
    body = {"labels": {"order": "1"}}
    async with httpx.AsyncClient(base_url=fleet.url) as http:

        async def create(token: str) -> httpx.Response:
            return await http.post("/v1/sessions", json=body, headers={**bearer(token), "Idempotency-Key": "order-1"})

        acme, beta, acme_again, root = [await create(t) for t in ("acme-writer", "beta-writer", "acme-writer", "root")]
    assert (acme.status_code, beta.status_code, acme_again.status_code, root.status_code) == (202, 202, 200, 202)
    ids = [r.json()["id"] for r in (acme, beta, acme_again, root)]
    assert ids[0] == ids[2] and len({ids[0], ids[1], ids[3]}) == 3, ids
    assert [r.json()["tenant"] for r in (acme, beta, root)] == ["acme", "beta", "default"]
    # The default tenant's ids are what they were before tenancy: a retry across the upgrade finds its session.
    assert ids[3] == id_from_idempotency_key("order-1") == "k-" + _b32_sha256(b"order-1")[:24]


def _b32_sha256(data: bytes) -> str:
    import base64
    import hashlib

    return base64.b32encode(hashlib.sha256(data).digest()).decode().lower()


async def test_an_id_another_tenant_holds_is_409_telling_nothing_about_it(fleet: Fleet) -> None:
    await fleet.acme.create("taken-one", labels={"secret": "acme-label"})
    record, jobs = await fleet.admin.get("taken-one"), await fleet.queued()
    async with httpx.AsyncClient(base_url=fleet.url, headers=bearer("beta-writer")) as http:
        same = await http.post("/v1/sessions", json={"id": "taken-one", "labels": {"secret": "acme-label"}})
        other = await http.post("/v1/sessions", json={"id": "taken-one"})
    for refused in (same, other):
        assert refused.status_code == 409 and refused.json()["code"] == "session_exists"
        assert not any(word in refused.text for word in ("acme", "pending", "secret"))
    assert await fleet.admin.get("taken-one") == record
    assert await fleet.queued() == jobs  # its pending create is not re-enqueued by another tenant


@pytest.mark.parametrize("path", ["waiting", "placed"])
async def test_concurrent_creates_admit_exactly_the_tenants_quota(fleet: Fleet, path: str) -> None:
    """``waiting``: no sandbox has reported, creates wait for ORCH_DEFAULT_SANDBOX (CAS_LUA);
    ``placed``: a sandbox reported, creates are placed (RESERVE_LUA)."""
    if path == "placed":
        await fleet.beat()

    async def attempt(client: Client, tenant: str) -> str:
        try:
            return (await client.create()).id
        except ApiError as e:
            assert (e.status, e.code) == (429, "quota_exceeded"), e
            assert f"tenant {tenant!r} holds its quota of {QUOTA} sessions" in e.message
            return e.code

    for client, tenant in ((fleet.acme, "acme"), (fleet.beta, "beta")):
        outcomes = await asyncio.gather(*(attempt(client, tenant) for _ in range(8)))
        admitted = [o for o in outcomes if o != "quota_exceeded"]
        assert len(admitted) == QUOTA, outcomes  # each tenant its own quota
        assert {s.id for s in await client.list()} == set(admitted)
        counted = await awaited(fleet.redis.smembers(fleet.keys.tenant_sessions(tenant)))
        assert {m.decode() for m in counted} == set(admitted)
    assert (await fleet.admin.create()).tenant == "default"  # another tenant still

    # At its quota, a retried create of a session it holds is still that session, not a 429.
    held = (await fleet.acme.list())[0]
    assert (await fleet.acme.create(held.id)).id == held.id
    # A session counts until it is deleted, not while it is being deleted.
    await fleet.acme.delete(held.id)
    with pytest.raises(ApiError, match="429 quota_exceeded"):
        await fleet.acme.create()
    await fleet.store.transition(held.id, S.DELETED)
    assert (await fleet.acme.create()).tenant == "acme"


async def test_a_claimed_warm_desktop_becomes_the_claimers_tenants(fleet: Fleet) -> None:
    await fleet.beat()
    pool = fleet.keys.pool(fleet.settings.sandbox_id)
    await awaited(fleet.redis.rpush(pool, "warm-one", "warm-two"))
    claimed = await fleet.beta.create()
    assert (claimed.id, claimed.state, claimed.tenant) == ("warm-one", "ready", "beta")
    with pytest.raises(ApiError, match="404 session_not_found"):
        await fleet.acme.get("warm-one")
    assert await awaited(fleet.redis.sismember(fleet.keys.tenant_sessions("beta"), "warm-one"))
    ready = [e for e in await stored(fleet.beta) if e.type == "session.ready"]
    assert [(e.data["session"], e.data["tenant"], e.data["data"]) for e in ready] == [
        ("warm-one", "beta", {"warm": True})
    ]
    assert await stored(fleet.acme_reader) == []


async def test_a_record_from_before_tenancy_is_the_default_tenants(fleet: Fleet) -> None:
    """An older version's record has no tenant field: it decodes, lists and publishes as the
    default tenant's, whose every session then was."""
    await fleet.admin.create("old-one")
    key = fleet.keys.session("old-one")
    raw = await fleet.redis.get(key)
    assert raw is not None
    old = json.loads(raw)
    del old["tenant"]
    await fleet.redis.set(key, json.dumps(old))
    assert (await fleet.admin.get("old-one")).tenant == "default"
    with pytest.raises(ApiError, match="404 session_not_found"):
        await fleet.acme.get("old-one")
    await fleet.worker_event("old-one")
    published = [e for e in await stored(fleet.admin, "old-one") if e.type == "dockerd.ready"]
    assert [e.data["tenant"] for e in published] == ["default"]


async def test_ids_left_in_a_tenants_count_without_their_record_are_pruned_at_the_quota(fleet: Fleet) -> None:
    """What an older process's delete (its script knows no tenant set) or an operator's DEL
    leaves: ids counted without their record, or with a record another tenant made anew since.
    At the quota, the create prunes them and goes through; a real quota still refuses."""
    await fleet.acme.create("acme-one")
    await fleet.beta.create("beta-one")
    counted = fleet.keys.tenant_sessions("acme")
    await awaited(fleet.redis.sadd(counted, "ghost-one", "beta-one"))  # gone; now beta's
    assert await awaited(fleet.redis.scard(counted)) == QUOTA
    second = await fleet.acme.create("acme-two")
    assert {m.decode() for m in await awaited(fleet.redis.smembers(counted))} == {"acme-one", "acme-two"}
    await fleet.acme.create("acme-three")
    with pytest.raises(ApiError, match="429 quota_exceeded"):
        await fleet.acme.create()
    assert {s.id for s in await fleet.acme.list()} == {"acme-one", second.id, "acme-three"}
    assert await awaited(fleet.redis.sismember(fleet.keys.tenant_sessions("beta"), "beta-one"))
