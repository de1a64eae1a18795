"""The simulator stays off the request path, and its data plane stays independent of ipguard's capacity model:
only the instance-type limits table and the CNI settings parser are shared (plus the snapshot loader and the
demo's pod shapes, which hold no capacity arithmetic). Only feed.py and replay.py talk to ipguard itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.paths import REPO

PACKAGE = REPO / "webhook"
DATA_PLANE = ["addresses", "ec2", "ipamd", "scheduler", "cluster", "oracle", "workload", "scenario"]
SHARED = {"webhook.model.limits", "webhook.model.instance_types", "webhook.model.cni", "webhook.sources.snapshot",
          "webhook.demo"}


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_nothing_outside_the_simulator_imports_it_but_the_command() -> None:
    offenders = [
        str(path.relative_to(REPO)) for path in PACKAGE.rglob("*.py")
        if "sim" not in path.relative_to(PACKAGE).parts[:1] and path.name != "cli.py"
        and any(name.startswith("webhook.sim") for name in imports(path))
    ]
    assert offenders == []


@pytest.mark.parametrize("module", DATA_PLANE)
def test_simulated_data_plane_shares_only_the_limits_table_and_cni_parser(module: str) -> None:
    used = {name for name in imports(PACKAGE / "sim" / f"{module}.py")
            if name.startswith("webhook.") and not name.startswith("webhook.sim")}
    assert used <= SHARED, used - SHARED
