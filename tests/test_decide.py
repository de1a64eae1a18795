"""Admission decisions on pods exactly as a real kube-apiserver sent them (tests/fixtures/apiserver), against
an index of the fixture cluster; and the snapshot loader.

Fixture cluster (fixtures README): namespace payments,
  ip-10-0-1-10.ec2.internal  us-east-1a  m5.large   allocatable 29   27 pod IPs, 9 held when idle
  ip-10-0-1-11.ec2.internal  us-east-1a  m5.xlarge  allocatable 58   56 pod IPs, 14 held when idle
  ip-10-0-2-20.ec2.internal  us-east-1b  m5.large   allocatable 29
  ip-10-0-3-30.ec2.internal  us-east-1c  t3.medium  allocatable 17   15 pod IPs, 5 held when idle
one pod subnet per zone. Idle, with 100 free addresses per subnet, zone headroom is
  us-east-1a min(27 + 56, 9 + 14 + 100) = 83, us-east-1b min(27, 9 + 100) = 27, us-east-1c min(15, 5 + 100) = 15.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.paths import FIXTURES
from webhook.model.cni import CniSettings
from webhook.model.config import Settings
from webhook.model.decide import Decision, Verdict, decide
from webhook.model.index import CapacityIndex, PodUse
from webhook.model.limits import LimitsTable
from webhook.sources.snapshot import SnapshotError, load_snapshot, parse_snapshot

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

A, B, C = "us-east-1a", "us-east-1b", "us-east-1c"
N10, N11, N20, N30 = (
    "ip-10-0-1-10.ec2.internal",
    "ip-10-0-1-11.ec2.internal",
    "ip-10-0-2-20.ec2.internal",
    "ip-10-0-3-30.ec2.internal",
)
NODES = [(N10, A, "m5.large", 29), (N11, A, "m5.xlarge", 58), (N20, B, "m5.large", 29), (N30, C, "t3.medium", 17)]
SUBNETS = {A: "subnet-0a1b2c3d4e5f60718", B: "subnet-0b2c3d4e5f6071829", C: "subnet-0c3d4e5f607182930"}


def request(name: str, stage: str = "mutate") -> dict[str, Any]:
    review = json.loads((FIXTURES / f"{name}.{stage}.json").read_text(encoding="utf-8"))
    assert review["apiVersion"] == "admission.k8s.io/v1"
    return review["request"]  # type: ignore[no-any-return]


def fixture_pod(name: str, stage: str = "mutate") -> dict[str, Any]:
    return copy.deepcopy(request(name, stage)["object"])


def cluster(
    free: dict[str, int] | None = None,
    pods: dict[str, int] | None = None,
    held: dict[str, int] | None = None,
    cni: CniSettings | None = None,
    unschedulable: tuple[str, ...] = (),
) -> CapacityIndex:
    free = {A: 100, B: 100, C: 100, **(free or {})}
    ix = CapacityIndex(cni=cni)
    for name, zone, itype, alloc in NODES:
        ix.upsert_node(name, zone=zone, instance_type=itype, pod_subnet=SUBNETS[zone], allocatable_pods=alloc,
                       schedulable=name not in unschedulable)
        for i in range((pods or {}).get(name, 0)):
            ix.upsert_pod(f"apps/{name}-{i}", name, PodUse.IP)
        if held and name in held:
            ix.set_node_held(name, held[name])
    for zone, subnet in SUBNETS.items():
        ix.upsert_subnet(subnet, zone=zone, free_ips=free[zone])
    return ix


def exhausted(*zones: str) -> CapacityIndex:
    """Zones whose subnet is empty and whose nodes hold no free IP (EC2's figures), though they have pod room."""
    pods = {N10: 9, N11: 14, N20: 9, N30: 5}
    held: dict[str, int] = {}
    free: dict[str, int] = {}
    for name, zone, _, _ in NODES:
        if zone in zones:
            held[name] = pods[name]
            free[zone] = 0
        else:
            pods[name] = 0
    return cluster(free=free, pods=pods, held=held)


def judge(
    pod: dict[str, Any] | str,
    ix: CapacityIndex,
    settings: Settings | None = None,
    *,
    stage: str = "mutate",
    **kwargs: Any,
) -> Decision:
    if isinstance(pod, str):
        req = request(pod, stage)
        kwargs.setdefault("namespace", req.get("namespace"))
        kwargs.setdefault("operation", req["operation"])
        pod = copy.deepcopy(req["object"])
    return decide(pod, ix, settings or Settings(), **kwargs)


def zones_of(decision: Decision) -> list[str]:
    return [z.zone for z in decision.zones]


def set_required_terms(pod: dict[str, Any], terms: list[dict[str, Any]]) -> dict[str, Any]:
    pod["spec"]["affinity"] = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}
    }
    return pod


# ---- the fixture cluster itself ---------------------------------------------------------------------------


def test_fixture_cluster_figures() -> None:
    ix = cluster()
    assert [ix.zone_headroom(z) for z in (A, B, C)] == [83, 27, 15]
    ex = exhausted(A)
    figures = ex.zone_figures(A)
    assert (figures.room, figures.warm_free, figures.subnet_free, figures.headroom) == (18 + 42, 0, 0, 0)


# ---- not applicable ---------------------------------------------------------------------------------------


def test_host_network_not_applicable() -> None:
    d = judge("pod-create-hostnetwork", exhausted(A, B, C))
    assert d.verdict is Verdict.NOT_APPLICABLE
    assert d.use is PodUse.NONE
    assert d.pod == "payments/hostnet"


def test_update_not_applicable() -> None:
    req = request("pod-update-label")
    assert req["operation"] == "UPDATE"
    d = judge("pod-update-label", exhausted(A, B, C))
    assert d.verdict is Verdict.NOT_APPLICABLE


