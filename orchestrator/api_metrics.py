"""The API's /metrics, rendered by prometheus_client.

prometheus_client collects synchronously, and the numbers live in Redis: so a scrape first
reads everything it needs with async Redis (:func:`read_snapshot`), then renders a registry
holding one :class:`ApiCollector` over that snapshot (:func:`render`). A registry per scrape
keeps concurrent scrapes from sharing a snapshot."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .commands import StreamLag
from .core import Core
from .metrics import desired_sandboxes
from .placement import low_disk
from .queue import oldest_age_s
from .schemas import SandboxInfo
from .service import Sessions
from .states import SandboxStatus, SessionState

# A fresh heartbeat: draining sandboxes take no new sessions, but are up.
LIVE = (SandboxStatus.AVAILABLE, SandboxStatus.DRAINING)


@dataclass(frozen=True)
class ApiSnapshot:
    """What one scrape shows, as read from Redis and this API process."""

    sessions_by_state: Mapping[str, int]  # every state, 0 when none
    sandboxes: Sequence[SandboxInfo]
    queued: Mapping[str, int]  # by sandbox id
    oldest_queued_age_s: Mapping[str, float]  # by sandbox id, 0 when none
    firehose_length: int
    capacity_refusals: int
    sse_followers: int
    # The cap assumed for the autoscaling signal while no sandbox is live.
    fallback_cap: int
    # Accesses into desktops (terminals, files, ports) this API process opened, by road.
    access_opened: Mapping[str, int] = dataclasses.field(default_factory=dict)
    # The command stream's backlog, by tenant (commands.CommandConsumer.lag).
    commands: Mapping[str, StreamLag] = dataclasses.field(default_factory=dict)
    # This process's kept connections to desktop ports (port_pool.PortConnections), once used.
    port_connections: PortPoolStats | None = None


@dataclass(frozen=True)
class PortPoolStats:
    kept: int  # idle now, ready for the next request to their port
    opened: int  # new routes into a desktop's port
    reused: int  # requests that took a kept connection instead


async def read_snapshot(
    service: Sessions,
    core: Core,
    sse_followers: int,
    access_opened: Mapping[str, int] | None = None,
    commands: Mapping[str, StreamLag] | None = None,
    port_connections: PortPoolStats | None = None,
) -> ApiSnapshot:
    """The sessions, the sandboxes, then their queues and the firehose in one pipeline."""
    counts = dict.fromkeys((s.value for s in SessionState), 0)
    for record in await service.list(None, {}):
        counts[record.state.value] += 1
    sandboxes = await service.sandboxes()
    keys = core.keys
    async with core.redis.pipeline(transaction=False) as pipe:
        for sandbox in sandboxes:
            pipe.zcard(keys.queue(sandbox.id))
            pipe.zrange(keys.queue(sandbox.id), 0, 0, withscores=True)
        pipe.xlen(keys.firehose)
        replies = await pipe.execute()
    now = time.time()
    return ApiSnapshot(
        sessions_by_state=counts,
        sandboxes=sandboxes,
        queued={s.id: int(replies[2 * n]) for n, s in enumerate(sandboxes)},
        oldest_queued_age_s={s.id: oldest_age_s(replies[2 * n + 1], now) for n, s in enumerate(sandboxes)},
        firehose_length=int(replies[-1]),
        capacity_refusals=service.capacity_refusals,
        sse_followers=sse_followers,
        fallback_cap=service.settings.max_sessions,
        access_opened={road: access_opened.get(road, 0) for road in ("direct", "relay")} if access_opened else {},
        commands=commands or {},
        port_connections=port_connections,
    )


def _gauge(name: str, help: str, label: str, samples: Iterable[tuple[str, float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help, labels=[label])
    for value_of_label, value in samples:
        family.add_metric([value_of_label], value)
    return family


class ApiCollector:
    """The API's metric families over one snapshot (a prometheus_client Collector: it has
    ``collect``). Names, HELP texts and labels are what dashboards and alerts query."""

    def __init__(self, snapshot: ApiSnapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        # In this order, as before the split: the fleet, each sandbox, then this API process.
        yield from _fleet(self.snapshot)
        yield from _per_sandbox(self.snapshot)
        yield from _this_process(self.snapshot)


def _fleet(s: ApiSnapshot) -> Iterator[Metric]:
    boxes = s.sandboxes
    yield _gauge("orchestrator_sessions", "Sessions by state.", "state", s.sessions_by_state.items())
    yield _gauge(
        "orchestrator_sandboxes",
        "Known sandboxes by status.",
        "status",
        ((status.value, sum(1 for b in boxes if b.status == status)) for status in SandboxStatus),
    )
    yield GaugeMetricFamily(
        "orchestrator_sandboxes_live",
        "Sandboxes with a fresh heartbeat (available or draining).",
        sum(1 for b in boxes if b.status in LIVE),
    )


def _per_sandbox(s: ApiSnapshot) -> Iterator[Metric]:
    boxes = s.sandboxes

    def per_sandbox(name: str, help: str, values: Mapping[str, float]) -> GaugeMetricFamily:
        return _gauge(name, help, "sandbox", ((b.id, values[b.id]) for b in boxes))

    yield per_sandbox(
        "orchestrator_sandbox_up",
        "1 while the sandbox's heartbeat is fresh.",
        {b.id: int(b.status in LIVE) for b in boxes},
    )
    yield per_sandbox(
        "orchestrator_sandbox_placed",
        "Sessions placed on the sandbox and not deleted (what its cap counts).",
        {b.id: b.placed for b in boxes},
    )
    yield per_sandbox("orchestrator_sandbox_capacity", "The sandbox's cap.", {b.id: b.capacity for b in boxes})
    yield per_sandbox(
        "orchestrator_sandbox_free_disk_bytes",
        "Free bytes on the sandbox's dockerd data root (last heartbeat).",
        {b.id: b.free_disk_bytes for b in boxes},
    )
    yield per_sandbox(
        "orchestrator_sandbox_low_disk",
        "1 while the sandbox is below its free-disk watermark: placement skips it.",
        {b.id: int(low_disk(b) is not None) for b in boxes},
    )
    yield per_sandbox("orchestrator_queue_depth", "Jobs queued per sandbox.", s.queued)
    yield per_sandbox(
        "orchestrator_queue_oldest_age_seconds",
        "Age of the oldest queued job per sandbox (0: none).",
        {b.id: round(s.oldest_queued_age_s[b.id], 3) for b in boxes},
    )
    yield per_sandbox(
        "orchestrator_pool_ready",
        "Warm desktops ready and unclaimed, per sandbox (last heartbeat).",
        {b.id: b.pool_ready for b in boxes},
    )
    yield per_sandbox(
        "orchestrator_pool_target", "Warm desktops each sandbox keeps ready.", {b.id: b.pool_target for b in boxes}
    )


def _this_process(s: ApiSnapshot) -> Iterator[Metric]:
    """The autoscaling signal, then what this API process counted."""
    boxes = s.sandboxes
    live = [b for b in boxes if b.status in LIVE]
    desired = desired_sandboxes(sum(b.placed for b in boxes), (b.capacity for b in live), s.fallback_cap)
    yield GaugeMetricFamily(
        "orchestrator_sandboxes_desired",
        "Autoscaling signal: ceil(sessions holding a place / mean cap of live sandboxes), at least 1.",
        desired,
    )
    # prometheus_client names the family without _total and its sample (and, in the text
    # format, its HELP and TYPE) with it: orchestrator_capacity_refusals_total, as before.
    yield CounterMetricFamily(
        "orchestrator_capacity_refusals_total",
        "Creates this API process refused with no_capacity.",
        s.capacity_refusals,
    )
    yield GaugeMetricFamily("orchestrator_event_stream_length", "Entries in the firehose stream.", s.firehose_length)
    yield GaugeMetricFamily(
        "orchestrator_sse_followers", "SSE clients following live events on this API process.", s.sse_followers
    )
    if s.access_opened:
        opened = CounterMetricFamily(
            "orchestrator_access_opened",
            "Terminals, file transfers and port connections this API process opened, by road.",
            labels=["road"],
        )
        for road, count in s.access_opened.items():
            opened.add_metric([road], count)
        yield opened
    if s.commands:
        # Backpressure: commands wait here while the control side is behind (docs/jobs.md).
        yield _gauge(
            "orchestrator_command_lag",
            "Commands added to the tenant's command stream and not yet read by the API.",
            "tenant",
            ((t, v.lag) for t, v in s.commands.items()),
        )
        yield _gauge(
            "orchestrator_command_pending",
            "Commands read and not yet handled (being acted on, or their API process died).",
            "tenant",
            ((t, v.pending) for t, v in s.commands.items()),
        )

    if s.port_connections is not None:
        pool = s.port_connections
        yield GaugeMetricFamily(
            "orchestrator_port_connections_kept",
            "Idle keep-alive connections to desktop ports this API process holds.",
            pool.kept,
        )
        yield CounterMetricFamily(
            "orchestrator_port_connections_opened",
            "New routes into desktop ports this API process opened.",
            pool.opened,
        )
        yield CounterMetricFamily(
            "orchestrator_port_connections_reused",
            "Port requests this API process sent on a kept connection (no new route).",
            pool.reused,
        )


def render(snapshot: ApiSnapshot) -> str:
    """The Prometheus text format (0.0.4) of ``snapshot``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ApiCollector(snapshot))
    return generate_latest(registry).decode()
