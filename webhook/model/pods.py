"""Reading a Pod (a plain dict, as an AdmissionReview or a watch event carries it): what it takes and where
it may run. Works on the JSON shape, so the same code serves the webhook and the watches."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from webhook.model.index import HOSTNAME_LABEL as HOSTNAME_LABEL
from webhook.model.index import PodUse

ZONE_LABEL = "topology.kubernetes.io/zone"
LEGACY_ZONE_LABEL = "failure-domain.beta.kubernetes.io/zone"
ZONE_KEYS = (ZONE_LABEL, LEGACY_ZONE_LABEL)
OS_LABEL = "kubernetes.io/os"
POD_ENI_RESOURCE = "vpc.amazonaws.com/pod-eni"
FARGATE_PROFILE_LABEL = "eks.amazonaws.com/fargate-profile"
FARGATE_SCHEDULER = "fargate-scheduler"
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
STEERED_ANNOTATION = "ipguard.io/steered"  # what ipguard's steering added to a pod, and why (JSON)

Pod = Mapping[str, Any]


_EMPTY: Mapping[str, Any] = {}


def _map(value: Any) -> Mapping[str, Any]:
    # `type(...) is dict` first: this runs on every admission request, and the ABC check is slow.
    if type(value) is dict:
        return value
    return value if value is not None and isinstance(value, Mapping) else _EMPTY


def _list(value: Any) -> list[Any]:
    return value if type(value) is list else []


def metadata(pod: Pod) -> Mapping[str, Any]:
    return _map(pod.get("metadata"))


def spec(pod: Pod) -> Mapping[str, Any]:
    return _map(pod.get("spec"))


def display_name(pod: Pod, namespace: str | None = None) -> str:
    """namespace/name, or namespace/generateName* when the mutating stage has no name yet."""
    meta = metadata(pod)
    ns = namespace or _str(meta.get("namespace")) or "default"
    name = _str(meta.get("name")) or _str(meta.get("generateName")) + "*"
    return f"{ns}/{name}"


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def is_mirror(pod: Pod) -> bool:
    return MIRROR_ANNOTATION in _map(metadata(pod).get("annotations"))


def is_host_network(pod: Pod) -> bool:
    return spec(pod).get("hostNetwork") is True


SYSTEM_PRIORITY = 1_000_000_000  # PriorityClasses above this are the system's (system-node-critical, ...)


def preempting_priority(pod: Pod) -> int | None:
    """The pod's priority when it is a system-critical one the scheduler preempts for: above every user-defined
    PriorityClass (a globalDefault among them gives every pod the same, and preempts nothing), set by the Priority
    admission plugin before webhooks run, and its preemptionPolicy not Never."""
    pod_spec = spec(pod)
    priority = pod_spec.get("priority")
    if not isinstance(priority, int) or isinstance(priority, bool) or priority <= SYSTEM_PRIORITY:
        return None
    return None if pod_spec.get("preemptionPolicy") == "Never" else priority


def is_fargate(pod: Pod) -> bool:
    labels = _map(metadata(pod).get("labels"))
    return FARGATE_PROFILE_LABEL in labels or spec(pod).get("schedulerName") == FARGATE_SCHEDULER


def is_terminal(pod: Pod) -> bool:
    return _map(pod.get("status")).get("phase") in TERMINAL_PHASES


def targets_windows(pod: Pod) -> bool:
    """Selected onto Windows nodes: by its node selector, or by every required node-affinity term
    (`kubernetes.io/os In [windows]`). Windows nodes have their own IPAM (the VPC resource controller's
    `vpc.amazonaws.com/PrivateIPv4Address`), not ipamd's warm pools."""
    if _map(spec(pod).get("nodeSelector")).get(OS_LABEL) == "windows":
        return True
    affinity = _map(_map(spec(pod).get("affinity")).get("nodeAffinity"))
    terms = _list(_map(affinity.get("requiredDuringSchedulingIgnoredDuringExecution")).get("nodeSelectorTerms"))
    return bool(terms) and all(_selects_windows(_map(term)) for term in terms)


def _selects_windows(term: Mapping[str, Any]) -> bool:
    for expression in _list(term.get("matchExpressions")):
        expr = _map(expression)
        values = _list(expr.get("values"))
        if expr.get("key") == OS_LABEL and expr.get("operator") == "In" and values and all(
                v == "windows" for v in values):
            return True
    return False