@pytest.mark.parametrize("stage", ["mutate", "validate"])
def test_exempt_namespace(stage: str) -> None:
    ix = exhausted(A, B, C)
    settings = Settings.from_configmap({"exemptNamespaces": "kube-system,payments"})
    d = judge("pod-create-generatename", ix, settings, stage=stage)
    assert d.verdict is Verdict.NOT_APPLICABLE
    # default exemptions: kube-system only
    pod = fixture_pod("pod-create-generatename", stage)
    pod["metadata"]["namespace"] = "kube-system"
    assert judge(pod, ix, namespace="kube-system").verdict is Verdict.NOT_APPLICABLE
    assert judge("pod-create-generatename", ix, stage=stage).verdict is Verdict.DENY


def test_mirror_pod_not_applicable() -> None:
    pod = fixture_pod("pod-create-nodename")
    pod["metadata"]["annotations"] = {"kubernetes.io/config.mirror": "0123456789abcdef"}
    d = judge(pod, exhausted(A, B, C), namespace="payments")
    assert d.verdict is Verdict.NOT_APPLICABLE


def test_fargate_pods_not_applicable() -> None:
    ix = exhausted(A, B, C)
    pod = fixture_pod("pod-create-generatename")
    pod["metadata"]["labels"]["eks.amazonaws.com/fargate-profile"] = "fp-default"
    assert judge(pod, ix, namespace="payments").verdict is Verdict.NOT_APPLICABLE
    pod = fixture_pod("pod-create-generatename")
    pod["spec"]["schedulerName"] = "fargate-scheduler"
    assert judge(pod, ix, namespace="payments").verdict is Verdict.NOT_APPLICABLE


def test_windows_pod_not_applicable() -> None:
    pod = fixture_pod("pod-create-generatename")
    pod["spec"]["nodeSelector"] = {"kubernetes.io/os": "windows"}
    assert judge(pod, exhausted(A, B, C), namespace="payments").verdict is Verdict.NOT_APPLICABLE


def test_ipv6_cluster_not_applicable() -> None:
    ix = exhausted(A, B, C)
    ix.set_cni(CniSettings(ipv6=True))
    d = judge("pod-create-generatename", ix)
    assert d.verdict is Verdict.NOT_APPLICABLE
    assert "IPv6" in d.reason


# ---- allow / steer / deny ---------------------------------------------------------------------------------


def test_generatename_pod_allowed_with_room() -> None:
    d = judge("pod-create-generatename", cluster())
    assert d.verdict is Verdict.ALLOW
    assert d.pod == "payments/api-7d9c8b6f5d-*"  # the mutating stage has no name yet
    assert d.use is PodUse.IP
    assert zones_of(d) == [A, B, C]
    assert [z.headroom for z in d.zones] == [83, 27, 15]
    assert d.avoid_zones == ()
    assert d.reserve_zone == C  # least to spare: a zone about to run out stops first


def test_validate_stage_sees_the_generated_name() -> None:
    d = judge("pod-create-generatename", cluster(), stage="validate")
    assert d.verdict is Verdict.ALLOW
    assert d.pod == "payments/api-7d9c8b6f5d-hpsl2"


def test_steer_away_from_exhausted_zone() -> None:
    ix = exhausted(A)
    d = judge("pod-create-generatename", ix)
    assert d.verdict is Verdict.STEER
    assert d.avoid_zones == (A,)
    assert d.open_zones == (B, C)
    check_a = d.zones[0]
    assert check_a.exhausted and check_a.headroom == 0
    # preferences toward the zones with more headroom, most first: b 27, c 15
    assert [z for z, _ in d.prefer_zones] == [B, C]
    weights = dict(d.prefer_zones)
    assert weights[B] == 100
    assert weights[B] > weights[C] >= 1
    assert d.reserve_zone == C  # the open zone with least to spare
    assert A in d.reason


def test_empty_subnet_with_warm_ips_is_not_a_denial() -> None:
    # zone b: subnet empty, but 2-20 holds 18 IPs (2 ENIs) with 9 pods on them: 9 warm
    ix = cluster(free={B: 0}, pods={N20: 9})
    d = judge("pod-create-nodeselector", ix)
    assert d.verdict is Verdict.ALLOW
    assert (d.zones[0].room, d.zones[0].warm_free, d.zones[0].subnet_free) == (18, 9, 0)
    assert d.zones[0].headroom == 9


def test_deny_when_the_warm_pool_could_not_grow() -> None:
    # zone b measured with 2-20 idle (9 IPs held) and 2 addresses free; then 11 pods land on 2-20:
    # it can hold at most 9 + 2 = 11 addresses, all in use, so the zone-b pod cannot get an IP
    ix = cluster(free={B: 2})
    for i in range(11):
        ix.upsert_pod(f"apps/late-{i}", N20, PodUse.IP)
    d = judge("pod-create-nodeselector", ix)
    assert d.verdict is Verdict.DENY


def test_deny_when_no_node_can_take_the_pod() -> None:
    # zone b only (the zone-b pod): 2-20 is full (allocatable reached) but holds 10 warm IPs; a second node is dry
    # (holds exactly what its pods use) and the subnet is empty. Neither node can give the pod an IP.
    ix = CapacityIndex()
    ix.upsert_node(N20, zone=B, instance_type="m5.large", pod_subnet=SUBNETS[B], allocatable_pods=10)
    ix.upsert_node("ip-10-0-2-21.ec2.internal", zone=B, instance_type="m5.large", pod_subnet=SUBNETS[B],
                   allocatable_pods=29)
    for i in range(10):
        ix.upsert_pod(f"apps/full-{i}", N20, PodUse.IP)
    for i in range(9):
        ix.upsert_pod(f"apps/dry-{i}", "ip-10-0-2-21.ec2.internal", PodUse.IP)
    ix.set_node_held(N20, 20)
    ix.set_node_held("ip-10-0-2-21.ec2.internal", 9)
    ix.upsert_subnet(SUBNETS[B], zone=B, free_ips=0)
    # 2-20 has no pod slot left either: the scheduler will not pick it, so only 2-21 is listed to avoid
    assert sorted(ix.exhausted_nodes(B)) == ["ip-10-0-2-21.ec2.internal"]
    d = judge("pod-create-nodeselector", ix)
    assert d.verdict is Verdict.DENY


