"""Pods whose node selection (nodeSelector, required node affinity) lists the only nodes they may run on: a node
group (eks.amazonaws.com/nodegroup), a node pool (karpenter.sh/nodepool), any label `In`. The scheduler, blind to
IPs, binds such a pod to one of those nodes; if none can give it an IP its sandbox fails
(FailedCreatePodSandBox), however much room other nodes in its zones have. ipguard judges it on those nodes as
it judges a pod pinned by spec.nodeName, but a node group can grow: it is denied only when no subnet of its
zones has addresses for a new node, and otherwise kept off the dry nodes to wait Pending for one.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_ipamd_edges import denial_text, judge, load, validate
from webhook.model.decide import Verdict
from webhook.model.index import CapacityIndex
from webhook.model.labels import Requirement
from webhook.model.limits import LimitsTable
from webhook.model.pods import node_terms
from webhook.sources.snapshot import parse_snapshot

A, B = "us-east-1a", "us-east-1b"
GROUP = "eks.amazonaws.com/nodegroup"
TABLE = LimitsTable()

# Zone a: two gpu nodes whose ENIs are full and whose subnet cannot fund a new ENI (1 + 5 at once), and a web
# node with warm IPs; zone b: a web node with warm IPs.
CLUSTER = """
settings: {mode: enforce}
subnets:
  - {id: subnet-a, zone: us-east-1a, free: 1}
  - {id: subnet-b, zone: us-east-1b, free: %d}
nodes:
  - {name: gpu-1, zone: us-east-1a, type: t3.medium, subnet: subnet-a, heldIPs: 10, enis: 2, pods: {ip: 10},
     labels: {eks.amazonaws.com/nodegroup: gpu}}
  - {name: gpu-2, zone: us-east-1a, type: t3.medium, subnet: subnet-a, heldIPs: 10, enis: 2, pods: {ip: 10},
     labels: {eks.amazonaws.com/nodegroup: gpu}}
  - {name: web-1, zone: us-east-1a, type: t3.medium, subnet: subnet-a, heldIPs: 10, enis: 2, pods: {ip: 4},
     labels: {eks.amazonaws.com/nodegroup: web}}
  - {name: web-2, zone: us-east-1b, type: t3.medium, subnet: subnet-b, heldIPs: 10, enis: 2, pods: {ip: 4},
     labels: {eks.amazonaws.com/nodegroup: web}}
"""


def pod(selector: dict[str, str] | None = None, terms: list[list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "nginx"}]}
    if selector:
        spec["nodeSelector"] = selector
    if terms is not None:
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": t} for t in terms]}}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "train-1", "namespace": "shop"}, "spec": spec}


def test_group_whose_nodes_are_all_dry_is_denied_when_no_subnet_has_room_for_a_new_node() -> None:
    """Both gpu nodes need a new ENI their subnet cannot fund (`tryAllocateENI` -> `createENI`: 1 + 5 addresses
    at once), and no subnet has addresses for a new node: the pod can get an IP nowhere it may run. Before, the
    web nodes' warm IPs admitted it into both zones (a missed denial)."""
    index, config = load(CLUSTER % 0)
    decision = judge(index, config, pod({GROUP: "gpu"}))
    assert decision.verdict is Verdict.DENY
    assert decision.selected_nodes == 2 and decision.selection == f"{GROUP}=gpu"
    text = denial_text(index, config, pod({GROUP: "gpu"}))
    assert f"may only run on the 2 node(s) its node selection allows ({GROUP}=gpu)" in text


def test_group_whose_nodes_are_all_dry_waits_for_a_new_node_when_a_subnet_has_room() -> None:
    """A new gpu node could come in zone b (its subnet has addresses): admitted, kept off the dry gpu nodes
    (kubernetes.io/hostname NotIn, or the scheduler binds it there and the sandbox fails) and warned."""
    index, config = load(CLUSTER % 100)
    decision = judge(index, config, pod({GROUP: "gpu"}))
    assert decision.verdict is Verdict.STEER and decision.waits_for_node
    assert decision.avoid_nodes == ("gpu-1", "gpu-2") and not decision.soft
    assert decision.reserve_zone == B
    answer = validate(index, config, pod({GROUP: "gpu"}))
    assert answer["allowed"] is True
    assert answer["warnings"] == [f"ipguard: no node matching {GROUP}=gpu can give it an IP; it waits Pending for a "
                                  "new node"]


