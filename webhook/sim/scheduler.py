"""A kube-scheduler stand-in that, like the real one, does not look at IP addresses.

Filters (a node must pass all): node selector, required node affinity (label expressions and metadata.name
fields, terms ORed), NoSchedule/NoExecute taints the pod does not tolerate, allocatable pods, and the extended
resource `vpc.amazonaws.com/pod-eni` (branch ENIs for security groups for pods). Scores, weighted as the default
profile weighs its plugins: least allocated (pods) x1, zone spreading of the pod's app x2, preferred node affinity
x2 (normalised to 0-100 over the feasible nodes), so that ipguard's soft steering has an effect.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

POD_ENI = "vpc.amazonaws.com/pod-eni"
UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"


@dataclass(slots=True)
class NodeView:
    """What the scheduler sees of a node."""

    name: str
    zone: str
    labels: dict[str, str]
    taints: list[dict[str, str]]
    allocatable_pods: int
    pod_eni: int  # allocatable vpc.amazonaws.com/pod-eni
    pods: int = 0
    pod_eni_used: int = 0
    ready: bool = True
    apps: dict[str, int] = field(default_factory=dict)  # app label -> pods of it here


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def wants_pod_eni(pod: Mapping[str, Any]) -> bool:
    for container in _list(_map(pod.get("spec")).get("containers")):
        resources = _map(_map(container).get("resources"))
        if POD_ENI in _map(resources.get("requests")) or POD_ENI in _map(resources.get("limits")):
            return True
    return False


def _expression_matches(expression: Mapping[str, Any], value: str | None) -> bool:
    operator = expression.get("operator")
    values = [str(v) for v in _list(expression.get("values"))]
    if operator == "In":
        return value is not None and value in values
    if operator == "NotIn":
        return value is None or value not in values
    if operator == "Exists":
        return value is not None
    if operator == "DoesNotExist":
        return value is None
    if operator in ("Gt", "Lt") and value is not None and values:
        try:
            number, bound = int(value), int(values[0])
        except ValueError:
            return False
        return number > bound if operator == "Gt" else number < bound
    return False


def term_matches(term: Mapping[str, Any], node: NodeView) -> bool:
    """A node selector term: every expression and field matches (an empty term matches nothing)."""
    expressions = _list(term.get("matchExpressions"))
    fields = _list(term.get("matchFields"))
    if not expressions and not fields:
        return False
    for expression in expressions:
        key = str(_map(expression).get("key"))
        if not _expression_matches(_map(expression), node.labels.get(key)):
            return False
    for expression in fields:
        if _map(expression).get("key") == "metadata.name" and not _expression_matches(_map(expression), node.name):
            return False
    return True


def affinity_matches(pod: Mapping[str, Any], node: NodeView) -> bool:
    """NodeAffinity filter: the node selector, then any one required term."""
    spec = _map(pod.get("spec"))
    for key, value in _map(spec.get("nodeSelector")).items():
        if node.labels.get(key) != value:
            return False
    required = _map(_map(_map(spec.get("affinity")).get("nodeAffinity")).get(
        "requiredDuringSchedulingIgnoredDuringExecution"))
    terms = _list(required.get("nodeSelectorTerms"))
    return not terms or any(term_matches(_map(t), node) for t in terms)


def tolerates(pod: Mapping[str, Any], taints: Iterable[Mapping[str, str]]) -> bool:
    """TaintToleration filter: every NoSchedule/NoExecute taint tolerated."""
    tolerations = [_map(t) for t in _list(_map(pod.get("spec")).get("tolerations"))]
    for taint in taints:
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if not any(_tolerated(t, taint) for t in tolerations):
            return False
    return True


def _tolerated(toleration: Mapping[str, Any], taint: Mapping[str, str]) -> bool:
    if toleration.get("effect") and toleration.get("effect") != taint.get("effect"):
        return False
    if toleration.get("operator") == "Exists":
        return not toleration.get("key") or toleration.get("key") == taint.get("key")
    return toleration.get("key") == taint.get("key") and toleration.get("value", "") == taint.get("value", "")


def fits(pod: Mapping[str, Any], node: NodeView, pod_eni: bool | None = None) -> bool:
    """Every filter: readiness, affinity, taints, allocatable pods and pod-eni."""
    if not node.ready or node.pods >= node.allocatable_pods:
        return False
    if (wants_pod_eni(pod) if pod_eni is None else pod_eni) and node.pod_eni_used >= node.pod_eni:
        return False
    return tolerates(pod, node.taints) and affinity_matches(pod, node)


def _preferred(pod: Mapping[str, Any]) -> list[tuple[int, Mapping[str, Any]]]:
    affinity = _map(_map(_map(pod.get("spec")).get("affinity")).get("nodeAffinity"))
    return [
        (int(_map(p).get("weight", 0)), _map(_map(p).get("preference")))
        for p in _list(affinity.get("preferredDuringSchedulingIgnoredDuringExecution"))
    ]


def app_of(pod: Mapping[str, Any]) -> str:
    labels = _map(_map(pod.get("metadata")).get("labels"))
    return str(labels.get("app", ""))


def pick_node(pod: Mapping[str, Any], nodes: Sequence[NodeView], pod_eni: bool | None = None) -> NodeView | None:
    """Filter, then score: the feasible node with the highest weighted score (ties by name)."""
    feasible = [n for n in nodes if fits(pod, n, pod_eni)]
    if not feasible:
        return None
    app = app_of(pod)
    zone_counts: dict[str, int] = {}
    for node in feasible:
        zone_counts.setdefault(node.zone, 0)
    for node in nodes:
        if node.zone in zone_counts:
            zone_counts[node.zone] += node.apps.get(app, 0)
    low, high = min(zone_counts.values()), max(zone_counts.values())
    preferred = _preferred(pod)
    raw_affinity = {n.name: sum(w for w, term in preferred if term_matches(term, n)) for n in feasible}
    top_affinity = max(raw_affinity.values(), default=0)

    def score(node: NodeView) -> tuple[float, str]:
        least = 100.0 * (node.allocatable_pods - node.pods) / max(node.allocatable_pods, 1)
        spread = 100.0 if high == low else 100.0 * (high - zone_counts[node.zone]) / (high - low)
        affinity = 100.0 * raw_affinity[node.name] / top_affinity if top_affinity > 0 else 0.0
        return least + 2 * spread + 2 * affinity, node.name

    return max(feasible, key=score)