def test_deny_when_every_allowed_zone_is_exhausted() -> None:
    d = judge("pod-create-nodeselector", exhausted(B))
    assert d.verdict is Verdict.DENY
    assert d.pod == "payments/zone-b"
    assert zones_of(d) == [B]
    (check,) = d.zones
    assert check.exhausted
    assert (check.warm_free, check.subnet_free) == (0, 0)
    assert check.subnets == (SUBNETS[B],)
    assert d.reserve_zone is None


def test_deny_everything_exhausted() -> None:
    d = judge("pod-create-generatename", exhausted(A, B, C))
    assert d.verdict is Verdict.DENY
    assert zones_of(d) == [A, B, C]
    assert d.open_zones == ()


def test_node_selector_narrows_the_zones() -> None:
    # zone b has room; a and c are out: the zone-b pod is simply allowed
    d = judge("pod-create-nodeselector", exhausted(A, C))
    assert d.verdict is Verdict.ALLOW
    assert zones_of(d) == [B]


def test_required_affinity_in() -> None:
    assert zones_of(judge("pod-create-affinity", cluster())) == [A, C]
    d = judge("pod-create-affinity", exhausted(A))
    assert d.verdict is Verdict.STEER
    assert d.avoid_zones == (A,)
    assert [z for z, _ in d.prefer_zones] == [C]
    # a and c out, b open: b is not allowed for this pod
    d = judge("pod-create-affinity", exhausted(A, C))
    assert d.verdict is Verdict.DENY
    assert zones_of(d) == [A, C]


def test_required_affinity_not_in() -> None:
    pod = fixture_pod("pod-create-affinity")
    required = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    terms = required["nodeSelectorTerms"]
    terms[0]["matchExpressions"][0]["operator"] = "NotIn"
    d = judge(pod, exhausted(B), namespace="payments")
    assert zones_of(d) == [B]
    assert d.verdict is Verdict.DENY
    assert judge(pod, exhausted(A, C), namespace="payments").verdict is Verdict.ALLOW


def test_legacy_zone_key() -> None:
    pod = fixture_pod("pod-create-nodeselector")
    pod["spec"]["nodeSelector"] = {"failure-domain.beta.kubernetes.io/zone": B}
    d = judge(pod, exhausted(B), namespace="payments")
    assert zones_of(d) == [B]
    assert d.verdict is Verdict.DENY
    pod = set_required_terms(
        fixture_pod("pod-create-generatename"),
        [{"matchExpressions": [{"key": "failure-domain.beta.kubernetes.io/zone", "operator": "In", "values": [C]}]}],
    )
    assert zones_of(judge(pod, cluster(), namespace="payments")) == [C]


def test_multiple_terms_are_ored() -> None:
    pod = set_required_terms(
        fixture_pod("pod-create-generatename"),
        [
            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": [A]}]},
            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": [C]}]},
        ],
    )
    d = judge(pod, exhausted(A), namespace="payments")
    assert zones_of(d) == [A, C]
    assert d.verdict is Verdict.STEER
    assert judge(pod, exhausted(A, C), namespace="payments").verdict is Verdict.DENY


def test_expressions_within_a_term_are_anded() -> None:
    pod = set_required_terms(
        fixture_pod("pod-create-generatename"),
        [
            {
                "matchExpressions": [
                    {"key": "topology.kubernetes.io/zone", "operator": "In", "values": [A, B]},
                    {"key": "topology.kubernetes.io/zone", "operator": "NotIn", "values": [A]},
                    {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["m5.large"]},
                ]
            }
        ],
    )
    assert zones_of(judge(pod, cluster(), namespace="payments")) == [B]


def test_node_selector_and_affinity_both_apply() -> None:
    pod = fixture_pod("pod-create-affinity")  # In [a, c]
    pod["spec"]["nodeSelector"] = {"topology.kubernetes.io/zone": C}
    assert zones_of(judge(pod, cluster(), namespace="payments")) == [C]


