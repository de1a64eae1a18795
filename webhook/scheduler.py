"""A kube-scheduler stand-in for running admissions without a cluster (`ipguard demo`, `ipguard check`).

Enough of the scheduler for each admitted pod to land where the real one would likely put it, so that the
next pod sees what it took: the filters that matter for pod IPs (node selector and required node affinity,
pods per node, `vpc.amazonaws.com/pod-eni` for branch-ENI pods) and a score in the spirit of the default
profile (preferred node affinity and zone spreading weigh 2 each, the least allocated node 1). Node labels
the index does not keep (GPU pools, node groups, ...) are taken as matching: a stand-in that cannot tell
should place the pod, not leave it Pending.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from webhook.model.index import CapacityIndex, Node, PodUse
from webhook.model.pods import (
    HOSTNAME_LABEL,
    LEGACY_ZONE_LABEL,
    OS_LABEL,
    ZONE_LABEL,
    empty_term,
    node_name,
    pinned_nodes,
)

INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"


def node_labels(node: Node) -> dict[str, str]:
    """The labels of an EKS node that the index can vouch for (EKS: the hostname label is the node name)."""
    labels = {HOSTNAME_LABEL: node.name, OS_LABEL: "linux"}
    if node.zone is not None:
        labels[ZONE_LABEL] = labels[LEGACY_ZONE_LABEL] = node.zone
    if node.instance_type is not None:
        labels[INSTANCE_TYPE_LABEL] = node.instance_type
    return labels


def _matches(expr: Mapping[str, Any], labels: Mapping[str, str], lenient: bool = False) -> bool:
    key = expr.get("key", "")
    if lenient and key not in labels:
        return True
    value = labels.get(key)
    values = expr.get("values") or []
    operator = expr.get("operator")
    if operator == "In":
        return value in values
    if operator == "NotIn":
        return value not in values
    if operator == "Exists":
        return value is not None
    if operator == "DoesNotExist":
        return value is None
    return True


def node_fits(pod: Mapping[str, Any], labels: Mapping[str, str], *, lenient: bool = False) -> bool:
    """The scheduler's node-affinity filter: nodeSelector, then any required term (terms ORed). `lenient`:
    keys the labels do not carry are taken as matching (the caller does not know the node's other labels)."""
    spec = pod.get("spec", {})
    for key, value in (spec.get("nodeSelector") or {}).items():
        if labels.get(key) != value and not (lenient and key not in labels):
            return False
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms") or []
    return not terms or any(
        not empty_term(t) and all(_matches(e, labels, lenient) for e in t.get("matchExpressions") or [])
        for t in terms
    )


def preference_weight(pod: Mapping[str, Any], labels: Mapping[str, str]) -> int:
    """Sum of the weights of the pod's preferred node-affinity terms that the node matches."""
    affinity = ((pod.get("spec") or {}).get("affinity") or {}).get("nodeAffinity") or {}
    total = 0
    for term in affinity.get("preferredDuringSchedulingIgnoredDuringExecution") or []:
        exprs = (term.get("preference") or {}).get("matchExpressions") or []
        if exprs and all(_matches(e, labels) for e in exprs):
            total += int(term.get("weight") or 0)
    return total


def _has_room(node: Node, use: PodUse) -> bool:
    if use is PodUse.BRANCH:
        return node.branch_room > 0  # the scheduler sees vpc.amazonaws.com/pod-eni allocatable
    if node.allocatable_pods is not None:
        return node.allocatable_pods - node.pods - node.reserved > 0
    return node.room > 0


class Scheduler:
    """Binds admitted pods to nodes in the index, so later pods see the room earlier ones took."""

    def __init__(self, index: CapacityIndex, *, preferences: bool = True) -> None:
        self.index = index
        # Without preferences, pods spread evenly over the zones until a requirement keeps them out (the demo
        # uses this to show what happens at a zone's edge).
        self.preferences = preferences
        self.per_zone: Counter[str] = Counter()  # pods this stand-in placed, by zone (zone spreading)

    def candidates(self, pod: Mapping[str, Any], use: PodUse) -> list[Node]:
        pinned = node_name(pod)
        by_name = pinned_nodes(pod)
        names = [pinned] if pinned else by_name
        nodes = [self.index.nodes[n] for n in names if n in self.index.nodes] if names else self.index.nodes.values()
        return [
            node for node in nodes
            if node.known and node.schedulable and node.zone is not None
            and node_fits(pod, node_labels(node), lenient=True) and (pinned is not None or _has_room(node, use))
        ]

    def choose(self, pod: Mapping[str, Any], use: PodUse) -> Node | None:
        nodes = self.candidates(pod, use)
        if not nodes:
            return None
        weights = {n.name: preference_weight(pod, node_labels(n)) if self.preferences else 0 for n in nodes}
        top_weight = max(weights.values()) or 1
        counts = {n.zone: self.per_zone[n.zone or ""] for n in nodes}
        top_count = max(counts.values()) or 1
        top_room = max(n.room for n in nodes) or 1

        def score(node: Node) -> tuple[float, float, str]:
            affinity = 100 * weights[node.name] / top_weight
            spread = 100 * (top_count - counts[node.zone]) / top_count
            fit = 100 * node.room / top_room
            if not self.preferences:
                return (spread, fit, node.name)
            return (2 * affinity + 2 * spread + fit, 0.0, node.name)

        return max(nodes, key=score)

    def bind(self, pod: Mapping[str, Any], key: str, use: PodUse = PodUse.IP) -> str | None:
        """Place the pod (the node name), or None: no node fits and it stays Pending."""
        best = self.choose(pod, use)
        if best is None:
            return None
        self.index.upsert_pod(key, best.name, use)
        self.per_zone[best.zone or ""] += 1
        return best.name
