"""The steering patch: node affinity merged into a pod, as JSON Patch operations.

The patch is computed as "the pod without ipguard's previous steering, plus this steering", then expressed
as the operations that turn the pod as it is into that. So a second call on an already-steered pod
(reinvocation, DESIGN.md "Wire contract") yields no operations, and a changed decision replaces the old
steering instead of piling on top of it. What ipguard added is recorded in its annotation, which is how it
recognises its own expressions next time; everything else in the pod's affinity is the user's and is kept.

Parents are created explicitly: an `add` under a missing parent fails the whole create (HTTP 500).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from webhook.model.pods import HOSTNAME_LABEL, STEERED_ANNOTATION, ZONE_LABEL, empty_term, read_record

REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"
PREFERRED = "preferredDuringSchedulingIgnoredDuringExecution"

JsonPatch = list[dict[str, Any]]


def _clone(value: Any) -> Any:
    """A deep copy of JSON data (several times faster than copy.deepcopy, and this runs per request)."""
    return orjson.loads(orjson.dumps(value))


@dataclass(frozen=True, slots=True)
class Steering:
    avoid_zones: tuple[str, ...] = ()
    avoid_nodes: tuple[str, ...] = ()
    prefer_zones: tuple[tuple[str, int], ...] = ()
    reason: str = ""
    only_nodes: tuple[str, ...] = ()  # keep to these nodes (when the ones to avoid are too many to list)
    # Soft: the avoidance goes in as a strong preference, not a requirement, for pods that may have nowhere
    # else to go (zonal volumes, node selectors ipguard cannot check): better a pod placed than one Pending.
    soft: bool = False

    @property
    def empty(self) -> bool:
        return not (self.avoid_zones or self.avoid_nodes or self.prefer_zones or self.only_nodes)


def _pointer(*parts: str) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def _expressions(steering: Steering) -> list[dict[str, Any]]:
    exprs: list[dict[str, Any]] = []
    if steering.avoid_zones:
        exprs.append({"key": ZONE_LABEL, "operator": "NotIn", "values": sorted(steering.avoid_zones)})
    if steering.avoid_nodes:
        exprs.append({"key": HOSTNAME_LABEL, "operator": "NotIn", "values": sorted(steering.avoid_nodes)})
    if steering.only_nodes:
        exprs.append({"key": HOSTNAME_LABEL, "operator": "In", "values": sorted(steering.only_nodes)})
    return exprs


SOFT_WEIGHT = 100  # the most a preference can weigh


def _preferences(steering: Steering) -> list[dict[str, Any]]:
    prefs = [
        {
            "weight": weight,
            "preference": {"matchExpressions": [{"key": ZONE_LABEL, "operator": "In", "values": [zone]}]},
        }
        for zone, weight in steering.prefer_zones
    ]
    exprs = _expressions(steering)
    if steering.soft and exprs:
        prefs.insert(0, {"weight": SOFT_WEIGHT, "preference": {"matchExpressions": exprs}})
    return prefs


def _record(steering: Steering, created_required: bool, kept: list[list[Any]]) -> dict[str, Any]:
    record = {
        "avoidZones": sorted(steering.avoid_zones),
        "avoidNodes": sorted(steering.avoid_nodes),
        "preferZones": [[zone, weight] for zone, weight in steering.prefer_zones],
        "createdRequired": created_required,
        "reason": steering.reason,
    }
    if steering.soft:
        record["soft"] = True
    if steering.only_nodes:
        record["onlyNodes"] = sorted(steering.only_nodes)
    if kept:
        # [term index, key] of expressions ipguard wanted but the term already had: those are the user's.
        record["kept"] = kept
    return record


def _kept(record: dict[str, Any]) -> set[tuple[int, str]]:
    kept = record.get("kept")
    if not isinstance(kept, list):
        return set()
    return {
        (item[0], item[1])
        for item in kept
        if isinstance(item, list) and len(item) == 2 and isinstance(item[0], int) and isinstance(item[1], str)
    }


def _remove_last(items: list[Any], item: Any) -> bool:
    for i in range(len(items) - 1, -1, -1):
        if items[i] == item:
            del items[i]
            return True
    return False


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _recorded_steering(record: dict[str, Any]) -> Steering:
    """The steering a record describes; entries of the wrong shape (a hand-edited annotation) are skipped."""
    prefs = record.get("preferZones")
    return Steering(
        avoid_zones=_strings(record.get("avoidZones")),
        avoid_nodes=_strings(record.get("avoidNodes")),
        prefer_zones=tuple(
            (p[0], p[1])
            for p in (prefs if isinstance(prefs, list) else ())
            if isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
            and isinstance(p[1], int) and not isinstance(p[1], bool)
        ),
        soft=record.get("soft") is True,
        only_nodes=_strings(record.get("onlyNodes")),
    )


def _strip(affinity: dict[str, Any], record: dict[str, Any]) -> None:
    """Take ipguard's previous additions (as recorded) out of a node affinity, in place."""
    previous = _recorded_steering(record)
    kept = _kept(record)
    required = affinity.get(REQUIRED)
    if isinstance(required, dict) and not previous.soft:
        terms = required.get("nodeSelectorTerms")
        if isinstance(terms, list):
            ours = _expressions(previous)
            for i, term in enumerate(terms):
                if isinstance(term, dict) and isinstance(term.get("matchExpressions"), list):
                    for expr in ours:
                        if (i, expr["key"]) not in kept:
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