def test_non_zone_constraints_leave_every_zone() -> None:
    pod = set_required_terms(
        fixture_pod("pod-create-generatename"),
        [{"matchExpressions": [{"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["m5.large"]}]}],
    )
    assert zones_of(judge(pod, cluster(), namespace="payments")) == [A, B, C]


def test_zone_without_schedulable_nodes_but_with_addresses_is_preferred_against_not_excluded() -> None:
    # zone c's only node is cordoned; its subnet has 100 addresses: new nodes could launch there
    ix = cluster(unschedulable=(N30,))
    d = judge("pod-create-generatename", ix)
    assert zones_of(d) == [A, B, C]
    c = d.zones[2]
    assert c.exhausted and not c.out_of_addresses
    assert d.verdict is Verdict.STEER and d.avoid_zones == ()
    assert [zone for zone, _ in d.prefer_zones] == [A, B] or [zone for zone, _ in d.prefer_zones] == [B, A]


def test_zones_with_nodes_out_of_addresses_but_an_empty_zone_with_addresses_do_not_deny() -> None:
    # every zone with nodes has an empty subnet and no warm IP; zone c has no node yet but 100 addresses
    ix = exhausted(A, B)
    ix.upsert_node(N30, zone=C, instance_type="t3.medium", pod_subnet=SUBNETS[C], allocatable_pods=17,
                   schedulable=False)
    d = judge("pod-create-generatename", ix)
    assert d.verdict is Verdict.STEER and set(d.avoid_zones) == {A, B}  # toward zone c, where nodes can come


def test_zone_constraints_that_allow_no_known_zone() -> None:
    pod = fixture_pod("pod-create-nodeselector")
    pod["spec"]["nodeSelector"] = {"topology.kubernetes.io/zone": "us-east-1d"}
    assert judge(pod, exhausted(A, B, C), namespace="payments").verdict is Verdict.ALLOW


def test_no_nodes_known_yet() -> None:
    d = judge("pod-create-generatename", CapacityIndex())
    assert d.verdict is Verdict.ALLOW


def test_zone_reserve() -> None:
    # zone c: 5 warm IPs on its node + 10 more of its room from a subnet with 15 free: headroom 15,
    # exhausted (and out of addresses: 15 left) at a reserve of 15, open at 14
    pod = fixture_pod("pod-create-nodeselector")
    pod["spec"]["nodeSelector"] = {"topology.kubernetes.io/zone": C}
    ix = cluster(free={C: 15})
    assert ix.zone_headroom(C) == 15
    d = judge(pod, ix, Settings.from_configmap({"zoneReserve": "15"}), namespace="payments")
    assert d.verdict is Verdict.DENY
    assert d.zones[0].reserve == 15
    assert judge(pod, ix, Settings.from_configmap({"zoneReserve": "14"}), namespace="payments").verdict is (
        Verdict.ALLOW
    )


def test_full_nodes_with_subnet_addresses_left_are_not_denied() -> None:
    # zone c's only node has room for 15 pods; its subnet has 100 addresses. A reserve of 15 makes the zone
    # exhausted, but new nodes would get addresses: the pod waits for the autoscaler instead of being denied.
    pod = fixture_pod("pod-create-nodeselector")
    pod["spec"]["nodeSelector"] = {"topology.kubernetes.io/zone": C}
    d = judge(pod, cluster(), Settings.from_configmap({"zoneReserve": "15"}), namespace="payments")
    assert d.verdict is not Verdict.DENY and "autoscaler" not in d.reason and "new nodes" in d.reason
    assert d.zones[0].exhausted and not d.zones[0].out_of_addresses
    # it waits in zone c: the preference records that on the Pending pod, and it holds a reservation there, so
    # a burst waiting for new nodes is counted against what those nodes could get
    assert d.waits_for_node and d.prefer_zones == ((C, 100),) and d.reserve_zone == C


def test_full_nodes_elsewhere_steer_away_from_the_empty_subnet() -> None:
    # every zone exhausted by the reserve; only zone a's subnet is empty: steer away from it, do not deny
    settings = Settings.from_configmap({"zoneReserve": "60"})
    d = judge("pod-create-generatename", cluster(free={A: 0}), settings)
    assert d.verdict is Verdict.STEER and d.avoid_zones == (A,)
    # waiting for a new node in the zone whose subnet has most left for one
    assert d.waits_for_node and d.reserve_zone in (B, C) and A not in dict(d.prefer_zones)


def test_steer_away_from_full_nodes() -> None:
    # 1-10 full (27 pods), zone a still has room on 1-11
    ix = cluster(pods={N10: 27})
    d = judge("pod-create-generatename", ix)
    assert d.verdict is Verdict.STEER
    assert d.avoid_zones == ()
    assert d.avoid_nodes == (N10,)
    s = Settings.from_configmap({"maxSteeredNodes": "0"})  # too many to list: zone figures alone
    assert judge("pod-create-generatename", ix, s).verdict is Verdict.ALLOW


# ---- pinned pods (spec.nodeName) --------------------------------------------------------------------------


def test_pinned_pod_judged_on_its_node_only() -> None:
    # every zone "exhausted" by a huge reserve, but the pinned node has room and warm IPs
    settings = Settings.from_configmap({"zoneReserve": "1000"})
    ix = cluster()
    assert judge("pod-create-generatename", ix, settings).verdict is Verdict.DENY
    d = judge("pod-create-nodename", ix, settings)
    assert d.verdict is Verdict.ALLOW
    assert d.node is not None
    assert (d.node.node, d.node.zone, d.node.known, d.node.can_take) == (N10, A, True, True)
    assert d.node.room == 27
    assert d.zones == ()
    assert (d.reserve_zone, d.reserve_node) == (A, N10)


def test_pinned_pod_denied_when_its_node_is_full() -> None:
    ix = cluster(pods={N10: 27})
    assert ix.zone_headroom(A) > 0
    d = judge("pod-create-nodename", ix)
    assert d.verdict is Verdict.DENY
    assert d.node is not None and not d.node.can_take and d.node.room == 0


def test_pinned_pod_denied_when_its_node_is_dry_and_subnet_empty() -> None:
    ix = cluster(free={A: 0}, pods={N10: 9}, held={N10: 9})
    d = judge("pod-create-nodename", ix)
    assert d.verdict is Verdict.DENY
    assert d.node is not None
    assert (d.node.room, d.node.warm_free, d.node.subnet_free) == (18, 0, 0)


def test_pinned_pod_on_unknown_node_allowed() -> None:
    pod = fixture_pod("pod-create-nodename")
    pod["spec"]["nodeName"] = "ip-10-0-9-99.ec2.internal"
    d = judge(pod, exhausted(A, B, C), namespace="payments")
    assert d.verdict is Verdict.ALLOW
    assert d.node is not None and d.node.known is False


# ---- stale data, dry run ----------------------------------------------------------------------------------


def test_stale_allows_with_flag() -> None:
    d = judge("pod-create-nodeselector", exhausted(B), stale=True)
    assert d.verdict is Verdict.ALLOW
    assert d.stale is True
    assert d.reserve_zone is None


def test_stale_does_not_override_not_applicable() -> None:
    d = judge("pod-create-hostnetwork", exhausted(A, B, C), stale=True)
    assert d.verdict is Verdict.NOT_APPLICABLE


def test_decide_holds_nothing() -> None:
    # a dry-run request (and any other) is judged without touching the index: reservations are the caller's
    req = request("pod-create-dryrun-server")
    assert req["dryRun"] is True
    ix = exhausted(A)
    before, version = ix.aggregates(), ix.version
    d = judge("pod-create-dryrun-server", ix)
    assert d.verdict is Verdict.STEER
    assert d.pod == "payments/dry-run-pod"
    assert ix.aggregates() == before
    assert ix.version == version
    assert ix.reservations() == []


# ---- branch-ENI pods --------------------------------------------------------------------------------------


def test_branch_eni_pod_judged_on_branch_capacity() -> None:
    ix = cluster(cni=CniSettings(pod_eni=True))
    d = judge("pod-create-pod-eni", ix)
    assert d.use is PodUse.BRANCH
    # t3.medium cannot trunk: zone c has IP room but no branch ENI; its subnet has addresses, so a trunking node
    # could still come there: preferred against, not excluded
    assert d.verdict is Verdict.STEER
    assert d.avoid_zones == () and C not in [zone for zone, _ in d.prefer_zones]
    # branch headroom: a min(9 + 18, 100) = 27, b min(9, 100) = 9, c 0
    assert [z.headroom for z in d.zones] == [27, 9, 0]
    plain = judge("pod-create-generatename", ix)
    assert plain.use is PodUse.IP
    assert C not in plain.avoid_zones


def test_branch_eni_pod_where_only_non_trunking_nodes() -> None:
    # no node in zone c can give a branch ENI; the scheduler sees vpc.amazonaws.com/pod-eni and keeps the pod
    # Pending for a trunking node, which the subnet's addresses can serve: no denial. An empty subnet: denial.
    ix = cluster(cni=CniSettings(pod_eni=True))
    pod = fixture_pod("pod-create-pod-eni")
    pod["spec"]["nodeSelector"] = {"topology.kubernetes.io/zone": C}
    waits = judge(pod, ix, namespace="payments")
    assert waits.verdict is not Verdict.DENY and waits.waits_for_node
    empty = cluster(cni=CniSettings(pod_eni=True), free={C: 0})
    assert judge(pod, empty, namespace="payments").verdict is Verdict.DENY
    plain = fixture_pod("pod-create-nodeselector")
    plain["spec"]["nodeSelector"] = {"topology.kubernetes.io/zone": C}
    assert judge(plain, ix, namespace="payments").verdict is Verdict.ALLOW


def test_branch_eni_pod_uses_branch_room_not_warm_ips() -> None:
    # zone b: the node's warm IPs are gone and the subnet is empty, but its branch ENIs need a subnet address
    ix = cluster(cni=CniSettings(pod_eni=True), free={B: 0})
    pod = fixture_pod("pod-create-pod-eni")
    pod["spec"]["nodeSelector"] = {"topology.kubernetes.io/zone": B}
    d = judge(pod, ix, namespace="payments")
    assert d.verdict is Verdict.DENY
    assert d.zones[0].headroom == 0


def test_pinned_branch_pod() -> None:
    ix = cluster(cni=CniSettings(pod_eni=True))
    pod = fixture_pod("pod-create-pod-eni")
    pod["spec"]["nodeName"] = N30
    d = judge(pod, ix, namespace="payments")
    assert d.verdict is Verdict.DENY  # t3.medium: no branch ENI at all
    assert d.node is not None and d.node.branch_room == 0
    pod["spec"]["nodeName"] = N10
    assert judge(pod, ix, namespace="payments").verdict is Verdict.ALLOW


# ---- snapshots --------------------------------------------------------------------------------------------


def test_example_cluster_loads() -> None:
    snapshot = load_snapshot(EXAMPLES / "cluster.yaml")
    assert snapshot.cni == CniSettings()
    assert snapshot.settings.zone_reserve == 3
    assert len(snapshot.nodes) == 10
    assert len(snapshot.subnets) == 3
    ix = snapshot.build_index()
    assert ix.zone_names() == [A, B, C]
    assert ix.unknown_types == set()
    # hand-worked (secondary IPs, WARM_ENI_TARGET=1, allocatable = max-pods):
    #  a: 1-10 room 2 warm 2; 1-11 room 8 warm 8; 1-12 (c5.large) room 2 warm 3; 1-13 (t3.medium) room 0 warm 0
    #  b: 2-20 room 15 warm 15; 2-21 (c5.xlarge) room 36 warm 22; 2-22 (m5.2xlarge) room 46 warm 19
    #  c: 3-30 room 5 warm 5; 3-31 (t3.large) room 15 warm 15; 3-32 (c5.large) room 19 warm 10
    za, zb, zc = (ix.zone_figures(z) for z in (A, B, C))
    assert (za.room, za.warm_free, za.subnet_free, za.headroom) == (12, 13, 2, 12)
    assert (zb.room, zb.warm_free, zb.subnet_free, zb.headroom) == (97, 56, 142, 97)
    assert (zc.room, zc.warm_free, zc.subnet_free, zc.headroom) == (39, 30, 61, 39)
    assert ix.aggregates() == ix.recount()


def test_custom_networking_example_loads() -> None:
    snapshot = load_snapshot(EXAMPLES / "cluster-custom-networking.yaml")
    assert snapshot.cni.custom_networking
    ix = snapshot.build_index()
    assert all(n.pod_subnet != n.subnet for n in snapshot.nodes)
    assert ix.aggregates() == ix.recount()


GOOD: dict[str, Any] = {
    "cni": {"WARM_ENI_TARGET": "1"},
    "settings": {"mode": "enforce"},
    "subnets": [{"id": "subnet-a", "zone": A, "cidr": "10.0.1.0/24", "free": 10}],
    "nodes": [{"name": "n1", "zone": A, "type": "m5.large", "subnet": "subnet-a", "pods": {"ip": 3}}],
}


def bad(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    target: Any = doc
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    last = keys[-1]
    if value is DELETE:
        del target[last]
    elif last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return doc


DELETE = object()


def test_good_document_parses() -> None:
    snapshot = parse_snapshot(GOOD, "good.yaml", LimitsTable())
    assert snapshot.nodes[0].allocatable_pods == 29
    assert snapshot.nodes[0].ip_pods == 3


@pytest.mark.parametrize(
    ("path", "value", "place"),
    [
        ("subnets", {"id": "x"}, "subnets"),
        ("nodes", "n1", "nodes"),
        ("cni", ["x"], "cni"),
        ("settings", "enforce", "settings"),
        ("subnets.0.id", DELETE, "subnets[0]"),
        ("subnets.0.zone", "", "subnets[0]"),
        ("subnets.0.free", -1, "subnets[0]"),
        ("subnets.0.free", True, "subnets[0]"),
        ("subnets.0.free", "10", "subnets[0]"),
        ("subnets.0", "subnet-a", "subnets[0]"),
        ("nodes.0.zone", DELETE, "nodes[0] (n1)"),
        ("nodes.0.type", "m5.huge", "m5.huge"),
        ("nodes.0.subnet", "subnet-zzz", "subnet-zzz"),
        ("nodes.0.pods", [1], "nodes[0] (n1).pods"),
        ("nodes.0.pods", {"ip": -2}, "nodes[0] (n1)"),
        ("nodes.0.allocatablePods", "29", "allocatablePods"),
        ("nodes.0.heldIPs", -1, "heldIPs"),
        ("cni", {"WARM_IP_TARGET": "lots"}, "WARM_IP_TARGET"),
        ("settings", {"mode": "strict"}, "mode"),
        ("settings", {"bogus": "1"}, "bogus"),
    ],
)
def test_bad_documents_name_the_place(path: str, value: Any, place: str) -> None:
    with pytest.raises(SnapshotError) as info:
        parse_snapshot(bad(path, value), "bad.yaml", LimitsTable())
    message = str(info.value)
    assert message.startswith("bad.yaml: ")
    assert place in message


def test_document_must_be_a_mapping() -> None:
    with pytest.raises(SnapshotError, match=r"^x\.yaml: the document must be a mapping"):
        parse_snapshot(["nodes"], "x.yaml", LimitsTable())


def test_duplicate_node_names() -> None:
    doc = copy.deepcopy(GOOD)
    doc["nodes"].append(dict(doc["nodes"][0]))
    with pytest.raises(SnapshotError, match="unique"):
        parse_snapshot(doc, "dup.yaml", LimitsTable())


def test_duplicate_subnet_ids() -> None:
    doc = copy.deepcopy(GOOD)
    doc["subnets"].append({"id": "subnet-a", "zone": B, "free": 500})
    with pytest.raises(SnapshotError, match="subnet-a"):
        parse_snapshot(doc, "dup.yaml", LimitsTable())


def test_custom_networking_needs_the_eniconfig() -> None:
    """A node whose ENIConfig does not exist gets no pod subnet (its pods get no IP; ipguard fails open on it,
    and ENIConfig checks say so); an ENIConfig's subnet must be listed."""
    doc = copy.deepcopy(GOOD)
    doc["cni"] = {"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true", "ENI_CONFIG_LABEL_DEF": "topology.kubernetes.io/zone"}
    snapshot = parse_snapshot(doc, "cn.yaml", LimitsTable())
    assert snapshot.nodes[0].eni_config == A and snapshot.nodes[0].pod_subnet is None
    doc["eniConfigs"] = {A: "subnet-pods"}
    with pytest.raises(SnapshotError, match="subnet-pods"):
        parse_snapshot(doc, "cn.yaml", LimitsTable())
    doc["subnets"].append({"id": "subnet-pods", "zone": A, "free": 100})
    snapshot = parse_snapshot(doc, "cn.yaml", LimitsTable())
    assert snapshot.nodes[0].pod_subnet == "subnet-pods"
    assert snapshot.nodes[0].allocatable_pods == 20  # custom networking max-pods


def test_load_snapshot_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(SnapshotError, match=r"missing\.yaml: cannot read"):
        load_snapshot(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("nodes: [\n  - {name: x", encoding="utf-8")
    with pytest.raises(SnapshotError, match=r"broken\.yaml: not valid YAML"):
        load_snapshot(broken)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD), encoding="utf-8")
    assert load_snapshot(good).nodes[0].name == "n1"
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(yaml.safe_dump(bad("nodes.0.type", "m5.huge")), encoding="utf-8")
    with pytest.raises(SnapshotError) as info:
        load_snapshot(bad_file)
    assert str(bad_file) in str(info.value)
    assert "nodes[0] (n1)" in str(info.value)


def daemonset_pod(*nodes: str) -> dict[str, Any]:
    """A pod as the DaemonSet controller creates it: pinned to its node by a matchFields term, no nodeName."""
    pod = fixture_pod("pod-create-generatename")
    return set_required_terms(
        pod, [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [n]}]} for n in nodes]
    )


def test_daemonset_pod_is_judged_on_its_node_and_never_steered() -> None:
    # zone A's N10 is full, but N11 (also zone A) has room: a free pod would be steered away from N10
    ix = cluster(pods={N10: 27})
    d = judge(daemonset_pod(N10), ix, namespace="payments")
    assert d.verdict is Verdict.DENY  # steering it elsewhere would leave it unschedulable
    assert d.node is not None and d.node.node == N10 and d.avoid_zones == () and d.avoid_nodes == ()
    d = judge(daemonset_pod(N11), ix, namespace="payments")
    assert d.verdict is Verdict.ALLOW
    assert (d.reserve_zone, d.reserve_node) == (A, N11)


def test_pod_pinned_to_several_nodes_is_allowed_when_one_can_take_it() -> None:
    ix = cluster(pods={N10: 27})
    d = judge(daemonset_pod(N10, N20), ix, namespace="payments")
    assert d.verdict is Verdict.ALLOW and d.reserve_node == N20


def test_match_fields_in_one_term_only_does_not_pin() -> None:
    pod = daemonset_pod(N10)
    pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"].append({"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In",
                                                           "values": ["linux"]}]})
    d = judge(pod, cluster(pods={N10: 27}), namespace="payments")
    assert d.node is None and d.verdict in (Verdict.ALLOW, Verdict.STEER)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("change", [
    "upsert_node", "remove_node", "set_node_held", "upsert_subnet", "remove_subnet", "upsert_pod", "remove_pod",
    "reserve", "reserve_on_node", "release", "reservation_expires", "cooldown_ends", "set_cni", "set_node_reserve",
])
def test_figures_kept_between_index_changes_are_never_stale(change: str) -> None:
    """Decisions reuse a zone's figures (and the nodes to steer around) until the index next changes: each kind of
    change moves the index's version (and, all but a reservation held against a zone, its node version, which
    the nodes to steer around are kept by), so the next decision is worked out afresh."""
    clock = _Clock()
    ix = CapacityIndex(clock=clock, reservation_ttl=30.0)
    for name, zone, itype, alloc in NODES:
        ix.upsert_node(name, zone=zone, instance_type=itype, pod_subnet=SUBNETS[zone], allocatable_pods=alloc)
    for zone, subnet in SUBNETS.items():
        ix.upsert_subnet(subnet, zone=zone, free_ips=40)
    for i in range(6):
        ix.upsert_pod(f"apps/p{i}", N10, PodUse.IP)
    ix.reserve("apps/r", A)
    pod = {"metadata": {"generateName": "web-", "namespace": "apps"}, "spec": {"containers": [{"name": "web"}]}}
    settings = Settings(zone_reserve=1)
    before = decide(pod, ix, settings, namespace="apps")
    changes: dict[str, Any] = {
        "upsert_node": lambda: ix.upsert_node(N10, zone=A, instance_type="m5.large", pod_subnet=SUBNETS[A],
                                              allocatable_pods=8),
        "remove_node": lambda: ix.remove_node(N11),
        "set_node_held": lambda: ix.set_node_held(N10, 6),
        "upsert_subnet": lambda: ix.upsert_subnet(SUBNETS[A], zone=A, free_ips=0),
        "remove_subnet": lambda: ix.remove_subnet(SUBNETS[A]),
        "upsert_pod": lambda: ix.upsert_pod("apps/new", N11, PodUse.IP),
        "remove_pod": lambda: ix.remove_pod("apps/p0"),
        "reserve": lambda: ix.reserve("apps/r2", A),
        "reserve_on_node": lambda: ix.reserve("apps/r3", A, N10),
        "release": lambda: ix.release("apps/r"),
        "reservation_expires": lambda: setattr(clock, "now", 31.0),
        "cooldown_ends": lambda: (ix.remove_pod("apps/p1"), decide(pod, ix, settings, namespace="apps"),
                                  setattr(clock, "now", 31.0)),
        "set_cni": lambda: ix.set_cni(CniSettings(warm_ip_target=1)),
        "set_node_reserve": lambda: ix.set_node_reserve(25),
    }
    changes[change]()
    kept = decide(pod, ix, settings, namespace="apps")
    ix._memo.clear()
    ix._node_memo.clear()
    fresh = decide(pod, ix, settings, namespace="apps")
    assert kept == fresh
    assert fresh.zones != before.zones or fresh.avoid_nodes != before.avoid_nodes  # the change did change figures


