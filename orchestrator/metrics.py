"""The autoscaling signal, pure. (Prometheus exposition is prometheus-client's: the API's in
api_metrics.py, the worker's in workers/metrics.py.)"""

from __future__ import annotations

import math
from collections.abc import Iterable


def desired_sandboxes(placed_total: int, capacities: Iterable[int], fallback_cap: int) -> int:
    """The autoscaling signal: sandboxes needed so that every session holding a place fits,
    at the mean cap of the sandboxes there are (``fallback_cap`` when there are none):
    ``ceil(placed / mean cap)``, at least 1."""
    caps = [c for c in capacities if c > 0]
    cap = sum(caps) / len(caps) if caps else max(fallback_cap, 1)
    return max(1, math.ceil(placed_total / cap))
