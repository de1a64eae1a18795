"""The steering patch: node affinity merged into a pod, as JSON Patch operations.

The patch is computed as "the pod without ipguard's previous steering, plus this steering", then expressed
as the operations that turn the pod as it is into that. So a second call on an already-steered pod
(reinvocation, DESIGN.md "Wire contract") yields no operations, and a changed decision replaces the old
steering instead of piling on top of it. What ipguard added is recorded in its annotation, which is how it
recognises its own expressions next time; everything else in the pod's affinity is the user's and is kept.

Parents are created explicitly: an `add` under a missing parent fails the whole create (HTTP 500).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from webhook.model.pods import HOSTNAME_LABEL, ZONE_LABEL

STEERED_ANNOTATION = "ipguard.io/steered"
REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"
PREFERRED = "preferredDuringSchedulingIgnoredDuringExecution"

JsonPatch = list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Steering:
    avoid_zones: tuple[str, ...] = ()
    avoid_nodes: tuple[str, ...] = ()
    prefer_zones: tuple[tuple[str, int], ...] = ()
    reason: str = ""

    @property
    def empty(self) -> bool:
        return not (self.avoid_zones or self.avoid_nodes or self.prefer_zones)


def _pointer(*parts: str) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def _expressions(steering: Steering) -> list[dict[str, Any]]:
    exprs: list[dict[str, Any]] = []
    if steering.avoid_zones:
        exprs.append({"key": ZONE_LABEL, "operator": "NotIn", "values": sorted(steering.avoid_zones)})
    if steering.avoid_nodes:
        exprs.append({"key": HOSTNAME_LABEL, "operator": "NotIn", "values": sorted(steering.avoid_nodes)})
    return exprs


def _preferences(steering: Steering) -> list[dict[str, Any]]:
    return [
        {
            "weight": weight,
            "preference": {"matchExpressions": [{"key": ZONE_LABEL, "operator": "In", "values": [zone]}]},
        }
        for zone, weight in steering.prefer_zones
    ]


def _record(steering: Steering, created_required: bool) -> dict[str, Any]:
    return {
        "avoidZones": sorted(steering.avoid_zones),
        "avoidNodes": sorted(steering.avoid_nodes),
        "preferZones": [[zone, weight] for zone, weight in steering.prefer_zones],
        "createdRequired": created_required,
        "reason": steering.reason,
    }


def read_record(pod: dict[str, Any]) -> dict[str, Any] | None:
    """ipguard's record of what it added to this pod before, if any (a malformed one is ignored)."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    text = annotations.get(STEERED_ANNOTATION) if isinstance(annotations, dict) else None
    if not isinstance(text, str):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _remove_last(items: list[Any], item: Any) -> bool:
    for i in range(len(items) - 1, -1, -1):
        if items[i] == item:
            del items[i]
            return True
    return False


def _strip(affinity: dict[str, Any], record: dict[str, Any]) -> None:
    """Take ipguard's previous additions (as recorded) out of a node affinity, in place."""
    previous = Steering(
        avoid_zones=tuple(str(z) for z in record.get("avoidZones") or ()),
        avoid_nodes=tuple(str(n) for n in record.get("avoidNodes") or ()),
        prefer_zones=tuple((str(p[0]), int(p[1])) for p in record.get("preferZones") or () if len(p) == 2),
    )
    required = affinity.get(REQUIRED)
    if isinstance(required, dict):
        terms = required.get("nodeSelectorTerms")
        if isinstance(terms, list):
            ours = _expressions(previous)
            for term in terms:
                if isinstance(term, dict) and isinstance(term.get("matchExpressions"), list):
                    for expr in ours:
                        _remove_last(term["matchExpressions"], expr)
                    if not term["matchExpressions"]:
                        del term["matchExpressions"]
            if record.get("createdRequired"):
                required["nodeSelectorTerms"] = [t for t in terms if t]
                if not required["nodeSelectorTerms"]:
                    del affinity[REQUIRED]
    preferred = affinity.get(PREFERRED)
    if isinstance(preferred, list):
        for term in _preferences(previous):
            _remove_last(preferred, term)
        if not preferred:
            del affinity[PREFERRED]


def _apply(affinity: dict[str, Any], steering: Steering) -> bool:
    """Add this steering to a node affinity, in place; True if ipguard created the required section."""
    created = False
    exprs = _expressions(steering)
    if exprs:
        required = affinity.get(REQUIRED)
        if not isinstance(required, dict) or not required.get("nodeSelectorTerms"):
            affinity[REQUIRED] = {"nodeSelectorTerms": [{"matchExpressions": []}]}
            created = True
        # Terms are ORed: the expressions must go into every one of them, or one term could bypass them.
        for term in affinity[REQUIRED]["nodeSelectorTerms"]:
            term.setdefault("matchExpressions", []).extend(copy.deepcopy(exprs))
    prefs = _preferences(steering)
    if prefs:
        affinity.setdefault(PREFERRED, []).extend(prefs)
    return created


def steering_patch(pod: dict[str, Any], steering: Steering) -> JsonPatch:
    """JSON Patch operations that make `pod` carry exactly this steering (none if it already does)."""
    spec = pod.get("spec") if isinstance(pod.get("spec"), dict) else {}
    assert isinstance(spec, dict)
    affinity_in = spec.get("affinity")
    node_affinity_in = affinity_in.get("nodeAffinity") if isinstance(affinity_in, dict) else None
    current = copy.deepcopy(node_affinity_in) if isinstance(node_affinity_in, dict) else {}
    record = read_record(pod)

    desired = copy.deepcopy(current)
    if record is not None:
        _strip(desired, record)
    created = False if steering.empty else _apply(desired, steering)

    ops: JsonPatch = []
    if desired != current:
        if not isinstance(affinity_in, dict):
            ops.append({"op": "add", "path": "/spec/affinity", "value": {"nodeAffinity": desired}})
        elif not isinstance(node_affinity_in, dict):
            ops.append({"op": "add", "path": "/spec/affinity/nodeAffinity", "value": desired})
        else:
            for section in (REQUIRED, PREFERRED):
                path = _pointer("spec", "affinity", "nodeAffinity", section)
                if section in desired and section not in current:
                    ops.append({"op": "add", "path": path, "value": desired[section]})
                elif section in current and section not in desired:
                    ops.append({"op": "remove", "path": path})
                elif desired.get(section) != current.get(section):
                    ops.append({"op": "replace", "path": path, "value": desired[section]})
    ops.extend(_annotation_ops(pod, None if steering.empty else _record(steering, created)))
    return ops


def _annotation_ops(pod: dict[str, Any], record: dict[str, Any] | None) -> JsonPatch:
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else None
    annotations = metadata.get("annotations") if metadata else None
    path = _pointer("metadata", "annotations", STEERED_ANNOTATION)
    current = annotations.get(STEERED_ANNOTATION) if isinstance(annotations, dict) else None
    if record is None:
        return [{"op": "remove", "path": path}] if current is not None else []
    text = json.dumps(record, separators=(",", ":"), sort_keys=True)
    if current == text:
        return []
    if metadata is None:
        return [{"op": "add", "path": "/metadata", "value": {"annotations": {STEERED_ANNOTATION: text}}}]
    if not isinstance(annotations, dict):
        return [{"op": "add", "path": "/metadata/annotations", "value": {STEERED_ANNOTATION: text}}]
    return [{"op": "add", "path": path, "value": text}]

