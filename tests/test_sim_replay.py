"""Replays on the simulated data plane: the scheduler and autoscaler stand-ins, the feed into ipguard, the
oracle, `ipguard simulate`, and the bundled scenarios (small enough to run here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from webhook import cli
from webhook.model.limits import LimitsTable
from webhook.sim import ipamd as ip
from webhook.sim.cluster import Cluster, SimPod
from webhook.sim.feed import Replica
from webhook.sim.oracle import Oracle, held_free, places, settle
from webhook.sim.replay import compare, run
from webhook.sim.scenario import SCENARIOS, Scenario, build_cluster, load_scenario, parse_scenario
from webhook.sim.scheduler import NodeView, pick_node
from webhook.sim.workload import pod_template

TABLE = LimitsTable()


def tiny(events: list[dict[str, Any]], *, free_a: int = 3, free_b: int = 90, settings: dict[str, str] | None = None,
         extra: dict[str, Any] | None = None, cni: dict[str, str] | None = None) -> Scenario:
    """Two zones of two t3.large nodes (3 ENIs x 12 IPs), WARM_IP_TARGET=2; us-east-1a's subnet nearly dry."""
    nodes = []
    for zone, subnet, octet in (("us-east-1a", "subnet-0a", 1), ("us-east-1b", "subnet-0b", 2)):
        for k in range(2):
            nodes.append({"name": f"ip-10-0-{octet}-{k}.ec2.internal", "zone": zone, "type": "t3.large",
                          "subnet": subnet, "pods": {"ip": 4, "hostNetwork": 2}})
    doc: dict[str, Any] = {
        "name": "tiny",
        "duration": 120,
        "cluster": {
            "cni": cni or {"WARM_IP_TARGET": "2", "MINIMUM_IP_TARGET": "4"},
            "subnets": [
                {"id": "subnet-0a", "zone": "us-east-1a", "cidr": "10.0.1.0/26", "free": free_a},
                {"id": "subnet-0b", "zone": "us-east-1b", "cidr": "10.0.2.0/25", "free": free_b},
            ],
            "nodes": nodes,
        },
        "settings": settings or {},
        "deployments": {"web": {"namespace": "shop"}},
        "events": events,
        **(extra or {}),
    }
    return parse_scenario(doc, Path("tiny.yaml"), TABLE)


def test_same_pods_are_created_in_both_runs_and_ipguard_steers_away_from_the_dry_zone() -> None:
    """Without ipguard the scheduler spreads pods into the dry zone, where they fail for want of an address; with
    it they are steered to the zone with addresses, and none is denied."""
    scenario = tiny([{"at": 2, "scale": "web", "replicas": 40, "over": 20}])
    comparison = compare(scenario)
    without, with_ipguard = comparison.without.counts, comparison.with_ipguard.counts
    assert without.created == with_ipguard.created == 40
    assert without.sandbox_failures > 5 and without.causes.keys() == {"subnet"}
    assert with_ipguard.sandbox_failures < without.sandbox_failures
    assert with_ipguard.steered > 0 and with_ipguard.denied == 0 and with_ipguard.false_denials == 0
    assert comparison.as_json()["with"].keys() == {"running", "sandbox_failures", "pending", "steered", "denied",
                                                   "false_denials"}


def test_a_reserve_that_denies_with_room_left_is_a_false_denial() -> None:
    """The oracle: a pod denied while a node in its zones could give it an address counts as a false denial
    (a reserve denies on purpose; the headline runs use reserves of 0)."""
    scenario = tiny([{"at": 2, "scale": "web", "replicas": 5, "over": 2}], free_a=3)
    result = run(scenario, with_ipguard=True, settings={"zoneReserve": "200"})
    assert result.counts.denied == 5
    assert result.counts.false_denials == 5


def test_denials_when_every_address_is_gone_are_not_false() -> None:
    """The pods already in flight claim the addresses first: a pod denied after them, with no address left anywhere,
    is rightly denied."""
    scenario = tiny([{"at": 2, "scale": "web", "replicas": 60, "over": 30}], free_a=0, free_b=10)
    result = run(scenario, with_ipguard=True)
    assert result.counts.denied > 0
    assert result.counts.false_denials == 0


