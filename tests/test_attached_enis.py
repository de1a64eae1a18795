"""A node's ENIs stay in the subnet they were created in: an ENIConfig change (the node relabelled, or the
ENIConfig's subnet changed) moves none of them (aws/amazon-vpc-cni-k8s pkg/ipamd/ipamd.go: nothing in
`nodeIPPoolReconcile` or `setupENI` compares an attached ENI's subnet with the ENIConfig). Their IPs stay taken
from the old subnet, their free slots are filled from it (`tryAssignIPs` / `tryAssignPrefixes` call
AssignPrivateIpAddresses on the ENI itself, pkg/awsutils/awsutils.go `AllocIPAddresses`), and only new ENIs
use the ENIConfig's subnet, read again for each one (`tryAllocateENI` -> `eniconfig.MyENIConfig`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests import live
from tests.test_ipamd_edges import denial_text
from webhook.model.config import Settings
from webhook.model.decide import Verdict, decide
from webhook.model.index import CapacityIndex, PodUse
from webhook.model.ipamd import HeldAddresses
from webhook.model.limits import LimitsTable
from webhook.sim.feed import Replica
from webhook.sim.replay import run
from webhook.sim.scenario import Scenario, build_cluster, existing_pod, parse_scenario
from webhook.sources.cluster import ClusterFeed

A = "us-east-1a"
NODE = "n-a"
OLD, NEW = "subnet-old", "subnet-new"
CONFIG = Settings.from_configmap({"mode": "enforce", "zoneReserve": "0"})


def eni_config(name: str, subnet: str) -> dict[str, Any]:
    return {"apiVersion": "crd.k8s.amazonaws.com/v1alpha1", "kind": "ENIConfig", "metadata": {"name": name},
            "spec": {"subnet": subnet}}


def labelled(config: str) -> dict[str, Any]:
    node = live.node(NODE, A, "i-0aaaaaaaaaaaaaaaa")
    node["metadata"]["labels"]["k8s.amazonaws.com/eniConfig"] = config
    return node


def cluster(env: dict[str, str] | None = None, *, pods: int = 5, held: int = 5, old_free: int = 20,
            new_free: int = 100) -> ClusterFeed:
    """An m5.large (two pod ENIs of 9 IPs under custom networking) on ENIConfig `old`, one ENI in subnet-old
    holding `held` IPs, `pods` pods; both subnets in its zone."""
    f = ClusterFeed(CapacityIndex(), lambda _: None)
    h = f.handlers()
    h["daemonsets"].upsert(live.aws_node({"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true", **(env or {})}))
    h["eniconfigs"].upsert(eni_config("old", OLD))
    h["eniconfigs"].upsert(eni_config("new", NEW))
    h["nodes"].upsert(labelled("old"))
    for i in range(pods):
        f.index.upsert_pod(f"shop/p-{i}", NODE, PodUse.IP)
    f.index.set_node_held(NODE, held, enis=1, subnets={OLD: HeldAddresses(held, 0, 1)})
    f.index.upsert_subnet(OLD, zone=A, free_ips=old_free)
    f.index.upsert_subnet(NEW, zone=A, free_ips=new_free)
    return f


def pinned(name: str = "web-1") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "nginx"}]}}


def verdict(f: ClusterFeed) -> Verdict:
    return decide(pinned(), f.index, CONFIG, namespace="shop").verdict


def test_relabelled_node_keeps_its_addresses_debited_to_the_old_subnet() -> None:
    """Relabelling moves no address: subnet-old keeps the 6 the node's ENI holds (5 IPs and its primary), and
    subnet-new is not debited for addresses EC2 never took from it (before: +6 credited to the old subnet and -6
    debited to the new, each up to the next DescribeSubnets)."""
    f = cluster()
    ix = f.index
    assert ix.subnets[OLD].supply == 20 and ix.subnets[NEW].supply == 100
    f.handlers()["nodes"].upsert(labelled("new"))
    assert ix.nodes[NODE].pod_subnet == NEW
    assert ix.subnets[OLD].supply == 20 and ix.subnets[NEW].supply == 100
    assert ix.subnets[OLD].demand == 6 and ix.subnets[NEW].demand == 0
    # EC2's next figures, the same: nothing moves either
    ix.set_node_held(NODE, 5, enis=1, subnets={OLD: HeldAddresses(5, 0, 1)})
    ix.upsert_subnet(OLD, zone=A, free_ips=20)
    ix.upsert_subnet(NEW, zone=A, free_ips=100)
    assert ix.subnets[OLD].supply == 20 and ix.subnets[NEW].supply == 100
    assert ix.aggregates() == ix.recount()


def test_an_eniconfig_subnet_change_leaves_attached_enis_where_they_are() -> None:
    """The same when the ENIConfig's own subnet changes (`MyENIConfig` is read again for the next ENI only)."""
    f = cluster()
    f.handlers()["eniconfigs"].upsert(eni_config("old", NEW))
    ix = f.index
    assert ix.nodes[NODE].pod_subnet == NEW
    assert ix.subnets[OLD].demand == 6 and ix.subnets[NEW].demand == 0
    assert ix.aggregates() == ix.recount()


