"""Where ipguard must agree with ipamd, on small snapshots: each test is a pod that would, or would not, get an
IP, and pins the ipamd function (aws/amazon-vpc-cni-k8s pkg/ipamd/ipamd.go) whose rule decides it.

No false denial: a pod is denied only where ipamd could not give it an address. No missed denial: a pod is not
admitted onto a node (or into a zone) where ipamd could not.
"""

from __future__ import annotations

from typing import Any

import orjson
import yaml

from webhook.admission.handler import respond
from webhook.admission.wire import parse_review
from webhook.model.config import Settings
from webhook.model.decide import Decision, Verdict, decide
from webhook.model.index import CapacityIndex, PodUse
from webhook.model.limits import LimitsTable
from webhook.sources.snapshot import parse_snapshot

A, B = "us-east-1a", "us-east-1b"


def load(text: str) -> tuple[CapacityIndex, Settings]:
    snapshot = parse_snapshot(yaml.safe_load(text), "test", LimitsTable())
    return snapshot.build_index(), snapshot.settings


def pod(name: str = "web-1", *, node: str | None = None, zone: str | None = None,
        hostname: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "nginx"}]}
    selector = {}
    if node:
        spec["nodeName"] = node
    if zone:
        selector["topology.kubernetes.io/zone"] = zone
    if hostname:
        selector["kubernetes.io/hostname"] = hostname
    if selector:
        spec["nodeSelector"] = selector
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


def judge(index: CapacityIndex, settings: Settings, p: dict[str, Any]) -> Decision:
    return decide(p, index, settings, namespace="shop")


def validate(index: CapacityIndex, settings: Settings, p: dict[str, Any]) -> dict[str, Any]:
    review = parse_review(orjson.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": "shop",
        "operation": "CREATE", "object": p}}))
    return dict(respond(review, judge(index, settings, p), "validate", settings, index.cni).response)


def denial_text(index: CapacityIndex, settings: Settings, p: dict[str, Any]) -> str:
    answer = validate(index, settings, p)
    assert answer["allowed"] is False, answer
    return str(answer["status"]["message"])


# ---- a full node needs a whole ENI from its subnet --------------------------------------------------------

T3_FULL = """
settings: {mode: enforce}
subnets:
  - {id: subnet-a, zone: us-east-1a, cidr: 10.0.1.0/27, free: %d}
nodes:
  - {name: n1, zone: us-east-1a, type: t3.medium, subnet: subnet-a, heldIPs: 10, enis: 2, pods: {ip: 10}}
"""


def test_full_node_gets_nothing_from_a_subnet_with_fewer_addresses_than_a_new_eni() -> None:
    """tryAllocateENI -> createENI: a t3.medium whose two ENIs are full needs 1 + 5 addresses at once for its
    third; with 5 free the call fails and no pod IP comes: the pinned pod is denied. A new node would get IPs
    one at a time on its primary ENI (tryAssignIPs falls back to one), so the zone pod waits for one."""
    index, settings = load(T3_FULL % 5)
    assert index.zone_headroom(A) == 0
    assert judge(index, settings, pod(node="n1")).verdict is Verdict.DENY
    zone_pod = judge(index, settings, pod(zone=A))
    assert zone_pod.verdict is not Verdict.DENY and zone_pod.waits_for_node
    assert zone_pod.avoid_nodes == ("n1",)
    text = denial_text(index, settings, pod(node="n1"))
    assert "subnet-a has 5 free address(es); a new ENI on t3.medium needs 6 address(es) at once" in text


def test_full_node_with_enough_addresses_for_a_new_eni_is_admitted() -> None:
    """The same node with 6 free: the ENI is created (5 pod IPs); no false denial."""
    index, settings = load(T3_FULL % 6)
    assert index.zone_headroom(A) == 5
    assert judge(index, settings, pod(node="n1")).verdict is Verdict.ALLOW
    assert judge(index, settings, pod(zone=A)).verdict is Verdict.ALLOW


