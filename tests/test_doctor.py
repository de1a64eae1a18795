"""`ipguard doctor` on snapshots (hand-worked figures) and on a live cluster (moto's EC2, the fake API server).

m5.large: 3 ENIs x 9 secondary IPs = 27 pod IPs (max-pods 29); ipamd's warm pool under WARM_ENI_TARGET=1.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import live
from tests.fakekube import FakeKube
from tests.live import aws_env  # noqa: F401  (autouse fixture)
from webhook.cli import main

A, B = "subnet-0a000000000000001", "subnet-0b000000000000002"


def _snapshot(tmp_path: Path, **extra: Any) -> str:
    doc: dict[str, Any] = {
        "cni": {"WARM_ENI_TARGET": "1"},
        "settings": {"mode": "enforce", "zoneReserve": "3"},
        "subnets": [{"id": A, "zone": "us-east-1a", "cidr": "10.0.1.0/24", "free": 1, "freeBlocks": 0},
                    {"id": B, "zone": "us-east-1b", "cidr": "10.0.2.0/24", "free": 200, "freeBlocks": 10}],
        "nodes": [
            {"name": "a-full", "zone": "us-east-1a", "type": "m5.large", "subnet": A, "pods": {"ip": 27}},
            # 10 pods, max-pods 12: ipamd stops once it holds max-pods IPs, a whole ENI at a time: 18, 8 idle
            {"name": "a-idle", "zone": "us-east-1a", "type": "m5.large", "subnet": A, "allocatablePods": 12,
             "pods": {"ip": 10}},
            {"name": "b-1", "zone": "us-east-1b", "type": "m5.large", "subnet": B, "pods": {"ip": 5}},
        ],
    }
    doc.update(extra)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _doctor(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]]]:
    code = main(["doctor", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def _by_code(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f["code"]: f for f in found}


def test_exhausted_zone_with_idle_warm_pools_and_pods_in_one_zone_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Zone a: a-full has no room; a-idle has room 2 (12 - 10) and 8 idle IPs: headroom min(2, 8) = 2, at or
    below the reserve 3; its subnet's 1 address funds no new node (a primary and a whole ENI): out of
    addresses, so pods schedule only in us-east-1b. No free /28: prefix delegation would not help."""
    code, found = _doctor(capsys, "--snapshot", _snapshot(tmp_path))
    codes = _by_code(found)
    assert code == 1
    zone = codes["zone-exhausted"]
    assert zone["severity"] == "action"
    assert (zone["evidence"]["headroom"], zone["evidence"]["warmFree"], zone["evidence"]["reserve"]) == (2, 8, 3)
    assert "hold 8 address(es) idle" in zone["fix"] and "would not help" in zone["fix"]
    some = codes["pods-schedule-in-some-zones"]
    assert some["summary"].startswith("pods can only schedule in us-east-1b")
    assert {z["zone"]: z["headroom"] for z in some["evidence"]["zones"]}["us-east-1a"] == 2