def wants_branch_eni(pod: Pod) -> bool:
    """Security groups for pods: the VPC resource controller injects a pod-eni request into the pod."""
    pod_spec = spec(pod)
    for container in _list(pod_spec.get("containers")) + _list(pod_spec.get("initContainers")):
        resources = _map(_map(container).get("resources"))
        if POD_ENI_RESOURCE in _map(resources.get("requests")) or POD_ENI_RESOURCE in _map(
            resources.get("limits")
        ):
            return True
    return False


def pod_use(pod: Pod) -> PodUse:
    """What the pod takes from its node once it runs (terminal pods take nothing: check is_terminal first)."""
    if is_host_network(pod) or is_fargate(pod) or targets_windows(pod):
        return PodUse.NONE
    if wants_branch_eni(pod):
        return PodUse.BRANCH
    return PodUse.IP


def node_name(pod: Pod) -> str | None:
    name = spec(pod).get("nodeName")
    return name if isinstance(name, str) and name else None


# Node-selection keys whose every value the index can vouch for in any zone it would steer a pod to.
ZONE_NEUTRAL_KEYS = frozenset({*ZONE_KEYS, OS_LABEL})


def steer_softly(pod: Pod) -> bool:
    """Whether avoiding a zone must stay a preference: the pod may be unable to run anywhere else. A zonal
    volume (a PersistentVolumeClaim, or an ephemeral one) binds it to its zone; a node selector or required
    affinity on other labels (a GPU pool, a node group, an architecture) may match nodes in the avoided zone
    only; required pod affinity by zone ties it to its peers' zone."""
    pod_spec = spec(pod)
    for volume in _list(pod_spec.get("volumes")):
        volume = _map(volume)
        if "persistentVolumeClaim" in volume or "ephemeral" in volume:
            return True
    if any(key not in ZONE_NEUTRAL_KEYS for key in _map(pod_spec.get("nodeSelector"))):
        return True
    # Required pod affinity by zone: the zone of its peers, which ipguard cannot move.
    pod_affinity = _map(_map(pod_spec.get("affinity")).get("podAffinity"))
    for term in _list(pod_affinity.get("requiredDuringSchedulingIgnoredDuringExecution")):
        if _map(term).get("topologyKey") in ZONE_KEYS:
            return True
    affinity = _map(_map(pod_spec.get("affinity")).get("nodeAffinity"))
    for term in _list(_map(affinity.get("requiredDuringSchedulingIgnoredDuringExecution")).get("nodeSelectorTerms")):
        term = _map(term)
        if _list(term.get("matchFields")):
            return True
        if any(_map(e).get("key") not in ZONE_NEUTRAL_KEYS for e in _list(term.get("matchExpressions"))):
            return True
    return False


def pinned_nodes(pod: Pod) -> list[str]:
    """Nodes a pod is pinned to by name: through its required affinity (how DaemonSet pods are placed:
    `matchFields: metadata.name In [node]`), or by the `kubernetes.io/hostname` label (in its node selector, or
    `In` in every required term), which on EKS is the node's name. Empty when the pod is free of that."""
    selector = _map(spec(pod).get("nodeSelector")).get(HOSTNAME_LABEL)
    by_selector = [selector] if isinstance(selector, str) and selector else []
    affinity = _map(_map(spec(pod).get("affinity")).get("nodeAffinity"))
    terms = _list(_map(affinity.get("requiredDuringSchedulingIgnoredDuringExecution")).get("nodeSelectorTerms"))
    names: list[str] = []
    for term in terms:
        term = _map(term)
        if empty_term(term):
            continue  # matches no node: pins the pod nowhere, and lets no other node in
        fields = [
            _map(f) for f in _list(term.get("matchFields"))
            if _map(f).get("key") == "metadata.name" and _map(f).get("operator") == "In"
        ] + [
            _map(e) for e in _list(term.get("matchExpressions"))
            if _map(e).get("key") == HOSTNAME_LABEL and _map(e).get("operator") == "In"
        ]
        if not fields:
            return by_selector
        allowed = [v for v in _list(fields[0].get("values")) if isinstance(v, str)]
        for extra in fields[1:]:  # several in one term are ANDed
            allowed = [v for v in allowed if v in _list(extra.get("values"))]
        names.extend(v for v in allowed if v not in names and (not by_selector or v in by_selector))
    return names if terms else by_selector


