"""Warm-pool top-ups between EC2 refreshes: when a subnet's last addresses cannot fund every node's top-up, which
nodes got them is unknown until the next refresh, so the nodes ipguard last saw with no warm IP are kept off
while a zone whose figures are certain has room (never the pod's only way to an IP).

ipamd tops a node's pool up to WARM_IP_TARGET free IPs (at least MINIMUM_IP_TARGET) within seconds of the pods
that emptied it (`increaseDatastorePool`); EC2 shows the result only at the next DescribeNetworkInterfaces.

Cluster: WARM_IP_TARGET=5, MINIMUM_IP_TARGET=10; zone A has four m5.xlarge nodes (14 pod IPs per ENI) that EC2
last saw holding 25 IPs each with 20 pods, in a subnet with 6 free addresses; zone B one m5.xlarge node in a
subnet with 300.
"""

from __future__ import annotations

from typing import Any

from webhook.admission.messages import steer_warning
from webhook.model.cni import CniSettings
from webhook.model.config import Settings
from webhook.model.decide import Verdict, decide
from webhook.model.index import CapacityIndex, PodUse
from webhook.report import TOPUPS_NOTE, report_json, report_text

A, B = "us-east-1a", "us-east-1b"
SUBNET_A, SUBNET_B = "subnet-0a00000000000001a", "subnet-0b00000000000001b"
A_NODES = [f"ip-10-0-1-{i}.ec2.internal" for i in range(10, 14)]
B_NODE = "ip-10-0-2-10.ec2.internal"
CNI = CniSettings(warm_ip_target=5, minimum_ip_target=10)


def cluster(free_a: int = 6, pods_per_a_node: int = 25) -> CapacityIndex:
    """EC2 refreshed with 20 pods on each zone-A node; `pods_per_a_node` is what the watch shows since."""
    ix = CapacityIndex(cni=CNI)
    for name, zone, subnet in [*((n, A, SUBNET_A) for n in A_NODES), (B_NODE, B, SUBNET_B)]:
        ix.upsert_node(name, zone=zone, instance_type="m5.xlarge", pod_subnet=subnet, allocatable_pods=58)
        for i in range(20):
            ix.upsert_pod(f"shop/{name}-{i}", name, PodUse.IP)
        ix.set_node_held(name, 25, enis=2)
    ix.upsert_subnet(SUBNET_A, zone=A, free_ips=free_a)
    ix.upsert_subnet(SUBNET_B, zone=B, free_ips=300)
    for name in A_NODES:
        for i in range(20, pods_per_a_node):
            ix.upsert_pod(f"shop/{name}-{i}", name, PodUse.IP)
    return ix


def pod(zones: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "web", "image": "web:1"}]}
    if zones is not None:
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": zones}]}]}}}
    return {"metadata": {"namespace": "shop", "generateName": "web-"}, "spec": spec}


SETTINGS = Settings(zone_reserve=0, node_reserve=0)


def test_nodes_whose_subnet_cannot_fund_every_top_up_are_uncertain() -> None:
    """25 pods on nodes EC2 saw holding 25: each tops up 5 (to 30), 20 in all, from a subnet with 6: the four
    dry nodes are uncertain; the same with 100 free addresses funds every top-up and none is."""
    ix = cluster()
    subnet = ix.subnets[SUBNET_A]
    assert [ix.nodes[n].topup for n in A_NODES] == [5, 5, 5, 5]
    assert subnet.topups == 20 and subnet.topups_short
    assert ix.zones[A].topups_short == 1 and ix.zones[B].topups_short == 0
    assert sorted(ix.uncertain_nodes(A)) == A_NODES
    assert list(ix.exhausted_nodes(A)) == []  # the zone still counts the 6 addresses: none is out for sure
    assert ix.recount() == ix.aggregates()

    roomy = cluster(free_a=100)
    assert not roomy.subnets[SUBNET_A].topups_short
    assert list(roomy.uncertain_nodes(A)) == []


