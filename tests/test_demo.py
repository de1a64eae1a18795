"""`ipguard demo`: the embedded demo cluster, the webhook over real HTTPS, a Deployment scaled through it."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from webhook.cli import main
from webhook.demo import run_demo
from webhook.model.pods import ZONE_LABEL
from webhook.scheduler import node_fits
from webhook.sources.snapshot import load_snapshot

CLUSTER = Path(__file__).resolve().parent.parent / "examples" / "cluster.yaml"
A, B, C = "us-east-1a", "us-east-1b", "us-east-1c"


async def test_demo_steers_admits_and_denies() -> None:
    snapshot = load_snapshot(CLUSTER)
    reserve = snapshot.settings.reserve_for_zone(A)
    before = {z: snapshot.build_index().zone_headroom(z) for z in (A, B, C)}
    assert before[A] < before[B] and before[A] < before[C]  # us-east-1a is the nearly full zone
    out = io.StringIO()
    tally = await run_demo(snapshot, replicas=36, pinned=2, out=out)
    text = out.getvalue()

    # The Deployment: every replica admitted and bound; once 1a reaches its reserve the rest steer away.
    assert sum(tally.admitted.values()) + tally.unschedulable == 36
    assert tally.unschedulable == 0
    assert tally.steered_away[A] > 0 and tally.steered_away[B] == tally.steered_away[C] == 0
    assert tally.admitted[A] <= before[A] - reserve  # never into the reserve
    assert tally.admitted[B] > 0 and tally.admitted[C] > 0
    steered_lines = [line for line in text.splitlines() if "steered away from us-east-1a" in line]
    assert len(steered_lines) == tally.steered_away[A]
    assert all(f"-> {A}" not in line for line in steered_lines)
    first_steered = text.index(steered_lines[0])
    assert f"-> {A}" not in text[first_steered:]  # after the first steer, nothing more lands in 1a

    # The pinned Deployment (nodeSelector 1a) is denied with a real message.
    assert tally.denied == {A: 2}
    assert text.count("DENIED     (no pod IPs in us-east-1a)") == 2
    message = tally.denial_message
    assert message is not None
    # us-east-1a still has a few free IPs, all kept back by its reserve: the denial says so, and how to lower it
    assert re.match(r"^ipguard: pod shop/cache-7b8c6d5f4-[a-z0-9]{5} would take a pod IP that ipguard keeps in "
                    r"reserve", message)
    assert f"{A}: " in message and f"kept back by its reserve of {reserve}" in message and "free pod IPs" in message
    assert "lower zoneReserve" in message
    assert "subnet-0a1b2c3d4e5f60718" in message
    assert "Fix: " in message and ("prefix delegation" in message or "subnet" in message)
    assert B not in message and C not in message
    assert 'Error from server (Forbidden): admission webhook "validate.ipguard.io" denied the request: ' in text

    # The table at the end agrees with the tally.
    row = next(line for line in text.splitlines() if line.startswith(A))
    assert row.split()[1:4] == [str(tally.admitted[A]), str(tally.steered_away[A]), "2"]
    assert "webhook serving on https://127.0.0.1:" in text


async def test_demo_with_no_pressure_admits_everything_without_steering() -> None:
    out = io.StringIO()
    tally = await run_demo(load_snapshot(CLUSTER), replicas=3, pinned=0, out=out)
    assert sum(tally.admitted.values()) == 3
    assert not tally.steered_away and not tally.denied and tally.denial_message is None
    assert "DENIED     (" not in out.getvalue()


def test_cli_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--replicas", "6", "--pinned", "1"]) == 0
    output = capsys.readouterr().out
    assert "Scaling Deployment shop/web to 6 replicas" in output
    assert "ZONE" in output and "HEADROOM-AFTER" in output


def test_cli_demo_rejects_bad_arguments(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "--replicas", "-1"]) == 2
    missing = tmp_path / "missing.yaml"
    assert main(["demo", "--snapshot", str(missing)]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_demo_scheduler_honours_affinity() -> None:
    labels = {ZONE_LABEL: A, "kubernetes.io/hostname": "n1"}
    steered = {"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": ZONE_LABEL, "operator": "NotIn", "values": [A]}]}]}}}}}
    assert not node_fits(steered, labels)
    assert node_fits(steered, {**labels, ZONE_LABEL: B})
    assert not node_fits({"spec": {"nodeSelector": {ZONE_LABEL: B}}}, labels)