def _apply(affinity: dict[str, Any], steering: Steering) -> tuple[bool, list[list[Any]]]:
    """Add this steering to a node affinity, in place. Returns whether ipguard created the required section,
    and the [term index, key] of expressions a term already had (not added again, so never duplicated)."""
    created = False
    kept: list[list[Any]] = []
    exprs = _expressions(steering)
    if exprs and not steering.soft:
        required = affinity.get(REQUIRED)
        terms = required.get("nodeSelectorTerms") if isinstance(required, dict) else None
        if not isinstance(terms, list) or not terms:
            terms = [{"matchExpressions": []}]
            affinity[REQUIRED] = {"nodeSelectorTerms": terms}
            created = True
        # Terms are ORed: the expressions must go into every one of them, or one term could bypass them.
        for i, term in enumerate(terms):
            if not isinstance(term, dict):
                continue  # not a term at all: the apiserver rejects such a pod whatever ipguard does
            if not created and empty_term(term):
                continue  # the pod's own term matches no node: an expression added would make it match most
            if term.get("matchExpressions") is None:
                term["matchExpressions"] = []
            current = term["matchExpressions"]
            if not isinstance(current, list):
                continue
            for expr in exprs:
                if expr in current:
                    kept.append([i, expr["key"]])
                else:
                    current.append(_clone(expr))
    prefs = _preferences(steering)
    if prefs:
        if not isinstance(affinity.get(PREFERRED), list):
            affinity[PREFERRED] = []
        affinity[PREFERRED].extend(prefs)
    return created, kept


def without_steering(pod: dict[str, Any]) -> dict[str, Any]:
    """The pod as it was before ipguard steered it (per its record); `pod` itself if it carries no record.

    A reinvoked mutating call must decide on this: judged as it stands, a steered pod already avoids the
    exhausted zones, looks fine, and would have its steering taken back.
    """
    record = read_record(pod)
    spec = pod.get("spec")
    affinity = spec.get("affinity") if isinstance(spec, dict) else None
    node_affinity = affinity.get("nodeAffinity") if isinstance(affinity, dict) else None
    if record is None or not isinstance(node_affinity, dict):
        return pod
    assert isinstance(spec, dict) and isinstance(affinity, dict)
    stripped = _clone(node_affinity)
    _strip(stripped, record)
    return {**pod, "spec": {**spec, "affinity": {**affinity, "nodeAffinity": stripped}}}


def steering_patch(pod: dict[str, Any], steering: Steering) -> JsonPatch:
    """JSON Patch operations that make `pod` carry exactly this steering (none if it already does)."""
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return []  # no pod spec to steer (the apiserver rejects such a pod anyway)
    affinity_in = spec.get("affinity")
    node_affinity_in = affinity_in.get("nodeAffinity") if isinstance(affinity_in, dict) else None
    current = node_affinity_in if isinstance(node_affinity_in, dict) else {}  # read only
    record = read_record(pod)

    desired = _clone(current)
    if record is not None:
        _strip(desired, record)
    created, kept = (False, []) if steering.empty else _apply(desired, steering)

    ops: JsonPatch = []
    if desired != current:
        if not isinstance(affinity_in, dict):
            ops.append({"op": "add", "path": "/spec/affinity", "value": {"nodeAffinity": desired}})
        elif not isinstance(node_affinity_in, dict):
            ops.append({"op": "add", "path": "/spec/affinity/nodeAffinity", "value": desired})
        elif not desired:
            # Nothing left of the node affinity (ipguard made it): take it away rather than leave `{}` behind.
            only = set(affinity_in) == {"nodeAffinity"}
            ops.append({"op": "remove", "path": "/spec/affinity" if only else "/spec/affinity/nodeAffinity"})
        else:
            for section in (REQUIRED, PREFERRED):
                path = _pointer("spec", "affinity", "nodeAffinity", section)
                if section in desired and section not in current:
                    ops.append({"op": "add", "path": path, "value": desired[section]})
                elif section in current and section not in desired:
                    ops.append({"op": "remove", "path": path})
                elif desired.get(section) != current.get(section):
                    ops.append({"op": "replace", "path": path, "value": desired[section]})
    ops.extend(_annotation_ops(pod, None if steering.empty else _record(steering, created, kept)))
    return ops


def _annotation_ops(pod: dict[str, Any], record: dict[str, Any] | None) -> JsonPatch:
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else None
    annotations = metadata.get("annotations") if metadata else None
    path = _pointer("metadata", "annotations", STEERED_ANNOTATION)
    current = annotations.get(STEERED_ANNOTATION) if isinstance(annotations, dict) else None
    if record is None:
        if current is None:
            return []
        assert isinstance(annotations, dict)
        # Leave no empty `annotations: {}` behind when ipguard's was the only one.
        return [{"op": "remove", "path": "/metadata/annotations" if len(annotations) == 1 else path}]
    text = json.dumps(record, separators=(",", ":"), sort_keys=True)
    if current == text:
        return []
    if metadata is None:
        return [{"op": "add", "path": "/metadata", "value": {"annotations": {STEERED_ANNOTATION: text}}}]
    if not isinstance(annotations, dict):
        return [{"op": "add", "path": "/metadata/annotations", "value": {STEERED_ANNOTATION: text}}]
    return [{"op": "add", "path": path, "value": text}]