def test_group_with_a_node_that_can_take_it_is_judged_by_its_zones() -> None:
    """One node of the selection with an IP is enough: the usual zone decision (no false denial)."""
    index, config = load(CLUSTER % 0)
    index.set_node_held("gpu-1", 11, enis=3)  # gpu-1 now has a warm IP
    decision = judge(index, config, pod({GROUP: "gpu"}))
    assert decision.verdict is not Verdict.DENY and decision.selection == ""
    assert "gpu-1" not in decision.avoid_nodes


def test_terms_are_ored_and_a_term_ipguard_cannot_list_leaves_the_zone_decision() -> None:
    """Required terms are ORed: `gpu` or `web` allows the web nodes too. A term without an `In` on a listing
    label (here NotIn only) allows nodes that cannot be listed: the zone decision, as before."""
    index, config = load(CLUSTER % 0)
    either = pod(terms=[[{"key": GROUP, "operator": "In", "values": ["gpu"]}],
                        [{"key": GROUP, "operator": "In", "values": ["web"]}]])
    decision = judge(index, config, either)
    assert decision.verdict is not Verdict.DENY and decision.selection == ""
    unlisted = pod(terms=[[{"key": GROUP, "operator": "In", "values": ["gpu"]}],
                          [{"key": GROUP, "operator": "NotIn", "values": ["gpu"]}]])
    assert judge(index, config, unlisted).selection == ""


def test_a_term_with_no_requirement_adds_no_node() -> None:
    """A node selector term with no requirement matches no node (the API's rule), not every node: `gpu` or an
    empty term is the gpu nodes alone, judged as such (denied here like the gpu-only pod). A pod whose terms
    are all empty can run nowhere: left to the scheduler, never denied by ipguard."""
    index, config = load(CLUSTER % 0)
    with_empty = pod(terms=[[{"key": GROUP, "operator": "In", "values": ["gpu"]}], []])
    assert node_terms(with_empty) == (((GROUP, "In", ("gpu",)),),)
    decision = judge(index, config, with_empty)
    assert decision.verdict is Verdict.DENY and decision.selection == f"{GROUP}=gpu"
    nowhere = pod({GROUP: "gpu"}, terms=[[]])
    assert node_terms(nowhere) == ()
    decision = judge(index, config, nowhere)
    assert decision.verdict is Verdict.ALLOW and "allow no zone" in decision.reason


def test_a_selection_no_node_matches_yet_is_left_to_the_autoscaler() -> None:
    """No node carries the label yet (a node pool scaling from zero): nothing to judge on, the zone decision."""
    index, config = load(CLUSTER % 100)
    decision = judge(index, config, pod({GROUP: "batch"}))
    assert decision.verdict is not Verdict.DENY and decision.selection == ""


def test_zone_and_os_selectors_stay_on_the_zone_path_in_constant_time() -> None:
    """Pods selecting by zone or OS only (or nothing) are never listed node by node."""
    index, config = load(CLUSTER % 100)
    assert node_terms(pod()) == ()
    decision = judge(index, config, pod({"topology.kubernetes.io/zone": A, "kubernetes.io/os": "linux"}))
    assert decision.selection == "" and decision.selected_nodes == 0


def test_relabelled_node_moves_between_selections() -> None:
    """The label index follows node upserts: web-2 relabelled into the gpu group (it has warm IPs) makes the gpu
    pod admissible; relabelled back, it is denied again."""
    index, config = load(CLUSTER % 0)
    web2 = index.nodes["web-2"]

    def relabel(group: str) -> None:
        index.upsert_node("web-2", zone=B, instance_type="t3.medium", pod_subnet="subnet-b", allocatable_pods=17,
                          labels={**web2.labels, GROUP: group})

    relabel("gpu")
    assert index.nodes_labelled(GROUP, "gpu") == {"gpu-1", "gpu-2", "web-2"}
    assert judge(index, config, pod({GROUP: "gpu"})).verdict is not Verdict.DENY
    relabel("web")
    assert index.nodes_labelled(GROUP, "gpu") == {"gpu-1", "gpu-2"}
    assert judge(index, config, pod({GROUP: "gpu"})).verdict is Verdict.DENY
    index.remove_node("gpu-1")
    assert index.nodes_labelled(GROUP, "gpu") == {"gpu-2"}


