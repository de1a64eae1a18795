"""The capacity model, complete: subnet discovery, cooldown, what new nodes can launch into, IPv6 and Windows.

Each test pins the ipamd behaviour (aws/amazon-vpc-cni-k8s) that decides the pod's fate, on a small snapshot.
"""

from __future__ import annotations

import yaml

from tests.test_ipamd_edges import judge, load, pod
from webhook.model.decide import Verdict
from webhook.model.index import PodUse
from webhook.model.limits import LimitsTable
from webhook.sources.snapshot import parse_snapshot

A = "us-east-1a"

DISCOVERY = """
cni: {%s}
subnets:
  - {id: subnet-node, zone: us-east-1a, free: 0}
  - {id: subnet-extra, zone: us-east-1a, free: 250, tags: {kubernetes.io/role/cni: "%s"}}
nodes:
  - {name: n1, zone: us-east-1a, type: t3.medium, subnet: subnet-node, heldIPs: 10, enis: 2, pods: {ip: 10}}
"""


def test_a_tagged_subnet_funds_new_enis_when_the_nodes_own_is_empty() -> None:
    """createENI with ENABLE_SUBNET_DISCOVERY (default on): ipamd creates the node's next ENI in any subnet of
    its VPC and zone tagged kubernetes.io/role/cni, most free first. The node's own subnet is empty, the tagged
    one has 250 addresses: the pod is admitted, not denied (the AWS-recommended fix for exhaustion)."""
    index, settings = load(DISCOVERY % ("", "1"))
    assert judge(index, settings, pod(node="n1")).verdict is Verdict.ALLOW
    assert index.zone_headroom(A) == 5  # its third and last ENI: 5 IPs
    assert judge(index, settings, pod(zone=A)).verdict is Verdict.ALLOW


def test_a_subnet_tagged_0_is_excluded() -> None:
    """isSubnetValidForENICreation: the value `0` opts the subnet out."""
    index, settings = load(DISCOVERY % ("", "0"))
    assert judge(index, settings, pod(node="n1")).verdict is Verdict.DENY
    assert index.zone_headroom(A) == 0


def test_discovery_off_uses_the_nodes_own_subnet_only() -> None:
    """ENABLE_SUBNET_DISCOVERY=false: the primary subnet only, whatever the tags; a subnet known by its tag
    alone gives new nodes nothing either."""
    index, settings = load(DISCOVERY % ('ENABLE_SUBNET_DISCOVERY: "false"', "1"))
    assert judge(index, settings, pod(node="n1")).verdict is Verdict.DENY
    assert index.zone_headroom(A) == 0
    assert index.zone_figures(A).new_node_ips == 0
    assert judge(index, settings, pod(zone=A)).verdict is Verdict.DENY


def test_custom_networking_takes_precedence_over_discovery() -> None:
    """createENI: with custom networking the ENIConfig's subnet is the only one, tags or not."""
    index, settings = load("""
cni: {AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG: "true", ENI_CONFIG_LABEL_DEF: "topology.kubernetes.io/zone"}
eniConfigs: {us-east-1a: subnet-pods}
subnets:
  - {id: subnet-node, zone: us-east-1a, free: 100}
  - {id: subnet-pods, zone: us-east-1a, free: 0}
  - {id: subnet-extra, zone: us-east-1a, free: 250, tags: {kubernetes.io/role/cni: "1"}}
nodes:
  - {name: n1, zone: us-east-1a, type: t3.medium, subnet: subnet-node, heldIPs: 10, enis: 2, pods: {ip: 10}}
""")
    assert "subnet-extra" not in index.subnets
    assert judge(index, settings, pod(node="n1")).verdict is Verdict.DENY


def test_discovered_subnets_serve_the_waiting_pods_first() -> None:
    """Pods already waiting on a node are served before new pods: a tagged subnet with room for one ENI gives
    it to them (5 IPs for 3 waiting pods: 2 left for new ones)."""
    index, _settings = load("""
subnets:
  - {id: subnet-node, zone: us-east-1a, free: 0}
  - {id: subnet-extra, zone: us-east-1a, free: 7, tags: {kubernetes.io/role/cni: "1"}}
nodes:
  - {name: n1, zone: us-east-1a, type: t3.medium, subnet: subnet-node, heldIPs: 10, enis: 2, pods: {ip: 13}}
""")
    figures = index.zone_figures(A)
    assert (figures.waiting, figures.waiting_served, figures.headroom) == (3, 3, 2)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_freed_ips_stay_taken_through_the_cooldown() -> None:
    """IP_COOLDOWN_PERIOD (30 s): ipamd does not hand a freed IP out again before it ends, while its datastore
    counts it as available (`AvailableAddresses`), so it does not grow the node for it either. Delete 3 pods
    and admit 3 new ones on a node with no other free address: the new ones have no address until then. They
    are not denied for it: the kubelet retries the sandbox, and the IP is back within seconds."""
    clock = FakeClock()
    snapshot = parse_snapshot(yaml.safe_load(T3_FULL_EMPTY), "test", LimitsTable())
    index = snapshot.build_index(clock=clock)
    for i in range(3):
        index.remove_pod(f"apps/n1-app-{i}")
    node = index.node_figures("n1")
    assert node is not None and (node.warm_free, node.waiting) == (0, 0)
    assert index.zone_headroom(A) == 0
    assert judge(index, snapshot.settings, pod(node="n1")).verdict is Verdict.ALLOW
    assert judge(index, snapshot.settings, pod(zone=A)).verdict is not Verdict.DENY
    for i in range(3):
        index.upsert_pod(f"shop/new-{i}", "n1", PodUse.IP)
    assert index.zone_figures(A).waiting == 3  # scheduled within the cooldown: no address yet
    clock.now = 31.0
    assert index.zone_figures(A).waiting == 0  # the cooldown is over: the 3 freed IPs are theirs
    assert index.zone_headroom(A) == 0


def test_the_cooldown_follows_the_cni_setting() -> None:
    clock = FakeClock()
    snapshot = parse_snapshot(yaml.safe_load(T3_FULL_EMPTY.replace("cni: {}", 'cni: {IP_COOLDOWN_PERIOD: "5"}')),
                              "test", LimitsTable())
    index = snapshot.build_index(clock=clock)
    index.remove_pod("apps/n1-app-0")
    assert index.node_figures("n1").warm_free == 0  # type: ignore[union-attr]
    clock.now = 6.0
    assert index.node_figures("n1").warm_free == 1  # type: ignore[union-attr]


T3_FULL_EMPTY = """
cni: {}
subnets:
  - {id: subnet-a, zone: us-east-1a, free: 0}
nodes:
  - {name: n1, zone: us-east-1a, type: t3.medium, subnet: subnet-a, heldIPs: 15, enis: 3, pods: {ip: 15}}
"""