def test_replica_index_is_fed_from_ec2_and_the_watches() -> None:
    """The feed: node held IPs from the simulated ENIs (the poller's own summary), subnet free counts from the
    address sets, pods from the watch handlers."""
    scenario = tiny([])
    cluster = build_cluster(scenario)
    replica = Replica(cluster, {"mode": "enforce"})
    for name, node in cluster.nodes.items():
        entry = replica.index.nodes[name]
        assert entry.ec2_held == ip.pool_stats(node.ipamd, 0).total
        assert entry.assigned == 4 and entry.pod_subnet == node.subnet_id
    assert replica.index.subnets["subnet-0a"].free_ips == 3
    assert replica.index.subnets["subnet-0b"].free_ips == 90
    for name, node in cluster.nodes.items():  # the ENIs carrying pod IPs, as the poller counts them
        assert replica.index.nodes[name].ec2_enis == len(node.ipamd.enis)


def test_replica_sees_cluster_changes_only_after_its_lag() -> None:
    scenario = tiny([])
    cluster = build_cluster(scenario)
    replica = Replica(cluster, {"mode": "enforce"}, watch_lag=2.0)
    cluster.now = 10.0
    pod = pod_template("web", {"namespace": "shop"})
    pod["metadata"]["name"] = "web-1"
    pod["spec"]["nodeName"] = "ip-10-0-2-0.ec2.internal"
    cluster.create_pod("shop/web-1", pod, 10.0)
    replica.advance(11.0)
    assert "shop/web-1" not in replica.index.pods
    replica.advance(12.0)
    assert "shop/web-1" in replica.index.pods


def test_two_replicas_answer_alternately_and_each_holds_reservations() -> None:
    """Each pod's mutate and validate go to the replicas in turn, so both replicas validate (and reserve)."""
    scenario = tiny([{"at": 2, "scale": "web", "replicas": 6, "over": 0}], free_a=40)
    cluster = build_cluster(scenario)
    replicas = [Replica(cluster, {"mode": "enforce"}), Replica(cluster, {"mode": "enforce"})]
    from webhook.sim.feed import admit

    for i in range(6):
        template = pod_template("web", {"namespace": "shop"})
        admit(replicas[(2 * i) % 2], replicas[(2 * i + 1) % 2], template, f"web-{i}")
    assert len(replicas[1].index.reservations()) == 6 and not replicas[0].index.reservations()
    result = run(scenario, with_ipguard=True, replicas=2)
    assert result.counts.running == 6


def test_scheduler_honours_required_and_preferred_affinity_taints_and_pod_eni() -> None:
    a = NodeView("a", "us-east-1a", {"topology.kubernetes.io/zone": "us-east-1a"}, [], 10, 0)
    b = NodeView("b", "us-east-1b", {"topology.kubernetes.io/zone": "us-east-1b"}, [], 10, 2)
    tainted = NodeView("c", "us-east-1c", {"topology.kubernetes.io/zone": "us-east-1c"},
                       [{"key": "gpu", "effect": "NoSchedule"}], 100, 0)
    pod = pod_template("web", {"namespace": "shop"})
    zone_term = {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "NotIn",
                                       "values": ["us-east-1a"]}]}
    pod["spec"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [zone_term]}}}
    assert pick_node(pod, [a, b, tainted]) is b
    soft = pod_template("web", {"namespace": "shop"})
    soft["spec"]["affinity"] = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "preference": {"matchExpressions": [
            {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["us-east-1b"]}]}}]}}
    b.pods = 5  # less free than a, yet preferred
    assert pick_node(soft, [a, b]) is b
    branch = pod_template("pay", {"namespace": "pay", "branch": True})
    assert pick_node(branch, [a, b]) is b
    b.pod_eni_used = 2
    assert pick_node(branch, [a, b]) is None


def test_autoscaler_adds_a_node_whose_address_comes_from_the_subnet() -> None:
    """Pods Pending for a while get a new node in an allowed zone with a free address; it joins after booting and
    its ipamd grows its pool from the subnet."""
    scenario = tiny([{"at": 1, "scale": "web", "replicas": 150, "over": 1}], free_a=0,
                    extra={"autoscaler": {"type": "t3.large", "pendingFor": 10, "boot": 20, "maxNodes": 3}})
    result = run(scenario, with_ipguard=False)
    assert result.nodes_added >= 1
    zones = {z.zone: z for z in result.zones}
    assert zones["us-east-1b"].nodes > 2 and zones["us-east-1a"].nodes == 2  # no address for a node in 1a
    cluster = build_cluster(scenario)
    assert cluster.fresh_node_could_get_address("us-east-1b")
    assert not cluster.fresh_node_could_get_address("us-east-1a")