def test_free_slots_on_attached_enis_grow_from_their_subnet_and_new_enis_from_the_eniconfig() -> None:
    """Growth: the 4 free slots of the attached ENI are funded by subnet-old (one address each, the one-IP
    fallback of `tryAssignIPs`); the node's second pod ENI (1 + 9 addresses at once, `createENI`) by subnet-new."""
    f = cluster()
    f.handlers()["nodes"].upsert(labelled("new"))
    ix = f.index
    assert {kind: d.new_ips for kind, d in ix.subnets[OLD].wants.items()} == {(1, 0, 1, 1): 4}
    assert {kind[:2]: d.new_ips for kind, d in ix.subnets[NEW].wants.items()} == {(10, 0): 9}
    assert ix.subnets[OLD].growth == 4 and ix.subnets[NEW].growth == 9


def test_pinned_pod_is_admitted_when_only_the_old_subnet_has_addresses() -> None:
    """Free slots on the old subnet's ENI give the node its next IPs although the ENIConfig's subnet is empty
    (before: judged on the new subnet, driven below zero by the node's own addresses: a false denial)."""
    f = cluster(new_free=0)
    f.handlers()["nodes"].upsert(labelled("new"))
    assert verdict(f) is Verdict.ALLOW


def test_pinned_pod_is_denied_when_the_old_subnet_is_out_and_discovery_is_off() -> None:
    """Every free slot is on an ENI in an empty subnet: `tryAssignIPs` returns the insufficient-address error
    before any new ENI (`increaseDatastorePool`), so the node gets no IP although the ENIConfig's subnet has
    100 (before: judged on the new subnet, admitted: a missed denial)."""
    f = cluster({"ENABLE_SUBNET_DISCOVERY": "false"}, old_free=0)
    f.handlers()["nodes"].upsert(labelled("new"))
    assert verdict(f) is Verdict.DENY
    assert ("its free ENI slots are on ENIs in subnet-old (attached before its ENIConfig changed), out of "
            "addresses; without ENABLE_SUBNET_DISCOVERY ipamd then creates no new ENI") in denial_text(
                f.index, CONFIG, pinned())


def test_with_subnet_discovery_a_dry_old_subnet_moves_on_to_a_new_eni() -> None:
    """With ENABLE_SUBNET_DISCOVERY (default true), `tryAssignIPs` skips an ENI whose subnet is out
    (`useSubnetDiscovery && containsInsufficientCIDRsOrSubnetIPs` -> continue) and `tryAllocateENI` creates one
    in the ENIConfig's subnet; the same holds under custom networking, whose `createENI` ignores discovery."""
    f = cluster(old_free=0)
    f.handlers()["nodes"].upsert(labelled("new"))
    assert verdict(f) is Verdict.ALLOW
    f.index.upsert_subnet(NEW, zone=A, free_ips=9)  # a new ENI needs 1 + 9 at once
    assert verdict(f) is Verdict.DENY
    assert "subnet-new has 9 free address(es); a new ENI on m5.large needs 10 address(es) at once" in denial_text(
        f.index, CONFIG, pinned())


