"""The worker's own /metrics (Prometheus, through prometheus-client): job and readiness
histograms observed as they happen, and gauges read from Redis at each scrape, served by a
small aiohttp app on ORCH_WORKER_METRICS_PORT (0: not served)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.queue import Operation, Rejection
from orchestrator.states import SandboxStatus

log = logging.getLogger("workers.metrics")

# Seconds: job durations and dockerd readiness run from ~10 ms (a no-op) to a minute.
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A scraper needs the samples, not when each series was first seen.
disable_created_metrics()  # type: ignore[no-untyped-call]  # (untyped in prometheus-client)


@dataclass(frozen=True)
class Snapshot:
    """What the gauges show, read once per scrape."""

    queue_depth: int
    oldest_queued_age_s: float
    jobs_running: int
    sessions_by_state: dict[str, int]
    capacity: int
    pool_ready: int
    pool_target: int
    status: SandboxStatus
    # Labelled desktops and volumes the last reconcile pass kept for want of evidence (H3).
    unknown_objects: int = 0
    # The pool per flavor (workers/pool.py): flavor -> (ready, target).
    pool_by_flavor: dict[str, tuple[int, int]] = field(default_factory=dict)


class _Gauges(Collector):
    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self.snapshot: Snapshot | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        if s is None:
            return
        one = [self.sandbox_id]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["sandbox"])
            family.add_metric(one, value)
            return family

        yield gauge("orchestrator_queue_depth", "Jobs queued for this sandbox.", s.queue_depth)
        yield gauge(
            "orchestrator_queue_oldest_age_seconds", "Age of the oldest queued job (0: none).", s.oldest_queued_age_s
        )
        yield gauge("orchestrator_jobs_running", "Jobs this worker runs now.", s.jobs_running)
        by_state = GaugeMetricFamily(
            "orchestrator_sandbox_sessions", "This sandbox's sessions by state.", labels=["sandbox", "state"]
        )
        for state, count in s.sessions_by_state.items():
            by_state.add_metric([self.sandbox_id, state], count)
        yield by_state
        yield gauge("orchestrator_sandbox_capacity", "Sessions this sandbox takes.", s.capacity)
        yield gauge("orchestrator_pool_ready", "Warm desktops ready and unclaimed.", s.pool_ready)
        yield gauge("orchestrator_pool_target", "Warm desktops to keep ready.", s.pool_target)
        for name, doc, index in (
            ("orchestrator_pool_flavor_ready", "Warm desktops ready and unclaimed, per flavor.", 0),
            ("orchestrator_pool_flavor_target", "Warm desktops to keep ready, per flavor.", 1),
        ):
            per_flavor = GaugeMetricFamily(name, doc, labels=["sandbox", "flavor"])
            for flavor, counts in s.pool_by_flavor.items():
                per_flavor.add_metric([self.sandbox_id, flavor], counts[index])
            yield per_flavor
        yield gauge(
            "orchestrator_reconcile_unknown_objects",
            "Labelled desktops and volumes no record, tombstone or pool entry explains: kept, not removed.",
            s.unknown_objects,
        )
        status = GaugeMetricFamily(
            "orchestrator_sandbox_status", "1 for this sandbox's status.", labels=["sandbox", "status"]
        )
        for each in (SandboxStatus.AVAILABLE, SandboxStatus.DRAINING, SandboxStatus.DRAINED):
            status.add_metric([self.sandbox_id, each.value], int(each is s.status))
        yield status


@dataclass
class WorkerMetrics:
    sandbox_id: str
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        self.job_seconds = Histogram(
            "orchestrator_job_duration_seconds",
            "Lifecycle job run time, by operation.",
            ["operation"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.dockerd_ready_seconds = Histogram(
            "orchestrator_dockerd_ready_seconds",
            "From desktop start to its dockerd answering /_ping.",
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.jobs_rejected = Counter(
            "orchestrator_jobs_rejected",
            "Malformed jobs removed from the queue unrun, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self._gauges = _Gauges(self.sandbox_id)
        self.registry.register(self._gauges)

    def observe_job(self, operation: Operation, seconds: float) -> None:
        self.job_seconds.labels(operation=operation.value).observe(seconds)

    def observe_rejected(self, reason: Rejection) -> None:
        self.jobs_rejected.labels(reason=reason.value).inc()

    def observe_dockerd_ready(self, seconds: float) -> None:
        self.dockerd_ready_seconds.observe(seconds)

    def render(self, snapshot: Snapshot) -> bytes:
        self._gauges.snapshot = snapshot
        return generate_latest(self.registry)


@contextlib.asynccontextmanager
async def serving(port: int, metrics: WorkerMetrics, read: Callable[[], Awaitable[Snapshot]]) -> AsyncIterator[None]:
    """Serve ``GET /metrics`` on ``port`` (all interfaces: scrapers come from outside the
    sandbox; its firewall keeps desktops off it) for the duration of the block."""
    if not port:
        yield
        return

    async def answer(_: web.Request) -> web.Response:
        body = metrics.render(await read())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "0.0.0.0", port).start()
        log.info("worker metrics on :%d/metrics", port)
        yield
    finally:
        await runner.cleanup()