MEMO_STEPS = st.lists(st.tuples(
    st.sampled_from(["pod", "gone", "reserve", "reserve_on_node", "release", "held", "subnet", "tick"]),
    st.integers(0, 3), st.integers(0, 5)), min_size=1, max_size=30)


@hypothesis_settings(max_examples=300, deadline=None)
@given(steps=MEMO_STEPS, warm_ip_target=st.sampled_from([None, 2]))
# A reservation on a node whose last warm IP it takes, in an empty subnet: the nodes to avoid must change.
@example(steps=[("subnet", 0, 0), ("pod", 0, 1), ("reserve_on_node", 0, 0)], warm_ip_target=None)
def test_decisions_from_kept_figures_equal_decisions_worked_out_afresh(
    steps: list[tuple[str, int, int]], warm_ip_target: int | None
) -> None:
    """After any sequence of pod events, reservations (on a zone or a node), EC2 figures and time, the decision
    made with the figures the index keeps between changes equals the one made after dropping them all."""
    clock = _Clock()
    ix = CapacityIndex(cni=CniSettings(warm_ip_target=warm_ip_target), clock=clock, reservation_ttl=30.0)
    for name, zone, itype, alloc in NODES:
        ix.upsert_node(name, zone=zone, instance_type=itype, pod_subnet=SUBNETS[zone], allocatable_pods=alloc,
                       labels={"eks.amazonaws.com/nodegroup": "small" if alloc < 30 else "big"})
        ix.set_node_held(name, 2)  # EC2's figures first, then the subnets', as a refresh applies them
    for zone, subnet in SUBNETS.items():
        ix.upsert_subnet(subnet, zone=zone, free_ips=1)
    pod = {"metadata": {"generateName": "web-", "namespace": "apps"}, "spec": {"containers": [{"name": "web"}]}}
    group = {"metadata": {"generateName": "web-", "namespace": "apps"},
             "spec": {"containers": [{"name": "web"}], "nodeSelector": {"eks.amazonaws.com/nodegroup": "small"}}}
    rules = Settings(zone_reserve=1, max_steered_nodes=2)
    names = [n for n, _, _, _ in NODES]
    for i, (op, which, amount) in enumerate(steps):
        node, zone = names[which], NODES[which][1]
        if op == "pod":
            ix.upsert_pod(f"apps/p{amount}", node, PodUse.IP)
        elif op == "gone":
            ix.remove_pod(f"apps/p{amount}")
        elif op == "reserve":
            ix.reserve(f"apps/r{i}", zone)
        elif op == "reserve_on_node":
            ix.reserve(f"apps/r{i}", zone, node)
        elif op == "release":
            ix.release(f"apps/r{amount % max(i, 1)}")
        elif op == "held":
            ix.set_node_held(node, amount)
        elif op == "subnet":
            ix.upsert_subnet(SUBNETS[zone], zone=zone, free_ips=amount // 2)
        else:
            clock.now += 8 * amount
        kept = [decide(judged, ix, rules, namespace="apps") for judged in (pod, group)]
        ix._memo.clear()
        ix._node_memo.clear()
        assert kept == [decide(judged, ix, rules, namespace="apps") for judged in (pod, group)]


def _branch_pod_on(node: str) -> dict[str, Any]:
    """A security-groups-for-pods pod (it asks for a branch ENI) pinned to a node by spec.nodeName."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sg-0", "namespace": "apps"},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "nginx", "resources": {
                "requests": {"vpc.amazonaws.com/pod-eni": "1"}, "limits": {"vpc.amazonaws.com/pod-eni": "1"}}}]}}


def test_a_branch_pod_pinned_to_a_node_of_unknown_type_is_not_denied() -> None:
    """No limits for the instance type: its branch ENI room is unknown, not 0 (an IP pod there is judged on its
    allocatable pods). A known type with room is allowed as before."""
    for instance_type in ("m5.large", "m9z.large"):
        index = CapacityIndex(cni=CniSettings(pod_eni=True))
        index.upsert_node("n1", zone="a", instance_type=instance_type, pod_subnet="s-a", allocatable_pods=29)
        index.upsert_subnet("s-a", zone="a", free_ips=200)
        assert decide(_branch_pod_on("n1"), index, Settings()).verdict is Verdict.ALLOW, instance_type


def test_a_branch_pod_pinned_to_a_node_whose_branch_eni_is_cooling_is_not_denied() -> None:
    """An m5.large takes 9 branch ENIs; one was just deleted and sits in the resource controller's cooldown,
    which frees its slot within a minute: like a warm IP in its cooldown, no ground for a denial. With all 9
    in use and none cooling, the pinned pod is denied."""
    index = CapacityIndex(cni=CniSettings(pod_eni=True))
    index.upsert_node("n1", zone="a", instance_type="m5.large", pod_subnet="s-a", allocatable_pods=29)
    index.upsert_subnet("s-a", zone="a", free_ips=100)
    for i in range(9):
        index.upsert_pod(f"apps/sg-{i + 1}", "n1", PodUse.BRANCH)
    assert index.nodes["n1"].branch_room == 0
    assert decide(_branch_pod_on("n1"), index, Settings()).verdict is Verdict.DENY
    index.remove_pod("apps/sg-1")
    assert index.nodes["n1"].branch_cooling == 1 and index.nodes["n1"].branch_room == 0
    assert decide(_branch_pod_on("n1"), index, Settings()).verdict is Verdict.ALLOW


def test_a_warm_ip_ec2_shows_is_not_taken_back_by_a_subnet_count_that_lags() -> None:
    """Zone a's subnet had no free address at its last count; EC2 now shows a node holding one more IP than its
    pods use (its subnet's count is refreshed less often than the nodes' ENIs, and an address was freed and
    drawn in between). The draw makes the subnet's supply negative, which takes back predicted warm IPs only:
    the one EC2 shows is there, the zone has room for one pod, and a pod confined to it is admitted, not
    denied. A node whose warm pool is only predicted (no EC2 figure yet), grown past what the subnet had, still
    has it taken back."""
    def cluster(ec2_figure: bool) -> CapacityIndex:
        index = CapacityIndex(cni=CniSettings(warm_ip_target=1))
        index.upsert_node("n1", zone="a", instance_type="m5.large", pod_subnet="s-a", allocatable_pods=29)
        for i in range(5):
            index.upsert_pod(f"apps/p{i}", "n1", PodUse.IP)
        if ec2_figure:
            index.set_node_held("n1", 5)
        index.upsert_subnet("s-a", zone="a", free_ips=0)
        if ec2_figure:
            index.set_node_held("n1", 6)  # one more IP since the subnet's count
        else:
            index.upsert_pod("apps/p5", "n1", PodUse.IP)  # ipamd would top the pool up: from nothing
        return index

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0", "namespace": "apps"},
           "spec": {"nodeSelector": {"topology.kubernetes.io/zone": "a"},
                    "containers": [{"name": "app", "image": "nginx"}]}}
    shown = cluster(ec2_figure=True)
    assert shown.nodes["n1"].warm == 1 and shown.subnets["s-a"].supply == -1
    assert shown.zone_headroom("a") == 1
    assert decide(pod, shown, Settings()).verdict is Verdict.ALLOW
    predicted = cluster(ec2_figure=False)
    assert predicted.nodes["n1"].warm == 1 and predicted.nodes["n1"].ec2_held is None
    assert predicted.subnets["s-a"].supply == -1 and predicted.zone_headroom("a") == 0
    assert decide(pod, predicted, Settings()).verdict is Verdict.DENY


@pytest.mark.parametrize("free", [1, 12, 15, 16])
def test_under_prefix_delegation_a_branch_pod_needs_one_address_not_a_whole_prefix(free: int) -> None:
    """A branch ENI takes one address from the subnet, prefix delegation or not: a zone whose subnet has fewer
    than 16 free addresses (no whole /28) still has room for branch pods, as the pinned path already said."""
    index = CapacityIndex(cni=CniSettings(prefix_delegation=True, pod_eni=True, warm_prefix_target=1))
    index.upsert_node("n1", zone="a", instance_type="m5.large", pod_subnet="s-a", allocatable_pods=110)
    for i in range(5):
        index.upsert_pod(f"apps/p{i}", "n1", PodUse.IP)
    index.upsert_subnet("s-a", zone="a", free_ips=free, free_blocks=free // 16)
    pod = _branch_pod_on("n1")
    del pod["spec"]["nodeName"]
    decision = decide(pod, index, Settings())
    assert decision.verdict is Verdict.ALLOW, decision.reason
    assert decision.zones[0].subnet_free == free and decision.zones[0].headroom == min(free, 9)