def test_one_free_address_is_no_pod_ip_for_a_full_node_nor_a_new_one() -> None:
    """The 11th pod on a t3.medium holding 10 IPs on two full ENIs, its /27 with 1 free address: real
    capacity 10. A new node would need its own primary and a first IP: 2 addresses. Denied."""
    index, settings = load(T3_FULL % 1)
    figures = index.zone_figures(A)
    assert (figures.headroom, figures.new_node_ips) == (0, 0)
    assert judge(index, settings, pod(zone=A)).verdict is Verdict.DENY


def test_pods_waiting_for_an_ip_stay_counted_across_refreshes() -> None:
    """A pod beyond what its node holds is unmet demand: it keeps its claim on the next ENI after every EC2
    refresh (which reports the same held IPs and free addresses), so no extra pod is admitted per refresh."""
    index, settings = load(T3_FULL % 8)
    assert index.zone_headroom(A) == 5  # 8 free: one ENI (6) for 5 IPs
    for i in range(5):
        index.upsert_pod(f"shop/more-{i}", "n1", PodUse.IP)  # EC2 still says 10 held: 5 pods wait
    assert index.zone_figures(A).waiting == 5
    assert index.zone_headroom(A) == 0
    for _ in range(3):  # refreshes: the ENI was not created yet (or ipamd is slow); same figures
        index.set_node_held("n1", 10, enis=2)
        index.upsert_subnet("subnet-a", zone=A, free_ips=8)
        assert index.zone_headroom(A) == 0
        assert judge(index, settings, pod(node="n1")).verdict is Verdict.DENY


def test_waiting_pods_on_one_node_do_not_cancel_another_nodes_warm_ips() -> None:
    """Pods waiting on a node whose next ENI the subnet cannot fund are that node's unmet demand, not a debit on
    the zone: another node's warm IPs still take pods (no false denial), and deleting the waiting pods credits
    no address that never existed."""
    index, settings = load("""
subnets:
  - {id: subnet-a, zone: us-east-1a, free: 2}
nodes:
  - {name: full, zone: us-east-1a, type: t3.medium, subnet: subnet-a, heldIPs: 10, enis: 2, pods: {ip: 13}}
  - {name: roomy, zone: us-east-1a, type: t3.medium, subnet: subnet-a, heldIPs: 10, enis: 2, pods: {ip: 7}}
""")
    assert index.zone_figures(A).waiting == 3
    assert index.zone_headroom(A) == 3  # roomy's 3 warm IPs
    zone_pod = judge(index, settings, pod(zone=A))
    assert zone_pod.verdict is Verdict.STEER and zone_pod.avoid_nodes == ("full",)
    assert judge(index, settings, pod(node="roomy")).verdict is Verdict.ALLOW
    assert judge(index, settings, pod(node="full")).verdict is Verdict.DENY
    for i in range(3):
        index.remove_pod(f"apps/full-app-{10 + i}")
    assert index.subnets["subnet-a"].supply == 2
    assert index.zone_headroom(A) == 3


# ---- nodes ipamd will not grow ----------------------------------------------------------------------------


def test_minimum_ip_target_alone_never_grows_a_node() -> None:
    """datastoreTargetState / isDatastorePoolTooLow: MINIMUM_IP_TARGET=10 with no WARM_IP_TARGET: a node holding
    10 IPs with 10 pods never asks for more, whatever the subnet has. A nodeName pod is denied."""
    index, settings = load("""
cni: {MINIMUM_IP_TARGET: "10"}
subnets:
  - {id: subnet-a, zone: us-east-1a, free: 100}
nodes:
  - {name: n1, zone: us-east-1a, type: m5.large, subnet: subnet-a, heldIPs: 10, pods: {ip: 10}}
  - {name: n2, zone: us-east-1a, type: m5.large, subnet: subnet-a, heldIPs: 10, pods: {ip: 10}}
""")
    assert judge(index, settings, pod(node="n1")).verdict is Verdict.DENY
    assert "MINIMUM_IP_TARGET without WARM_IP_TARGET" in denial_text(index, settings, pod(node="n1"))
    # The zone: no node can give an IP, but new nodes can (each takes its minimum): not denied, steered off
    # the dry nodes, which still have pod slots.
    decision = judge(index, settings, pod(zone=A))
    assert decision.verdict is Verdict.STEER and decision.waits_for_node
    assert set(decision.avoid_nodes) == {"n1", "n2"}


