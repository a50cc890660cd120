"""The benchmark suite: `make bench`, or `python -m bench [SCENARIO ...] [-n N]`.

Runs against the project's dockerd and Redis (scripts/env.sh; DOCKER_HOST and REDIS_URL from
/run/orchestrator-dev/env), prints p50/p95/p99, success rate and the project/baseline ratio of
each scenario, and writes everything to bench/results/bench-<time>.json."""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import access, commands, graphical, idle, scenarios, screen
from .harness import Result, print_table, write_results

SCENARIOS = {
    **scenarios.SCENARIOS,
    **access.SCENARIOS,
    **commands.SCENARIOS,
    **idle.SCENARIOS,
    **graphical.SCENARIOS,
    **screen.SCENARIOS,
}
DEFAULT_N = {
    **scenarios.DEFAULT_N,
    **access.DEFAULT_N,
    **commands.DEFAULT_N,
    **idle.DEFAULT_N,
    **graphical.DEFAULT_N,
    **screen.DEFAULT_N,
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS], help="default: all")
    parser.add_argument("-n", type=int, help="rounds per scenario (default: each scenario's own)")
    args = parser.parse_args()
    results: list[Result] = []
    for name in args.scenarios or list(SCENARIOS):
        n = args.n or DEFAULT_N[name]
        print(f"== {name} (n={n})", flush=True)
        results += asyncio.run(SCENARIOS[name](n))
    print_table(results)
    print(f"\nwritten {write_results(results, 'bench')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
