"""`ipguard simulate SCENARIO... [--snapshot FILE] [--mode enforce|warn] [--json]`."""

from __future__ import annotations

import argparse
import json
import sys

from webhook.sim.present import ProgressBar, comparison_text
from webhook.sim.replay import Comparison, compare
from webhook.sim.scenario import ScenarioError, find_scenario, load_scenario


def simulate(args: argparse.Namespace) -> int:
    progress = ProgressBar()
    comparisons: list[Comparison] = []
    for name in args.scenarios:
        try:
            scenario = load_scenario(find_scenario(name), snapshot=args.snapshot)
            comparisons.append(compare(scenario, mode=args.mode, progress=progress))
        except ScenarioError as exc:
            progress.done()
            print(f"ipguard: {exc}", file=sys.stderr)
            return 1
        progress.done()
    if args.json:
        print(json.dumps([c.as_json() for c in comparisons], indent=2))
    else:
        print(comparison_text(comparisons))
    return 0