def test_cordoned_node_gets_no_ip_unless_ipamd_manages_it() -> None:
    """isENIAttachmentAllowed: a DaemonSet pod tolerating the cordon lands on it; with no warm IP it cannot get
    one, whatever its neighbours' subnet has, unless AWS_MANAGE_ENIS_NON_SCHEDULABLE=true."""
    doc = """
cni: {AWS_MANAGE_ENIS_NON_SCHEDULABLE: "%s"}
subnets:
  - {id: subnet-a, zone: us-east-1a, free: 100}
nodes:
  - {name: cordoned, zone: us-east-1a, type: m5.large, subnet: subnet-a, heldIPs: 9, pods: {ip: 9},
     unschedulable: true}
  - {name: other, zone: us-east-1a, type: m5.large, subnet: subnet-a}
"""
    index, settings = load(doc % "false")
    assert judge(index, settings, pod(node="cordoned")).verdict is Verdict.DENY
    assert "cordoned" in denial_text(index, settings, pod(node="cordoned"))
    index, settings = load(doc % "true")
    assert judge(index, settings, pod(node="cordoned")).verdict is Verdict.ALLOW


def test_prefix_delegation_off_on_a_non_nitro_node() -> None:
    """isConfigValid: ENABLE_PREFIX_DELEGATION on an m4.large runs secondary IPs: its new ENI needs 1 + 9
    addresses, not whole /28s, so a fragmented subnet with 40 free addresses still serves it."""
    index, settings = load("""
cni: {ENABLE_PREFIX_DELEGATION: "true"}
subnets:
  - {id: subnet-a, zone: us-east-1a, free: 40, freeBlocks: 0}
nodes:
  - {name: m4, zone: us-east-1a, type: m4.large, subnet: subnet-a, heldIPs: 9, enis: 1, pods: {ip: 9}}
""")
    assert judge(index, settings, pod(node="m4")).verdict is Verdict.ALLOW
    assert index.zone_headroom(A) == 9  # its second (and last) ENI


def test_no_growth_past_max_pods() -> None:
    """isDatastorePoolTooLow: no more prefixes once the node holds max-pods IPs."""
    index, _settings = load("""
cni: {ENABLE_PREFIX_DELEGATION: "true", WARM_PREFIX_TARGET: "1"}
subnets:
  - {id: subnet-a, zone: us-east-1a, free: 400, freeBlocks: 20}
nodes:
  - {name: n1, zone: us-east-1a, type: m5.xlarge, subnet: subnet-a, allocatablePods: 110, pods: {ip: 96}}
""")
    node = index.node_figures("n1")
    assert node is not None and node.held == 112  # 7 /28s: the 8th is never asked for
    assert index.zone_headroom(A) == 110 - 96


# ---- subnet accounting -------------------------------------------------------------------------------------


def test_one_free_block_serves_one_dry_node() -> None:
    """Prefixes are allocated whole and per node: one free /28 serves one node's growth; the others' pods are
    steered away from them."""
    index, _settings = load("""
cni: {ENABLE_PREFIX_DELEGATION: "true", WARM_PREFIX_TARGET: "0"}
subnets:
  - {id: subnet-a, zone: us-east-1a, free: 20, freeBlocks: 1}
nodes:
  - {name: n1, zone: us-east-1a, type: m5.large, subnet: subnet-a, heldIPs: 16, enis: 1, pods: {ip: 16}}
  - {name: n2, zone: us-east-1a, type: m5.large, subnet: subnet-a, heldIPs: 16, enis: 1, pods: {ip: 16}}
""")
    assert index.zone_headroom(A) == 16  # one /28, not two