def test_a_node_with_warm_ips_is_never_uncertain() -> None:
    """23 pods on nodes holding 25: two warm IPs each, whatever the top-ups did; nothing to keep off."""
    ix = cluster(pods_per_a_node=23)
    assert ix.subnets[SUBNET_A].topups_short  # 4 x 5 top-up wanted, 6 free
    assert list(ix.uncertain_nodes(A)) == []


def test_pod_kept_off_uncertain_nodes_while_another_zone_is_certain() -> None:
    """Allowed in both zones: admitted, kept off zone A's dry nodes (hostname NotIn), zone A still open."""
    decision = decide(pod(), cluster(), SETTINGS)
    assert decision.verdict is Verdict.STEER
    assert decision.avoid_nodes == tuple(A_NODES)
    assert A in decision.open_zones and decision.avoid_zones == ()
    assert "whose subnet's last addresses may have gone to other nodes' warm pools" in decision.reason


def test_uncertain_nodes_are_not_kept_off_when_they_are_the_pods_only_way() -> None:
    """Allowed only in zone A: its nodes may hold the subnet's last IPs, so it is admitted without steering."""
    decision = decide(pod([A]), cluster(), SETTINGS)
    assert decision.verdict is Verdict.ALLOW
    assert decision.avoid_nodes == ()


def test_the_refresh_that_shows_the_top_ups_ends_the_doubt() -> None:
    """EC2 then shows where the 6 addresses went (3 each to the first and last node): those two take pods
    again; the other two, dry in an empty subnet, are out of IPs for sure."""
    ix = cluster()
    for name, held in zip(A_NODES, (28, 25, 25, 28), strict=True):
        ix.set_node_held(name, held, enis=2)
    ix.upsert_subnet(SUBNET_A, zone=A, free_ips=0)
    assert sorted(ix.exhausted_nodes(A)) == [A_NODES[1], A_NODES[2]]
    assert list(ix.uncertain_nodes(A)) == []
    decision = decide(pod(), ix, SETTINGS)
    assert decision.avoid_nodes == (A_NODES[1], A_NODES[2])
    assert "may have gone" not in decision.reason
    assert ix.recount() == ix.aggregates()



def test_the_warning_tells_uncertain_nodes_from_nodes_out_of_ips() -> None:
    """The developer's warning says which kept-off nodes are out of IPs and which are only in doubt."""
    decision = decide(pod(), cluster(), SETTINGS)
    assert decision.uncertain_nodes == 4
    assert steer_warning(decision) == (
        "ipguard: steered away from 4 node(s) with no warm IP: their subnet's last IPs may be on other nodes")
    ix = cluster()  # the next refresh: the first node got 2 of the last addresses, the subnet has none
    ix.set_node_held(A_NODES[0], 27, enis=2)
    ix.upsert_subnet(SUBNET_A, zone=A, free_ips=0)
    out = decide(pod(), ix, SETTINGS)
    assert out.uncertain_nodes == 0
    assert steer_warning(out) == "ipguard: steered away from 3 node(s): out of pod IPs"


def test_report_shows_the_top_ups_and_the_subnets_short_of_them() -> None:
    """`ipguard report` gives each subnet's top-ups, marks the subnet that cannot fund them, and says what that
    does; the JSON carries the same figures."""
    snapshot = cluster().snapshot()
    text = report_text(snapshot, SETTINGS)
    rows = {line.split()[0]: line.split()[7:] for line in text.splitlines() if line.startswith("subnet-")}
    assert rows == {SUBNET_A: ["20", "short"], SUBNET_B: ["0"]}
    assert TOPUPS_NOTE in text
    subnets = {s["subnetId"]: (s["topUps"], s["topUpsShort"]) for s in report_json(snapshot, SETTINGS)["subnets"]}
    assert subnets == {SUBNET_A: (20, True), SUBNET_B: (0, False)}
    assert TOPUPS_NOTE not in report_text(cluster(free_a=100).snapshot(), SETTINGS)
