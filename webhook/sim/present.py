"""`ipguard simulate`: the comparison as a table (and the per-zone picture at the end), or as JSON."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from webhook.report import format_table
from webhook.sim.replay import Comparison, RunResult

HEADERS = ("scenario", "run", "running", "sandbox failures", "pending", "stuck", "steered", "denied", "false denials")


def _row(name: str, result: RunResult) -> tuple[object, ...]:
    c = result.counts
    if not result.with_ipguard:
        return (name, "without", c.running, c.sandbox_failures, c.pending, c.stuck, "-", "-", "-")
    return (name, "with ipguard", c.running, c.sandbox_failures, c.pending, c.stuck, c.steered, c.denied,
            c.false_denials)


def comparison_text(comparisons: Sequence[Comparison]) -> str:
    rows = []
    for comparison in comparisons:
        rows.append(_row(comparison.scenario, comparison.without))
        rows.append(_row("", comparison.with_ipguard))
    lines = [format_table(HEADERS, rows), ""]
    for comparison in comparisons:
        before = comparison.without.counts.sandbox_failures
        after = comparison.with_ipguard.counts.sandbox_failures
        share = f"{100.0 * after / before:.1f}%" if before else ("0 of 0" if not after else "n/a (none without)")
        causes = ", ".join(f"{k} {v}" for k, v in sorted(comparison.with_ipguard.counts.causes.items())) or "none"
        line = f"{comparison.scenario}: sandbox failures with ipguard {after} of {before} without ({share}); "
        line += f"causes with ipguard: {causes}"
        if comparison.reserve_for_zero is not None:
            line += f"; smallest zoneReserve with no sandbox failure: {comparison.reserve_for_zero}"
        lines.append(line)
    for comparison in comparisons:
        lines += ["", f"{comparison.scenario}: zones at the end (with ipguard)"]
        lines.append(format_table(
            ("zone", "nodes", "pod addresses", "held free", "subnet free", "free /28s"),
            [(z.zone, z.nodes, z.pods, z.held_free, z.subnet_free, z.free_blocks)
             for z in comparison.with_ipguard.zones],
        ))
    return "\n".join(lines)


class ProgressBar:
    """A one-line bar on a terminal (nothing elsewhere), per scenario and run."""

    def __init__(self, out: TextIO | None = None, width: int = 30) -> None:
        self.out = out or sys.stderr
        self.width = width
        self.label = ""
        self.enabled = self.out.isatty()
        self._last = -1

    def start(self, label: str) -> None:
        self.label = label
        self._last = -1

    def __call__(self, now: float, duration: float) -> None:
        if not self.enabled:
            return
        filled = int(self.width * min(now / duration, 1.0)) if duration else self.width
        if filled == self._last:
            return
        self._last = filled
        self.out.write(f"\r{self.label:<40} [{'#' * filled}{'.' * (self.width - filled)}] {now:.0f}/{duration:.0f}s")
        self.out.flush()

    def done(self) -> None:
        if self.enabled:
            self.out.write("\r" + " " * (self.width + 60) + "\r")
            self.out.flush()