def test_a_new_node_takes_its_primary_and_first_request() -> None:
    """A node that joined after the subnet was measured has taken its primary address and its warm pool
    already: the zone's figure for new nodes is net of both."""
    index, _settings = load(T3_FULL % 8)
    before = index.zone_figures(A).new_node_ips
    index.upsert_node("joined", zone=A, instance_type="t3.medium", pod_subnet="subnet-a", allocatable_pods=17)
    # predicted: its primary ENI's 5 secondaries and its own primary address
    assert index.subnets["subnet-a"].supply == 8 - 6
    assert index.zone_figures(A).new_node_ips < before


# ---- custom networking --------------------------------------------------------------------------------------

CUSTOM = """
cni: {AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG: "true", ENI_CONFIG_LABEL_DEF: "topology.kubernetes.io/zone"}
eniConfigs: {%s}
subnets:
  - {id: subnet-node-a, zone: us-east-1a, free: 200}
  - {id: subnet-pods-a, zone: us-east-1a, free: 100}
  - {id: subnet-node-b, zone: us-east-1b, free: 200}
  - {id: subnet-pods-b, zone: us-east-1b, free: 0}
nodes:
  - {name: a1, zone: us-east-1a, type: m5.large, subnet: subnet-node-a}
  - {name: b1, zone: us-east-1b, type: m5.large, subnet: subnet-node-b, heldIPs: 9, enis: 1, pods: {ip: 9}}
"""


def test_custom_networking_node_subnets_are_no_pod_supply() -> None:
    """Under custom networking pods draw on the ENIConfig's subnet only: zone b's node subnet has 200 free but
    its pod subnet none, so a pod pinned to zone b is denied; the node subnets are not in the index."""
    index, settings = load(CUSTOM % '"us-east-1a": subnet-pods-a, "us-east-1b": subnet-pods-b')
    assert "subnet-node-b" not in index.subnets
    assert judge(index, settings, pod(zone=B)).verdict is Verdict.DENY
    assert judge(index, settings, pod(zone=A)).verdict is Verdict.ALLOW


def test_custom_networking_falls_back_to_the_default_eniconfig() -> None:
    """MyENIConfig: with no label or annotation match the ENIConfig named `default` applies."""
    index, _ = load(CUSTOM.replace("ENI_CONFIG_LABEL_DEF", "UNUSED_LABEL") % "default: subnet-pods-a")
    assert index.nodes["a1"].pod_subnet == "subnet-pods-a"
    assert index.nodes["b1"].pod_subnet == "subnet-pods-a"


def test_node_with_no_eniconfig_gives_no_pod_ip() -> None:
    """MyENIConfig fails: ipamd attaches no pod ENI, the node has no pod IP; a pod pinned there is denied,
    and the zone is not counted as having room (it is steered away from, never denied on a guess)."""
    index, settings = load(CUSTOM.replace("ENI_CONFIG_LABEL_DEF", "UNUSED_LABEL") % "other: subnet-pods-a")
    a1 = index.node_figures("a1")
    assert a1 is not None and a1.no_eni_config and a1.capacity == 0
    assert judge(index, settings, pod(node="a1")).verdict is Verdict.DENY
    assert "no ENIConfig" in denial_text(index, settings, pod(node="a1"))
    assert index.zone_headroom(A) == 0
    assert judge(index, settings, pod(zone=A)).verdict is not Verdict.DENY


# ---- pods ipguard must steer by node -------------------------------------------------------------------------

MAXPODS_MISTAKE = """
settings: {maxSteeredNodes: "%d"}
subnets:
  - {id: subnet-a, zone: us-east-1a, free: 0}
nodes:
  - {name: dry-1, zone: us-east-1a, type: m5.large, subnet: subnet-a, allocatablePods: 110, heldIPs: 27, enis: 3,
     pods: {ip: 27}}
  - {name: dry-2, zone: us-east-1a, type: m5.large, subnet: subnet-a, allocatablePods: 110, heldIPs: 27, enis: 3,
     pods: {ip: 27}}
  - {name: roomy, zone: us-east-1a, type: m5.large, subnet: subnet-a, allocatablePods: 110, heldIPs: 27, enis: 3,
     pods: {ip: 10}}
"""