def test_a_subnet_only_old_enis_are_in_gives_new_nodes_nothing() -> None:
    """New nodes take ENIs from their ENIConfig: a subnet known only because attached ENIs are in it (no
    ENIConfig names it any more) is no launch target."""
    f = cluster()
    f.handlers()["eniconfigs"].upsert(eni_config("old", NEW))
    f.index.upsert_subnet(OLD, zone=A, free_ips=20, held_only=True)
    assert f.index.subnets[OLD].addresses == 0
    assert f.index.subnets[NEW].addresses > 0


@settings(max_examples=60, deadline=None)
@given(
    split=st.lists(st.tuples(st.sampled_from(["s1", "s2", "s3"]), st.integers(0, 9)), min_size=1, max_size=2),
    pod_subnet=st.sampled_from(["s1", "s2", "s3"]),
    pods=st.integers(0, 18),
)
def test_each_subnet_is_debited_exactly_what_the_enis_in_it_hold(split: list[tuple[str, int]], pod_subnet: str,
                                                                  pods: int) -> None:
    """Whatever subnet new ENIs come from, each subnet carries exactly the IPs and ENI primaries of the ENIs
    in it, and the incremental figures equal a recount."""
    f = ClusterFeed(CapacityIndex(), lambda _: None)
    h = f.handlers()
    h["daemonsets"].upsert(live.aws_node({"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true"}))
    for sid in ("s1", "s2", "s3"):
        h["eniconfigs"].upsert(eni_config(sid, sid))
        f.index.upsert_subnet(sid, zone=A, free_ips=50)
    h["nodes"].upsert(labelled("s1"))
    for i in range(pods):
        f.index.upsert_pod(f"shop/p-{i}", NODE, PodUse.IP)
    held: dict[str, HeldAddresses] = {}
    for sid, ips in split:
        was = held.get(sid, HeldAddresses(0))
        held[sid] = HeldAddresses(was.ips + ips, 0, was.enis + 1)
    total = sum(x.ips for x in held.values())
    f.index.set_node_held(NODE, total, enis=sum(x.enis for x in held.values()), subnets=held)
    h["nodes"].upsert(labelled(pod_subnet))
    ix = f.index
    for sid in ("s1", "s2", "s3"):
        mine = held.get(sid, HeldAddresses(0))
        assert ix.subnets[sid].demand == mine.ips + mine.enis
    assert ix.aggregates() == ix.recount()


# ---- the simulator: its ipamd keeps attached ENIs in place, and ipguard's replica agrees ----------------------

SIM_NODE = "ip-10-0-1-10.ec2.internal"


def relabel_scenario(old_free: int, new_free: int, *, pods: int, env: dict[str, str] | None = None) -> Scenario:
    """One m5.large under custom networking with WARM_IP_TARGET=1, on ENIConfig `old`: 5 pods, 6 IPs on one ENI
    in subnet-old (3 slots free); relabelled to ENIConfig `new` at 2 s, then `pods` more pods pinned to it."""
    doc: dict[str, Any] = {
        "name": "relabel",
        "duration": 90,
        "cluster": {
            "cni": {"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true", "WARM_IP_TARGET": "1", **(env or {})},
            "eniConfigs": {"old": "subnet-old", "new": "subnet-new"},
            "subnets": [
                {"id": "subnet-node", "zone": A, "cidr": "10.0.1.0/24", "free": 200},
                {"id": "subnet-old", "zone": A, "cidr": "100.64.0.0/24", "free": old_free},
                {"id": "subnet-new", "zone": A, "cidr": "100.64.1.0/24", "free": new_free},
            ],
            "nodes": [{"name": SIM_NODE, "zone": A, "type": "m5.large", "subnet": "subnet-node",
                       "eniConfig": "old", "pods": {"ip": 5}}],
        },
        "deployments": {"web": {"namespace": "shop", "nodeSelector": {"kubernetes.io/hostname": SIM_NODE}}},
        "events": [{"at": 2, "eniConfig": "new", "node": SIM_NODE},
                   {"at": 10, "scale": "web", "replicas": pods, "over": 20}],
    }
    return parse_scenario(doc, Path("relabel.yaml"), LimitsTable())


