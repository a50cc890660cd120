"""Prometheus text exposition (format 0.0.4), written by hand, for the worker's /metrics (the
API's goes through prometheus_client: orchestrator/api_metrics.py). Pure. Also the autoscaling
signal, which the API exports."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Seconds: job durations and dockerd readiness run from ~10 ms (a no-op) to a minute.
DEFAULT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)

Labels = Mapping[str, str]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def family(name: str, kind: str, help: str, samples: Iterable[tuple[Labels, float]]) -> list[str]:
    """One metric family: HELP, TYPE and its samples (labels, value)."""
    lines = [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples]
    return lines


@dataclass
class Histogram:
    """A cumulative histogram per label set, as Prometheus wants it."""

    name: str
    help: str
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    _series: dict[tuple[tuple[str, str], ...], tuple[list[int], list[float]]] = field(default_factory=dict)

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        counts, totals = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        totals[0] += value

    def count(self, **labels: str) -> int:
        series = self._series.get(tuple(sorted(labels.items())))
        return sum(series[0]) if series else 0

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, (counts, totals) in sorted(self._series.items()):
            labels = dict(key)
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                running += n
                lines.append(f"{self.name}_bucket{_labels({**labels, 'le': _number(bound)})} {running}")
            lines.append(f"{self.name}_sum{_labels(labels)} {_number(totals[0])}")
            lines.append(f"{self.name}_count{_labels(labels)} {running}")
        return lines


def desired_sandboxes(placed_total: int, capacities: Iterable[int], fallback_cap: int) -> int:
    """The autoscaling signal: sandboxes needed so that every session holding a place fits,
    at the mean cap of the sandboxes there are (``fallback_cap`` when there are none):
    ``ceil(placed / mean cap)``, at least 1."""
    caps = [c for c in capacities if c > 0]
    cap = sum(caps) / len(caps) if caps else max(fallback_cap, 1)
    return max(1, math.ceil(placed_total / cap))