def test_nodes_out_of_ips_with_pod_slots_are_avoided_by_name() -> None:
    """kubelet max-pods 110 on m5.large (27 pod IPs): the scheduler still binds to the dry nodes; ipguard keeps
    pods off them by name."""
    index, settings = load(MAXPODS_MISTAKE % 20)
    decision = judge(index, settings, pod())
    assert decision.verdict is Verdict.STEER
    assert decision.avoid_nodes == ("dry-1", "dry-2")


def test_too_many_dry_nodes_to_list_steers_onto_the_nodes_that_can() -> None:
    """More dry nodes than maxSteeredNodes: the shorter list, the nodes that can take the pod, goes in as
    `kubernetes.io/hostname In`."""
    index, settings = load(MAXPODS_MISTAKE % 1)
    decision = judge(index, settings, pod())
    assert decision.verdict is Verdict.STEER
    assert (decision.avoid_nodes, decision.only_nodes) == ((), ("roomy",))


def test_pod_pinned_by_hostname_is_judged_on_that_node() -> None:
    """A nodeSelector on kubernetes.io/hostname names the node: judged there, as a nodeName pod is."""
    index, settings = load(MAXPODS_MISTAKE % 20)
    assert judge(index, settings, pod(hostname="dry-1")).verdict is Verdict.DENY
    assert judge(index, settings, pod(hostname="roomy")).verdict is Verdict.ALLOW
    text = denial_text(index, settings, pod(hostname="dry-1"))
    assert "is pinned by its node affinity or kubernetes.io/hostname selector and that node" in text


# ---- messages that agree with their figures ------------------------------------------------------------------


def test_denial_by_the_reserve_says_so() -> None:
    """When free pod IPs exist but all are kept back by the zone reserve, the denial says so and offers to
    lower it."""
    index, settings = load("""
settings: {zoneReserve: "10"}
subnets:
  - {id: subnet-a, zone: us-east-1a, free: 3}
nodes:
  - {name: n1, zone: us-east-1a, type: m5.large, subnet: subnet-a, heldIPs: 18, enis: 2, pods: {ip: 8}}
""")
    text = denial_text(index, settings, pod(zone=A))
    assert "kept back by its reserve of 10" in text
    assert "lower zoneReserve" in text


def test_denial_counts_recent_admissions() -> None:
    """Reservations (pods admitted in the last seconds, not yet on a node) are in the figures."""
    index, settings = load(T3_FULL % 1)
    index.reserve("shop/burst-1", A)
    text = denial_text(index, settings, pod(zone=A))
    assert "1 pod(s) admitted in the last seconds, not yet on a node" in text


def test_pod_waiting_for_a_new_node_is_warned() -> None:
    """A zone whose nodes are full but whose subnet has addresses: admitted, with a warning that it waits for a
    new node (without an autoscaler it would sit Pending with no hint)."""
    index, settings = load("""
subnets:
  - {id: subnet-a, zone: us-east-1a, free: 50}
nodes:
  - {name: n1, zone: us-east-1a, type: t3.medium, subnet: subnet-a, allocatablePods: 17, heldIPs: 15, enis: 3,
     pods: {ip: 15}}
""")
    p = pod(zone=A)
    decision = judge(index, settings, p)
    assert decision.verdict is not Verdict.DENY and decision.waits_for_node
    answer = validate(index, settings, p)
    assert answer["allowed"] is True
    assert any("waits Pending for a new node" in w for w in answer.get("warnings", []))


# ---- ENI slots that carry no pod IPs ----------------------------------------------------------------------

LOST_SLOT = """
cni: {MAX_ENI: "%s"}
subnets:
  - {id: subnet-a, zone: us-east-1a, free: 200}
nodes:
  - {name: n1, zone: us-east-1a, type: m5.large, subnet: subnet-a, heldIPs: 18, enis: 2, lostEnis: %d,
     pods: {ip: 18}}
"""