def test_simulated_ipamd_fills_the_old_enis_from_the_old_subnet_after_a_relabel() -> None:
    """The simulator's ipamd follows the same rule: after the relabel the warm IP and the three free slots of the
    attached ENI (filled from subnet-old) serve four more pods; the fifth needs a new ENI in subnet-new, which has
    nothing."""
    cluster = build_cluster(relabel_scenario(20, 0, pods=5))
    node = cluster.nodes[SIM_NODE]
    cluster.select_eni_config(SIM_NODE, "new")
    assert node.ipamd.eni_config_subnet == "subnet-new"
    before = {sid: s.free for sid, s in cluster.ec2.subnets.items()}
    for i in range(5):
        cluster.create_pod(f"shop/extra-{i}", existing_pod(f"shop/extra-{i}", SIM_NODE), 1.0)
    for t in range(1, 60):
        cluster.step(float(t), 1.0)
    pods_enis = [e for e in node.ipamd.enis.values() if not e.primary]
    assert {e.subnet_id for e in pods_enis} == {"subnet-old"}
    assert cluster.ec2.subnets["subnet-new"].free == before["subnet-new"] == 0
    assert cluster.ec2.subnets["subnet-old"].free == before["subnet-old"] - 3
    assert sum(p.phase == "Running" for p in cluster.pods.values()) == 5 + 4
    assert cluster.pods["shop/extra-4"].sandbox_failed


def test_replay_after_a_relabel_denies_nothing_the_old_subnet_can_still_serve() -> None:
    """Replayed with ipguard: pods pinned (by hostname) to the relabelled node while only its old subnet has
    addresses are admitted and run, none denied; the replica debits each subnet what EC2 shows taken from it."""
    scenario = relabel_scenario(20, 0, pods=4)
    result = run(scenario, with_ipguard=True)
    assert result.counts.denied == 0 and result.counts.false_denials == 0
    assert result.counts.sandbox_failures == 0 and result.counts.running == 4
    cluster = build_cluster(scenario)
    replica = Replica(cluster, {"mode": "enforce"})
    cluster.select_eni_config(SIM_NODE, "new")
    replica.advance(5.0)
    replica.refresh_ec2()
    ix = replica.index
    assert ix.nodes[SIM_NODE].pod_subnet == "subnet-new"
    assert [p.subnet_id for p in ix.nodes[SIM_NODE].elsewhere] == ["subnet-old"]
    for sid in ("subnet-old", "subnet-new"):
        assert ix.subnets[sid].supply == cluster.ec2.subnets[sid].free
    assert ix.subnets["subnet-new"].demand == 0
    assert ix.aggregates() == ix.recount()


def test_a_node_relabelled_to_a_missing_eniconfig_keeps_its_addresses_debited() -> None:
    """Relabelled to an ENIConfig that does not exist, `MyENIConfig` fails and ipamd attaches no new ENI; the
    attached one still holds its addresses in subnet-old (before: credited back to it)."""
    f = cluster()
    f.handlers()["nodes"].upsert(labelled("missing"))
    ix = f.index
    assert ix.nodes[NODE].no_eni_config
    assert ix.subnets[OLD].demand == 6 and ix.subnets[OLD].supply == 20
    assert ix.aggregates() == ix.recount()


def test_a_node_relabelled_to_a_missing_eniconfig_still_serves_pods_from_its_attached_enis() -> None:
    """No ENIConfig stops new ENIs only (`tryAllocateENI` -> `MyENIConfig`); the ENI attached before keeps
    handing out its IPs and fills its free slots from its own subnet (`tryAssignIPs` reads no ENIConfig). A pod
    pinned there is admitted while that ENI has a warm IP or a free slot, denied once it is full."""
    warm = cluster(pods=3, held=5)
    warm.handlers()["nodes"].upsert(labelled("missing"))
    assert warm.index.nodes[NODE].no_eni_config and warm.index.nodes[NODE].warm == 2
    assert verdict(warm) is Verdict.ALLOW

    free_slots = cluster(pods=5, held=5)  # no warm IP, 4 free slots on its ENI
    free_slots.handlers()["nodes"].upsert(labelled("missing"))
    assert verdict(free_slots) is Verdict.ALLOW

    full = cluster(pods=9, held=9)  # m5.large under custom networking: 9 pod IPs per ENI, all in use
    full.handlers()["nodes"].upsert(labelled("missing"))
    assert verdict(full) is Verdict.DENY
    assert "no ENIConfig applies to the node" in denial_text(full.index, CONFIG, pinned())
    assert full.index.aggregates() == full.index.recount()