def test_prefix_delegation_suggested_where_nodes_are_nitro_and_blocks_are_free(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _snapshot(tmp_path)
    doc = yaml.safe_load(Path(path).read_text())
    doc["subnets"][0].update(free=40, freeBlocks=2)
    doc["nodes"] = [n for n in doc["nodes"] if n["name"] != "a-full"]
    Path(path).write_text(yaml.safe_dump(doc))
    _, found = _doctor(capsys, "--snapshot", path)
    zone = _by_code(found)["zone-exhausted"]
    assert "2 of 2" not in zone["fix"]  # one node left in the zone
    assert "ENABLE_PREFIX_DELEGATION=true): 1 of 1 node(s) here are Nitro and the pod subnets have 2 free /28" in (
        zone["fix"])


def test_prefix_delegation_with_free_addresses_but_no_free_block(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A /28 needs 16 contiguous free addresses: 40 scattered ones give none (InsufficientCidrBlocks)."""
    path = _snapshot(tmp_path, cni={"ENABLE_PREFIX_DELEGATION": "true", "WARM_PREFIX_TARGET": "1"})
    doc = yaml.safe_load(Path(path).read_text())
    doc["subnets"][0].update(free=40, freeBlocks=0)
    Path(path).write_text(yaml.safe_dump(doc))
    _, found = _doctor(capsys, "--snapshot", path)
    frag = _by_code(found)["prefix-fragmented"]
    assert frag["evidence"] == {"subnet": A, "zone": "us-east-1a", "cidr": "10.0.1.0/24", "freeIps": 40,
                                "freeBlocks": 0}


def test_custom_networking_max_pods_and_eniconfig_in_another_zone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Custom networking: the primary ENI carries no pod IP, so m5.large holds 2 x 9 = 18 (max-pods 20); nodes
    left at 29 are the classic mistake. ENIConfig us-east-1b points at a subnet in us-east-1a."""
    c = "subnet-0c000000000000003"
    path = _snapshot(
        tmp_path,
        cni={"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true", "ENI_CONFIG_LABEL_DEF": "topology.kubernetes.io/zone"},
        eniConfigs={"us-east-1a": A, "us-east-1b": c},
    )
    doc = yaml.safe_load(Path(path).read_text())
    doc["subnets"][0].update(free=200, freeBlocks=10)
    doc["subnets"].append({"id": c, "zone": "us-east-1a", "cidr": "100.64.0.0/24", "free": 200})
    for node in doc["nodes"]:
        node.update(allocatablePods=29, pods={"ip": 5})
    Path(path).write_text(yaml.safe_dump(doc))
    code, found = _doctor(capsys, "--snapshot", path)
    codes = _by_code(found)
    assert code == 1
    over = codes["max-pods-over-ip-capacity"]
    assert over["evidence"] == {"instanceType": "m5.large", "maxPods": 29, "podIpCapacity": 18, "rightMaxPods": 20,
                                "nodes": ["a-full", "a-idle", "b-1"]}
    assert "--custom-networking" in over["fix"]
    wrong = codes["wrong-zone"]
    assert wrong["severity"] == "action" and c in wrong["summary"]


def test_zone_without_eniconfig(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _snapshot(
        tmp_path,
        cni={"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true", "ENI_CONFIG_LABEL_DEF": "topology.kubernetes.io/zone"},
        eniConfigs={"us-east-1b": B},
    )
    _, found = _doctor(capsys, "--snapshot", path)
    missing = _by_code(found)["zone-without-eniconfig"]
    assert missing["severity"] == "action" and "2 node(s) in us-east-1a" in missing["summary"]


def test_security_group_policy_not_applied_said_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ENABLE_POD_ENI off: the resource controller gives no pod a branch ENI; every policy is without effect."""
    policies = [{"metadata": {"name": f"p{i}", "namespace": "shop"},
                 "spec": {"podSelector": {"matchLabels": {"app": "x"}}, "securityGroups": {"groupIds": ["sg-1"]}}}
                for i in range(2)]
    _, found = _doctor(capsys, "--snapshot", _snapshot(tmp_path, securityGroupPolicies=policies))
    applied = [f for f in found if f["code"] == "sg-policy-not-applied"]
    assert len(applied) == 1 and applied[0]["summary"].startswith("2 SecurityGroupPolicy(ies) will not apply")
    assert "ENABLE_POD_ENI=true" in applied[0]["fix"]


def test_cluster_subnet_below_what_an_upgrade_needs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """EKS needs 5 free addresses in the cluster subnets to place new control-plane ENIs in an upgrade."""
    _, found = _doctor(capsys, "--snapshot", _snapshot(tmp_path, clusterName="demo", clusterSubnets=[A, B]))
    [low] = [f for f in found if f["code"] == "cluster-subnet-low"]
    assert low["evidence"] == {"subnet": A, "zone": "us-east-1a", "freeIps": 1, "needed": 5, "podSubnet": True,
                               "cluster": "demo"}
    assert "zoneReserves: us-east-1a=5" in low["fix"]


def test_healthy_cluster_with_only_information_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _snapshot(tmp_path, cni={"WARM_IP_TARGET": "2"})
    doc = yaml.safe_load(Path(path).read_text())
    doc["subnets"][0].update(free=200, freeBlocks=10)
    doc["nodes"][:2] = [{"name": "a-1", "zone": "us-east-1a", "type": "m5.large", "subnet": A, "pods": {"ip": 5}}]
    Path(path).write_text(yaml.safe_dump(doc))
    code, found = _doctor(capsys, "--snapshot", path)
    assert code == 0 and [f["code"] for f in found] == ["warm-ip-target-churn"]
    assert main(["doctor", "--snapshot", path]) == 0
    assert "0 needing action" in capsys.readouterr().out


def test_unreadable_snapshot_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--snapshot", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("ipguard: ")


def _event(name: str, pod: str, node: str, message: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Event", "metadata": {"name": name, "namespace": "shop"},
            "involvedObject": {"kind": "Pod", "namespace": "shop", "name": pod},
            "reason": "FailedCreatePodSandBox", "type": "Warning", "message": message, "count": 3,
            "source": {"component": "kubelet", "host": node},
            "lastTimestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


def test_doctor_live_reads_events_ec2_and_the_control_plane(
        moto: live.Moto, capsys: pytest.CaptureFixture[str]) -> None:
    """The live cluster of tests/live.py: node A's 18 IPs all used on 2 ENIs, its /27 with 7 free addresses, a
    third ENI needs 10: us-east-1a headroom 0, reserve 3. The control plane has an ENI in that subnet (6 left),
    and another workload takes 4 more: 2 free, below the 5 an upgrade needs. A FailedCreatePodSandBox event on
    node A is matched to us-east-1a and the growth the index shows."""
    ec2 = moto.ec2()
    ec2c = live.build_ec2(ec2)
    ec2.create_network_interface(SubnetId=ec2c.subnet_a, Description="Amazon EKS demo")
    live.consume(ec2, ec2c.subnet_a, 3)
    fk = FakeKube()
    url = fk.start_in_thread()
    try:
        fk.call(live.load_kube(fk, ec2c))
        fk.call(fk.create("events", _event("a-17.1", "a-17", "ip-10-0-1-10.ec2.internal",
                                           "Failed to create pod sandbox: plugin type=\"aws-cni\" failed (add): add "
                                           "cmd: failed to assign an IP address to container"), namespace="shop"))
        code, found = _doctor(capsys, "--live", "--kube-host", url, "--ec2-endpoint-url", moto.url, "--region",
                              live.REGION, "--cluster-name", "demo", "--timeout", "20")
    finally:
        fk.stop_in_thread()
    codes = _by_code(found)
    assert code == 1
    assert codes["zone-exhausted"]["evidence"]["zone"] == "us-east-1a"
    [event] = codes["failed-create-pod-sandbox"]["evidence"]["events"]
    assert (event["pod"], event["zone"], event["cause"], event["count"]) == (
        "shop/a-17", "us-east-1a", "ipamd had no IP for the pod", 3)
    assert "address(es)" in event["indexShows"]
    low = codes["cluster-subnet-low"]["evidence"]
    assert (low["subnet"], low["freeIps"], low["cluster"]) == (ec2c.subnet_a, 2, "demo")


async def test_sandbox_events_are_recent_pod_sandbox_failures_only() -> None:
    """Only reason FailedCreatePodSandBox on Pods, seen within the window; newest first."""
    from kubernetes_asyncio import client as k8s

    from webhook.sources.events import sandbox_events

    fk = FakeKube()
    url = await fk.start()
    now = dt.datetime.now(dt.UTC)

    def at(event: dict[str, Any], seconds_ago: int) -> dict[str, Any]:
        event["lastTimestamp"] = (now - dt.timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return event

    await fk.create("events", at(_event("new", "p-1", "n-1", "failed to assign an IP address"), 60), namespace="shop")
    await fk.create("events", at(_event("newer", "p-2", "n-1", "failed to assign an IP address"), 10),
                    namespace="shop")
    await fk.create("events", at(_event("old", "p-3", "n-1", "failed to assign an IP address"), 7200),
                    namespace="shop")
    other = at(_event("sched", "p-4", "n-1", "0/3 nodes are available"), 5)
    other["reason"] = "FailedScheduling"
    await fk.create("events", other, namespace="shop")
    api = k8s.ApiClient(k8s.Configuration(host=url))
    try:
        events = await sandbox_events(api, 3600, now)
    finally:
        await api.close()
        await fk.stop()
    assert [(e.pod, e.node, e.count) for e in events] == [("p-2", "n-1", 3), ("p-1", "n-1", 3)]


def test_event_with_no_address_cause_is_information(tmp_path: Path) -> None:
    """An event whose message names no address problem, on a node and zone the index shows with room, needs no
    action from ipguard's side; the pod's node is found from the pod when the event names no host."""
    from webhook.doctor import event_findings, snapshot_facts
    from webhook.sources.events import SandboxEvent

    path = _snapshot(tmp_path)
    facts = snapshot_facts(path)
    [finding] = event_findings(facts.state, [SandboxEvent("apps", "b-1-app-0", None, "netplugin failed: timeout")])
    [row] = finding.evidence["events"]
    assert finding.severity == "info"
    assert (row["node"], row["zone"], row["cause"], row["indexShows"]) == (
        "b-1", "us-east-1b", "not an address problem", "no shortage there now")