POOLS = ["a", "b", "c"]
ARCH = ["amd64", "arm64"]
node_labels = st.fixed_dictionaries({"pool": st.sampled_from(POOLS)}, optional={"arch": st.sampled_from(ARCH)})
requirement = st.one_of(
    st.tuples(st.just("arch"), st.sampled_from(["In", "NotIn"]), st.lists(st.sampled_from(ARCH), min_size=1,
                                                                           max_size=2, unique=True)),
    st.tuples(st.just("arch"), st.sampled_from(["Exists", "DoesNotExist"]), st.just([])),
)
term = st.tuples(st.lists(st.sampled_from(POOLS), min_size=1, max_size=2, unique=True),
                 st.lists(requirement, max_size=2))


@settings(max_examples=80, deadline=None)
@given(labels=st.lists(node_labels, min_size=1, max_size=8), terms=st.lists(term, min_size=1, max_size=3))
def test_the_listed_nodes_are_exactly_those_the_scheduler_would_match(labels: list[dict[str, str]],
                                                                       terms: list[Any]) -> None:
    """Against LabelSelector semantics over every node: the nodes a pod's terms allow (ORed terms, ANDed
    requirements), listed from the label index. With every node dry and no room for new nodes, the decision
    names exactly that many nodes (or, when none matches, leaves it to the zone decision)."""
    doc: dict[str, Any] = {
        "settings": {"mode": "enforce"},
        "subnets": [{"id": "subnet-a", "zone": A, "free": 0}],
        "nodes": [{"name": f"n{i}", "zone": A, "type": "t3.medium", "subnet": "subnet-a", "heldIPs": 10,
                   "enis": 2, "pods": {"ip": 10}, "labels": dict(node)} for i, node in enumerate(labels)],
    }
    snapshot = parse_snapshot(doc, "test", TABLE)
    index: CapacityIndex = snapshot.build_index()
    expressions = [
        [{"key": "pool", "operator": "In", "values": pools}]
        + [{"key": k, "operator": op, "values": vals} if vals else {"key": k, "operator": op} for k, op, vals in extra]
        for pools, extra in terms
    ]
    want = {
        f"n{i}" for i, node in enumerate(labels)
        if any(all(Requirement(e["key"], e["operator"], frozenset(e.get("values", []))).matches(node) for e in t)
               for t in expressions)
    }
    decision = judge(index, snapshot.settings, pod(terms=expressions))
    assert decision.verdict is Verdict.DENY
    if want:
        assert decision.selected_nodes == len(want)
    else:
        assert decision.selection == ""
    assert all(index.nodes[n].assigned == 10 and index.nodes[n].warm == 0 for n in index.nodes)


operation = st.one_of(
    st.tuples(st.just("upsert"), st.sampled_from(["n1", "n2", "n3"]), node_labels),
    st.tuples(st.just("unchanged"), st.sampled_from(["n1", "n2", "n3"]), st.just({})),
    st.tuples(st.just("remove"), st.sampled_from(["n1", "n2", "n3"]), st.just({})),
)


@settings(max_examples=100, deadline=None)
@given(operations=st.lists(operation, max_size=20))
def test_the_label_index_follows_every_node_upsert_and_removal(operations: list[Any]) -> None:
    """After any sequence of node upserts (labels changed, or left as they were: None) and removals, the label
    index lists exactly the known nodes carrying each label."""
    index = CapacityIndex(TABLE)
    labels: dict[str, dict[str, str]] = {}
    for op, name, new in operations:
        if op == "remove":
            index.remove_node(name)
            labels.pop(name, None)
            continue
        if op == "upsert":
            labels[name] = dict(new)
        else:
            labels.setdefault(name, {})
        index.upsert_node(name, zone=A, instance_type="t3.medium", pod_subnet="s", allocatable_pods=17,
                          labels=dict(new) if op == "upsert" else None)
    for key, values in (("pool", POOLS), ("arch", ARCH)):
        for value in values:
            assert index.nodes_labelled(key, value) == {n for n, got in labels.items() if got.get(key) == value}
