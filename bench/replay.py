"""Replay benchmark: the 1,000-pod burst scenario, end to end, without and with ipguard (one replica).

Prints, per run, the wall time, the pods created per wall second, and (with ipguard) the admission reviews
answered per second and their share of the time; then both runs' counts. Target: the burst runs end to end in
under 30 s (both runs together).

    python bench/replay.py [--scenario examples/scenarios/burst-1000.yaml] [--replicas 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webhook.sim.replay import run
from webhook.sim.scenario import SCENARIOS, load_scenario

TARGET_SECONDS = 30.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default=str(SCENARIOS / "burst-1000.yaml"))
    parser.add_argument("--replicas", type=int, default=None, help="ipguard replicas (default: the scenario's)")
    args = parser.parse_args()
    scenario = load_scenario(args.scenario)
    total = 0.0
    print(f"scenario {scenario.name}: {scenario.description}; {scenario.duration:.0f} simulated seconds")
    results = []
    for with_ipguard in (False, True):
        started = time.perf_counter()
        result = run(scenario, with_ipguard=with_ipguard, replicas=args.replicas)
        elapsed = time.perf_counter() - started
        total += elapsed
        results.append(result)
        label = "with ipguard" if with_ipguard else "without"
        line = f"{label:>13}: {elapsed:6.2f} s wall, {result.counts.created / elapsed:7.0f} pods created/s"
        if with_ipguard:
            spent = result.review_seconds
            line += (f", {result.reviews} reviews in {spent:.2f} s ({result.reviews / max(spent, 1e-9):.0f}/s,"
                     f" {100 * spent / elapsed:.0f}% of the run)")
        print(line)
    for result in results:
        c = result.counts
        label = "with ipguard" if result.with_ipguard else "without"
        print(f"{label:>13}: created {c.created}, running {c.running}, sandbox failures {c.sandbox_failures}, "
              f"pending {c.pending}, steered {c.steered}, denied {c.denied}, false denials {c.false_denials}")
    verdict = "met" if total < TARGET_SECONDS else "NOT MET"
    print(f"both runs: {total:.2f} s (target < {TARGET_SECONDS:.0f} s: {verdict})")
    return 0 if total < TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