def test_starting_state_matches_the_snapshot() -> None:
    """Nodes hold what their ipamd would for their pods; other workloads take the rest down to the free figures,
    whole free /28 blocks as the snapshot says."""
    scenario = load_scenario(SCENARIOS / "prefix-fragmented.yaml")
    cluster = build_cluster(scenario)
    for subnet in scenario.snapshot.subnets:
        space = cluster.ec2.subnets[subnet.subnet_id].space
        assert space.free_count == subnet.free_ips
        assert space.free_block_count == subnet.free_blocks
    for node in cluster.nodes.values():
        stats = ip.pool_stats(node.ipamd, 0)
        assert stats.assigned == 14 and held_free(node.ipamd) >= 16


def test_simulate_prints_json_per_scenario(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`ipguard simulate --json`: one object per scenario with the counts of both runs."""
    assert cli.main(["simulate", "sgp-branch", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["scenario"] for o in out] == ["sgp-branch"]
    assert out[0]["without"].keys() == {"running", "sandbox_failures", "pending"}
    assert out[0]["with"]["false_denials"] == 0
    assert cli.main(["simulate", str(tmp_path / "missing.yaml")]) == 1


def test_simulate_prints_the_table_and_zones(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["simulate", "sgp-branch", "--mode", "warn"]) == 0
    out = capsys.readouterr().out
    assert "sandbox failures" in out and "zones at the end" in out and "us-east-1a" in out


BUNDLED = sorted(p.stem for p in SCENARIOS.glob("*.yaml"))
# Where ipguard's model does not yet follow what ipamd does; see each reason. Remove an entry when it passes.
BELOW_TARGET = {
    "burst-1000": "the last second's 200 pods pass the bound of 50 unconfirmed reservations per zone (a 1 s watch "
                  "lag) and are judged without one; without the bound they are charged to zones they do not land in "
                  "(88 failures, 61 false denials), or, charged evenly, the subnets' last addresses end up in warm "
                  "pools of nodes no pod then comes to (31, 43): only placing the last pods on those nodes can meet it",
    "churn": "pods land on nodes whose free IPs cool down for 30 s (ipamd counts them as available and does not "
             "grow the node; never a reason to deny), and each second's pods crowd the few nodes with addresses",
    "two-replicas": "two replicas' reservations do not see each other at reserve 0 (2 failures in 118; "
                    "zoneReserve 4 brings them to 0)",
}


# Where ipguard's decisions still deny pods the simulation had room for. Remove an entry when it passes.
FALSE_DENIALS: dict[str, str] = {}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=FALSE_DENIALS[n], strict=True)) if n in FALSE_DENIALS else n
    for n in BUNDLED
])
def test_bundled_scenario_never_denies_falsely_nor_adds_failures(name: str) -> None:
    """Every bundled scenario, both runs: with ipguard, no false denial (reserves 0, enforce) and no more sandbox
    failures than without."""
    comparison = compare(load_scenario(SCENARIOS / f"{name}.yaml"), find_reserve=False)
    assert comparison.without.counts.sandbox_failures > 0  # the scenario does exhaust something
    assert comparison.with_ipguard.counts.false_denials == 0
    assert comparison.with_ipguard.counts.sandbox_failures <= comparison.without.counts.sandbox_failures


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=BELOW_TARGET[n], strict=True)) if n in BELOW_TARGET else n
    for n in BUNDLED
])
def test_bundled_scenario_meets_the_one_percent_target(name: str) -> None:
    """The target: with ipguard, sandbox failures at most 1% of those without it."""
    comparison = compare(load_scenario(SCENARIOS / f"{name}.yaml"), find_reserve=False)
    assert comparison.with_ipguard.counts.sandbox_failures <= 0.01 * comparison.without.counts.sandbox_failures


def branch_cluster(free: int = 40) -> Cluster:
    doc: dict[str, Any] = {
        "name": "branch",
        "cluster": {
            "cni": {"ENABLE_POD_ENI": "true"},
            "subnets": [{"id": "subnet-0a", "zone": "us-east-1a", "cidr": "10.0.1.0/25", "free": free}],
            "nodes": [{"name": "ip-10-0-1-1.ec2.internal", "zone": "us-east-1a", "type": "m5.large",
                       "subnet": "subnet-0a", "pods": {"ip": 0, "hostNetwork": 2}}],
        },
    }
    return build_cluster(parse_scenario(doc, Path("branch.yaml"), TABLE))


def branch_pod(cluster: Cluster, name: str, groups: int = 1) -> SimPod:
    pod = pod_template("pay", {"namespace": "pay", "branch": True})
    pod["metadata"]["name"] = name
    return cluster.create_pod(f"pay/{name}", pod, cluster.now, groups=groups)


def test_branch_eni_takes_one_subnet_address_and_holds_it_for_the_cooldown() -> None:
    """Security groups for pods: each branch-ENI pod gets its own ENI (one address of the trunk's subnet); a deleted
    pod's branch ENI waits 60 s before EC2 deletes it, holding its address and a branch slot."""
    cluster = branch_cluster()
    node = next(iter(cluster.nodes.values()))
    assert node.trunk is not None and node.view.pod_eni == 9  # m5.large: 9 branch ENIs, the trunk takes a slot
    space = cluster.ec2.subnets["subnet-0a"].space
    before = space.free_count
    pods = [branch_pod(cluster, f"p{i}") for i in range(9)]
    cluster.step(1.0, 1.0)
    assert all(p.phase == "Running" for p in pods) and space.free_count == before - 9
    cluster.delete_pod(pods[0].key, 2.0)
    late = branch_pod(cluster, "late")
    cluster.step(3.0, 1.0)
    assert late.phase == "Pending" and late.node is not None and late.waited  # 8 live + 1 cooling = the limit
    assert space.free_count == before - 9
    cluster.step(62.0, 1.0)
    assert late.phase == "Running" and space.free_count == before - 9


def test_branch_pod_fails_when_its_groups_exceed_the_per_eni_quota() -> None:
    """EC2 allows 5 security groups per ENI by default: a union of 6 fails the branch ENI."""
    cluster = branch_cluster()
    pod = branch_pod(cluster, "wide", groups=6)
    cluster.step(1.0, 1.0)
    assert pod.sandbox_failed and pod.failure_cause == "security-groups"


def test_branch_pod_fails_when_the_subnet_is_dry() -> None:
    cluster = branch_cluster(free=0)
    pod = branch_pod(cluster, "dry")
    cluster.step(1.0, 1.0)
    assert pod.sandbox_failed and pod.failure_cause == "subnet"


def test_replay_is_deterministic() -> None:
    """The same scenario gives the same counts run after run (seeded address choices, ENI order, phases)."""
    scenario = load_scenario(SCENARIOS / "prefix-fragmented.yaml")
    first, second = run(scenario, with_ipguard=True), run(scenario, with_ipguard=True)
    assert first.counts == second.counts and first.zones == second.zones


def test_replica_counts_free_prefixes_from_the_subnets_enis() -> None:
    """Under prefix delegation the feed gives the poller every ENI of the pod subnets (other workloads' too), from
    which it counts whole free /28s, as DescribeNetworkInterfaces would."""
    scenario = load_scenario(SCENARIOS / "prefix-fragmented.yaml")
    cluster = build_cluster(scenario)
    replica = Replica(cluster, {"mode": "enforce"})
    for subnet in scenario.snapshot.subnets:
        figures = replica.index.subnets[subnet.subnet_id]
        assert figures.free_blocks == cluster.ec2.subnets[subnet.subnet_id].space.free_block_count
        assert figures.free_ips == subnet.free_ips


def test_the_oracle_counts_denied_pods_it_judged_able_to_run_as_claims_on_the_places_left() -> None:
    """In one simulated second, N places left make at most N denials false: a denied pod judged able to run would
    have taken one of them had it been admitted."""
    cluster = branch_cluster(free=0)  # a subnet with nothing free: only what the node's ipamd holds counts
    cluster.step(0.0, 1.0)
    pod = pod_template("web", {"namespace": "shop"})
    places_left = places(settle(cluster, 1.0), pod)
    assert places_left > 0
    oracle = Oracle(cluster)
    judged = [oracle.could_have_run(pod, 1.0) for _ in range(places_left + 5)]
    assert judged == [True] * places_left + [False] * 5