# One required node-selection term: (key, operator, values) requirements, ANDed. A matchFields requirement has
# its field behind FIELD_KEY_PREFIX (a ':' no label key may carry).
NodeRequirement = tuple[str, str, tuple[str, ...]]
NodeTerm = tuple[NodeRequirement, ...]
FIELD_KEY_PREFIX = "field:"
NODE_NAME_FIELD = FIELD_KEY_PREFIX + "metadata.name"


def empty_term(term: Mapping[str, Any]) -> bool:
    """A node selector term with no requirement at all. The API's rule: it matches no node (an empty
    `matchExpressions` list is dropped on the wire, so such a term arrives as `{}`)."""
    return not _list(term.get("matchExpressions")) and not _list(term.get("matchFields"))


def node_terms(pod: Pod) -> tuple[NodeTerm, ...]:
    """The pod's required node selection as ORed terms: its nodeSelector ANDed into each required node-affinity
    term (the scheduler's rule). Empty when the pod selects no nodes at all (the common case: O(1))."""
    pod_spec = spec(pod)
    selector = _map(pod_spec.get("nodeSelector"))
    base: list[NodeRequirement] = [(str(k), "In", (v,)) for k, v in selector.items() if isinstance(v, str)]
    affinity = _map(_map(pod_spec.get("affinity")).get("nodeAffinity"))
    terms = _list(_map(affinity.get("requiredDuringSchedulingIgnoredDuringExecution")).get("nodeSelectorTerms"))
    if not terms:
        return (tuple(base),) if base else ()
    out: list[NodeTerm] = []
    for term in terms:
        term = _map(term)
        if empty_term(term):
            continue  # matches no node, the nodeSelector notwithstanding
        requirements = list(base)
        for prefix, entries in (("", term.get("matchExpressions")), (FIELD_KEY_PREFIX, term.get("matchFields"))):
            for entry in _list(entries):
                entry = _map(entry)
                values = tuple(v for v in _list(entry.get("values")) if isinstance(v, str))
                requirements.append((prefix + _str(entry.get("key")), _str(entry.get("operator")), values))
        out.append(tuple(requirements))
    return tuple(out)


def allowed_zones(pod: Pod, zones: Iterable[str]) -> list[str]:
    """The zones the scheduler may place the pod in, from its nodeSelector and required node affinity.

    Terms are ORed, expressions within a term ANDed; only zone keys narrow the set. Other keys narrow the
    nodes, not the zones, so ignoring them can only leave more zones allowed (never a false denial).
    """
    allowed = set(zones)
    selector = _map(spec(pod).get("nodeSelector"))
    for key in ZONE_KEYS:
        if key in selector:
            value = selector[key]
            allowed &= {value} if isinstance(value, str) else set()
    affinity = _map(_map(spec(pod).get("affinity")).get("nodeAffinity"))
    required = _map(affinity.get("requiredDuringSchedulingIgnoredDuringExecution"))
    terms = _list(required.get("nodeSelectorTerms"))
    if terms:
        union: set[str] = set()
        for term in terms:
            union |= _term_zones(_map(term), allowed)
        allowed = union
    return sorted(allowed)


def _term_zones(term: Mapping[str, Any], zones: set[str]) -> set[str]:
    if empty_term(term):
        return set()
    result = set(zones)
    for expression in _list(term.get("matchExpressions")):
        expr = _map(expression)
        if expr.get("key") not in ZONE_KEYS:
            continue
        operator = expr.get("operator")
        values = {v for v in _list(expr.get("values")) if isinstance(v, str)}
        if operator == "In":
            result &= values
        elif operator == "NotIn":
            result -= values
        elif operator == "DoesNotExist":
            result = set()
        # Exists, Gt, Lt: every zone label exists on every zoned node; Gt/Lt make no sense for zones.
    return result


RECORD_MAX = 64 * 1024  # far above any record ipguard writes (zones and at most a few dozen node names)


def read_record(pod: Pod) -> dict[str, Any] | None:
    """ipguard's record of the steering it added to this pod, if any. A malformed one is ignored, and so is one
    that is not ipguard's to have written: too long, or nested past the parser's depth (anyone may annotate)."""
    text = _map(metadata(pod).get("annotations")).get(STEERED_ANNOTATION)
    if not isinstance(text, str) or len(text) > RECORD_MAX:
        return None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def steered_zone(pod: Pod) -> str | None:
    """The zone a pod ipguard steered is headed for: the first zone its steering record prefers."""
    record = read_record(pod)
    prefer = record.get("preferZones") if record else None
    if isinstance(prefer, list) and prefer and isinstance(prefer[0], list) and prefer[0]:
        return str(prefer[0][0])
    return None