def test_an_eni_that_carries_no_pod_ips_takes_the_last_eni_slot() -> None:
    """hasRoomForEni: maxENI less unmanaged ENIs (no_manage=true, EFA-only; filterUnmanagedENIs) and excluded
    ones (excludedENIBasedOnSubnetTags). An m5.large (3 ENIs) with a no_manage ENI attached and its two pod
    ENIs full gets no third pod ENI, whatever its subnet has: the 19th pod on it is denied."""
    index, settings = load(LOST_SLOT % ("", 1))
    node = index.nodes["n1"]
    assert (node.capacity, node.grows) == (2 * 9, False)
    assert judge(index, settings, pod(node="n1")).verdict is Verdict.DENY
    assert "every ENI slot of m5.large is in use (1 by ENIs that carry no pod IPs)" in denial_text(
        index, settings, pod(node="n1"))
    index, settings = load(LOST_SLOT % ("", 0))  # no such ENI: the third slot takes a new ENI
    assert index.nodes["n1"].capacity == 3 * 9
    assert judge(index, settings, pod(node="n1")).verdict is Verdict.ALLOW


def test_lost_eni_slots_come_off_max_eni_not_off_the_type_limit() -> None:
    """getMaxENI then hasRoomForEni: maxENI = min(type limit, MAX_ENI), and the slots of ENIs that carry no pod
    IPs come off that: MAX_ENI=3 on an m5.large (3) with one lost slot leaves 2 pod ENIs; MAX_ENI=2 leaves 1."""
    index, _ = load(LOST_SLOT % ("3", 1))
    assert index.nodes["n1"].capacity == 2 * 9
    index, _ = load(LOST_SLOT % ("2", 1))
    assert index.nodes["n1"].capacity == 1 * 9


# ---- where new nodes can go -------------------------------------------------------------------------------

AUTOSCALED = """
settings: {mode: enforce}
subnets:
  - {id: subnet-a, zone: us-east-1a, free: 0}
  - {id: subnet-k, zone: us-east-1a, free: %d, launchable: true}
  - {id: subnet-kb, zone: us-east-1b, free: %d, launchable: true}
nodes:
  - {name: n1, zone: us-east-1a, type: t3.medium, subnet: subnet-a, heldIPs: 15, enis: 3, pods: {ip: 15}}
"""


def test_full_nodes_and_dry_autoscaler_subnets_deny_naming_them() -> None:
    """A zone whose nodes are all full is the autoscaler's to fix only if it can launch there with addresses:
    with the node's subnet empty and Karpenter's subnets (EC2NodeClass status.subnets) empty too, the pod is
    denied, and the message says no autoscaler subnet in the allowed zones has addresses."""
    index, settings = load(AUTOSCALED % (0, 0))
    text = denial_text(index, settings, pod(zone=A))
    assert ("no autoscaler subnet in the allowed zones has addresses (subnet-k (us-east-1a) 0 free)"
            in text), text
    assert "EC2NodeClass subnetSelectorTerms" in text
    # Both zones allowed: the other zone's autoscaler subnet counts too.
    text = denial_text(index, settings, pod())
    assert "subnet-k (us-east-1a) 0 free, subnet-kb (us-east-1b) 0 free" in text


def test_full_nodes_with_an_autoscaler_subnet_with_addresses_are_not_denied() -> None:
    """The same full node, with Karpenter's subnet in the zone holding addresses: a new node takes the pod
    (it waits Pending for it), never a denial."""
    index, settings = load(AUTOSCALED % (100, 0))
    decision = judge(index, settings, pod(zone=A))
    assert decision.verdict is not Verdict.DENY and decision.waits_for_node


def test_denials_without_autoscaler_subnets_do_not_speak_of_them() -> None:
    """No EC2NodeClass known: nothing said about autoscaler subnets."""
    index, settings = load("""
settings: {mode: enforce}
subnets:
  - {id: subnet-a, zone: us-east-1a, free: 0}
nodes:
  - {name: n1, zone: us-east-1a, type: t3.medium, subnet: subnet-a, heldIPs: 15, enis: 3, pods: {ip: 15}}
""")
    assert "autoscaler" not in denial_text(index, settings, pod(zone=A))
