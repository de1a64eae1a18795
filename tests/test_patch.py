"""The steering patch applied for real (python `jsonpatch`, RFC 6902) to real pod specs.

Pods: the `request.object` of every pod AdmissionReview a real kube-apiserver sent
(tests/fixtures/apiserver), and hypothesis-built pods with every shape of node affinity a user can
write. Properties: the result is a valid Pod (Kubernetes OpenAPI schema, strict, plus the apiserver's own
checks on node affinity that the schema does not carry), the patch is idempotent (reinvocation), the user's
own affinity is kept, every ORed term carries ipguard's exclusions, un-steering restores the pod, a new
steering replaces the old one, and no `add` ever targets a missing parent.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_server_e2e import FIXTURES, NODE_NAMES, A, B, C, fixture_cluster
from webhook.admission.handler import AdmissionState, handle
from webhook.admission.patch import PREFERRED, REQUIRED, Steering, steering_patch, without_steering
from webhook.admission.wire import parse_review
from webhook.model.config import Settings
from webhook.model.pods import (
    HOSTNAME_LABEL,
    LEGACY_ZONE_LABEL,
    STEERED_ANNOTATION,
    ZONE_LABEL,
    empty_term,
    read_record,
)

K8S_VERSION = "1.36"  # the fixtures were captured from kube-apiserver v1.36.2
ZONES = (A, B, C, "us-east-1d")
QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                            r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


# ---- helpers ------------------------------------------------------------------------------------------------


def pod_fixtures() -> dict[str, dict[str, Any]]:
    """Every Pod a real apiserver sent to a webhook (mutating and validating stages)."""
    pods: dict[str, dict[str, Any]] = {}
    for path in sorted(FIXTURES.glob("*.json")):
        if path.name.endswith(".meta.json"):
            continue
        document = json.loads(path.read_text(encoding="utf-8"))
        request = document.get("request") if isinstance(document, dict) else None
        if isinstance(request, dict) and request["kind"]["kind"] == "Pod":
            pods[path.name] = request["object"]
    return pods


POD_FIXTURES = pod_fixtures()
MUTATE_POD_FIXTURES = sorted(n for n in POD_FIXTURES if ".mutate" in n)


def fixture_object(name: str) -> dict[str, Any]:
    return copy.deepcopy(POD_FIXTURES[name])


def apply(pod: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply as the apiserver would, but stricter: RFC 6902 `jsonpatch` refuses an add under a missing parent
    and a replace of a missing member (the apiserver fails the first with HTTP 500)."""
    assert json.loads(json.dumps(ops)) == ops  # plain JSON, as it goes on the wire
    for op in ops:
        assert op["op"] in ("add", "remove", "replace"), op
        assert op["path"] == "/metadata" or op["path"].startswith(("/spec/affinity", "/metadata/annotations")), op
    result: dict[str, Any] = jsonpatch.apply_patch(pod, ops)
    return result


def steer(pod: dict[str, Any], steering: Steering) -> dict[str, Any]:
    return apply(pod, steering_patch(pod, steering))


def node_affinity(pod: dict[str, Any]) -> dict[str, Any]:
    return ((pod.get("spec") or {}).get("affinity") or {}).get("nodeAffinity") or {}


def required_terms(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return (node_affinity(pod).get(REQUIRED) or {}).get("nodeSelectorTerms") or []


def zone_not_in(zones: tuple[str, ...] | list[str]) -> dict[str, Any]:
    return {"key": ZONE_LABEL, "operator": "NotIn", "values": sorted(zones)}


def host_not_in(nodes: tuple[str, ...] | list[str]) -> dict[str, Any]:
    return {"key": HOSTNAME_LABEL, "operator": "NotIn", "values": sorted(nodes)}


def assert_valid_pod(pod: dict[str, Any]) -> None:
    """The Pod schema (strict: no unknown fields), plus what the apiserver's validation adds for affinity."""
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    affinity = node_affinity(pod)
    required = affinity.get(REQUIRED)
    if required is not None:
        assert required["nodeSelectorTerms"], "a required node selector needs at least one term"
    requirements = [e for t in required_terms(pod) for e in t.get("matchExpressions") or []]
    for preference in affinity.get(PREFERRED) or []:
        assert 1 <= preference["weight"] <= 100
        requirements += preference["preference"].get("matchExpressions") or []
    for expr in requirements:
        if expr["operator"] in ("In", "NotIn"):
            assert expr.get("values"), f"{expr}: values required for In/NotIn (the apiserver answers 422)"
        elif expr["operator"] in ("Exists", "DoesNotExist"):
            assert not expr.get("values"), expr
    for key, value in ((pod.get("metadata") or {}).get("annotations") or {}).items():
        assert QUALIFIED_NAME.match(key) and isinstance(value, str), key


def normalised(pod: dict[str, Any]) -> dict[str, Any]:
    """Empty `affinity`, `nodeAffinity` and `annotations` objects mean the same as none (Go's omitempty)."""
    pod = copy.deepcopy(pod)
    spec = pod.get("spec") or {}
    affinity = spec.get("affinity")
    if isinstance(affinity, dict):
        if affinity.get("nodeAffinity") == {}:
            del affinity["nodeAffinity"]
        if not affinity:
            del spec["affinity"]
    metadata = pod.get("metadata") or {}
    if metadata.get("annotations") == {}:
        del metadata["annotations"]
    return pod


def outside_steering(pod: dict[str, Any]) -> dict[str, Any]:
    """Everything but the node affinity and ipguard's annotation: what a steering patch must never touch."""
    pod = normalised(pod)
    affinity = pod.get("spec", {}).get("affinity")
    if isinstance(affinity, dict):
        affinity.pop("nodeAffinity", None)
        if not affinity:
            del pod["spec"]["affinity"]
    annotations = pod.get("metadata", {}).get("annotations")
    if isinstance(annotations, dict):
        annotations.pop(STEERED_ANNOTATION, None)
    return normalised(pod)


def check_steered(original: dict[str, Any], steering: Steering) -> dict[str, Any]:
    """All the properties of one steering applied to one pod; returns the steered pod."""
    before = copy.deepcopy(original)
    ops = steering_patch(original, steering)
    assert original == before, "steering_patch must not modify its input"
    steered = apply(original, ops)

    # (a) a valid Pod
    assert_valid_pod(steered)

    # (b) idempotent: a reinvoked call on the patched pod has nothing to do; twice is once
    assert steering_patch(steered, steering) == []
    assert apply(steered, steering_patch(steered, steering)) == steered

    # (c) the user's expressions, terms, preferences, tolerations (and everything else) are kept
    assert outside_steering(steered) == outside_steering(original)
    old_terms, new_terms = required_terms(original), required_terms(steered)
    if old_terms:
        assert len(new_terms) == len(old_terms)
        for old, new in zip(old_terms, new_terms, strict=True):
            old_exprs = old.get("matchExpressions") or []
            assert (new.get("matchExpressions") or [])[: len(old_exprs)] == old_exprs
            assert new.get("matchFields") == old.get("matchFields")
    old_prefs = node_affinity(original).get(PREFERRED) or []
    assert (node_affinity(steered).get(PREFERRED) or [])[: len(old_prefs)] == old_prefs
    assert (node_affinity(steered).get(PREFERRED) or [])[len(old_prefs):] == [
        {"weight": w, "preference": {"matchExpressions": [{"key": ZONE_LABEL, "operator": "In", "values": [z]}]}}
        for z, w in steering.prefer_zones
    ]

    # (d) terms are ORed: every one carries the exclusions, once; but a term that matches no node stays so
    ours = ([zone_not_in(steering.avoid_zones)] if steering.avoid_zones else []) + (
        [host_not_in(steering.avoid_nodes)] if steering.avoid_nodes else []
    )
    if ours:
        assert new_terms
        for i, term in enumerate(new_terms):
            if old_terms and empty_term(old_terms[i]):
                assert term == old_terms[i]
                continue
            exprs = term.get("matchExpressions") or []
            before_count = [(t.get("matchExpressions") or []) for t in old_terms][i] if old_terms else []
            for expr in ours:
                assert exprs.count(expr) == max(1, before_count.count(expr)), (expr, exprs)
    else:
        assert required_terms(steered) == old_terms

    # ipguard's record is there exactly when it steers
    assert (read_record(steered) is not None) == (not steering.empty)
    return steered


# ---- strategies ---------------------------------------------------------------------------------------------

label_value = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\Z")
zone_keys = st.sampled_from([ZONE_LABEL, LEGACY_ZONE_LABEL])
other_keys = st.sampled_from(["node.kubernetes.io/instance-type", "eks.amazonaws.com/capacityType",
                              "kubernetes.io/arch", "team"])


@st.composite
def requirement(draw: st.DrawFn, zone_bias: bool = True) -> dict[str, Any]:
    kind = draw(st.sampled_from(["zone-in", "zone-notin", "other-in", "exists", "doesnotexist", "gt", "host"]))
    if kind == "zone-in":
        return {"key": draw(zone_keys), "operator": "In",
                "values": draw(st.lists(st.sampled_from(ZONES), min_size=1, max_size=3, unique=True))}
    if kind == "zone-notin":
        return {"key": ZONE_LABEL, "operator": "NotIn",
                "values": sorted(draw(st.lists(st.sampled_from(ZONES), min_size=1, max_size=2, unique=True)))}
    if kind == "other-in":
        return {"key": draw(other_keys), "operator": draw(st.sampled_from(["In", "NotIn"])),
                "values": draw(st.lists(label_value, min_size=1, max_size=3, unique=True))}
    if kind == "exists":
        return {"key": draw(st.one_of(zone_keys, other_keys)), "operator": "Exists"}
    if kind == "doesnotexist":
        return {"key": draw(other_keys), "operator": "DoesNotExist"}
    if kind == "gt":
        return {"key": "example.com/generation", "operator": draw(st.sampled_from(["Gt", "Lt"])),
                "values": [str(draw(st.integers(0, 20)))]}
    return {"key": HOSTNAME_LABEL, "operator": "NotIn",
            "values": sorted(draw(st.lists(st.sampled_from(NODE_NAMES), min_size=1, max_size=2, unique=True)))}


@st.composite
def selector_term(draw: st.DrawFn) -> dict[str, Any]:
    term: dict[str, Any] = {}
    if draw(st.integers(0, 7)) == 0:
        return term  # matches no node (an empty `matchExpressions` list arrives dropped, as `{}`)
    exprs = draw(st.lists(requirement(), max_size=4))
    fields = draw(st.lists(st.fixed_dictionaries({
        "key": st.just("metadata.name"), "operator": st.sampled_from(["In", "NotIn"]),
        "values": st.lists(st.sampled_from(NODE_NAMES), min_size=1, max_size=1)}), max_size=1))
    if exprs or not fields:
        term["matchExpressions"] = exprs or [draw(requirement())]
    if fields:
        term["matchFields"] = fields
    return term


@st.composite
def preferred_term(draw: st.DrawFn) -> dict[str, Any]:
    return {"weight": draw(st.integers(1, 100)),
            "preference": {"matchExpressions": draw(st.lists(requirement(), min_size=1, max_size=2))}}


POD_AFFINITY = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
    "weight": 100, "podAffinityTerm": {"labelSelector": {"matchLabels": {"app": "api"}},
                                       "topologyKey": ZONE_LABEL}}]}}


@st.composite
def affinities(draw: st.DrawFn) -> dict[str, Any] | None:
    shape = draw(st.sampled_from(["none", "empty", "pod-only", "node", "node+pod", "empty-node"]))
    if shape == "none":
        return None
    if shape == "empty":
        return {}
    if shape == "pod-only":
        return copy.deepcopy(POD_AFFINITY)
    if shape == "empty-node":
        return {"nodeAffinity": {}}
    node: dict[str, Any] = {}
    if draw(st.booleans()):
        node[REQUIRED] = {"nodeSelectorTerms": draw(st.lists(selector_term(), min_size=1, max_size=3))}
    if draw(st.booleans()):
        node[PREFERRED] = draw(st.lists(preferred_term(), min_size=1, max_size=3))
    affinity: dict[str, Any] = {"nodeAffinity": node}
    if shape == "node+pod":
        affinity.update(copy.deepcopy(POD_AFFINITY))
    return affinity


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    pod = fixture_object(draw(st.sampled_from(MUTATE_POD_FIXTURES)))
    pod["spec"].pop("affinity", None)
    pod["metadata"].pop("annotations", None)
    affinity = draw(affinities())
    if affinity is not None:
        pod["spec"]["affinity"] = affinity
    annotations = draw(st.one_of(
        st.none(),
        st.dictionaries(st.sampled_from(["example.com/owner", "prometheus.io/scrape", "note", "ipguard.io/other"]),
                        label_value, min_size=1, max_size=3),
    ))
    if annotations is not None:
        pod["metadata"]["annotations"] = annotations
    if draw(st.booleans()):
        pod["spec"].setdefault("tolerations", []).append(
            {"key": "dedicated", "operator": "Equal", "value": "payments", "effect": "NoSchedule"})
    return pod


@st.composite
def steerings(draw: st.DrawFn, allow_empty: bool = True) -> Steering:
    avoid_zones = tuple(draw(st.lists(st.sampled_from(ZONES), max_size=3, unique=True)))
    avoid_nodes = tuple(draw(st.lists(st.sampled_from(NODE_NAMES), max_size=3, unique=True)))
    prefer = draw(st.lists(st.sampled_from(ZONES), max_size=3, unique=True))
    prefer_zones = tuple((z, draw(st.integers(1, 100))) for z in prefer)
    steering = Steering(avoid_zones, avoid_nodes, prefer_zones, draw(st.sampled_from(["", "zone(s) full"])))
    if not allow_empty and steering.empty:
        return Steering(avoid_zones=(A,))
    return steering


HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- every real pod ----------------------------------------------------------------------------------------

STEERINGS = [
    Steering(avoid_zones=(A,)),
    Steering(avoid_zones=(A, C), prefer_zones=((B, 100),)),
    Steering(avoid_nodes=(NODE_NAMES[0], NODE_NAMES[1])),
    Steering(avoid_zones=(B,), avoid_nodes=(NODE_NAMES[0],), prefer_zones=((A, 100), (C, 37)), reason="r"),
    Steering(prefer_zones=((C, 5),)),
]


def test_fixture_pods_are_all_here() -> None:
    assert len(POD_FIXTURES) == 29
    assert all(POD_FIXTURES[n]["kind"] == "Pod" for n in POD_FIXTURES)
    for name in POD_FIXTURES:  # the schema check itself accepts what a real apiserver sent
        assert_valid_pod(POD_FIXTURES[name])


@pytest.mark.parametrize("name", sorted(POD_FIXTURES))
def test_every_fixture_pod_steers_validly(name: str) -> None:
    original = fixture_object(name)
    for steering in STEERINGS:
        steered = check_steered(original, steering)
        # (e) un-steering restores the pod
        unsteered = steer(steered, Steering())
        assert normalised(unsteered) == normalised(original)
        if "annotations" not in original["metadata"] and "affinity" not in original["spec"]:
            assert unsteered == original  # not even an empty object left behind
        # (f) each other steering replaces this one
        for other in STEERINGS:
            assert normalised(steer(steered, other)) == normalised(steer(original, other))


# ---- hypothesis: any affinity shape, any steering ----------------------------------------------------------


@HYPOTHESIS
@given(pod=pods(), steering=steerings())
def test_steering_properties(pod: dict[str, Any], steering: Steering) -> None:
    assert_valid_pod(pod)
    steered = check_steered(pod, steering)
    # (e) steering then un-steering restores the original affinity (and annotations)
    restored = steer(steered, Steering())
    assert normalised(restored) == normalised(pod)


@HYPOTHESIS
@given(pod=pods(), first=steerings(allow_empty=False), second=steerings(), third=steerings())
def test_changed_steering_replaces(
    pod: dict[str, Any], first: Steering, second: Steering, third: Steering
) -> None:
    # (f) a changed decision replaces the previous steering, never accumulates
    chained = steer(steer(steer(pod, first), second), third)
    assert normalised(chained) == normalised(steer(pod, third))
    assert_valid_pod(chained)


@HYPOTHESIS
@given(pod=pods(), steering=steerings(allow_empty=False))
def test_without_steering_is_the_users_pod(pod: dict[str, Any], steering: Steering) -> None:
    # What the reinvoked mutating call decides on: the user's pod, whatever ipguard added before.
    steered = steer(pod, steering)
    assert normalised(without_steering(steered))["spec"] == normalised(pod)["spec"]
    assert without_steering(pod) is pod  # no record: nothing to take away


@HYPOTHESIS
@given(pod=pods(), steering=steerings())
def test_no_add_under_a_missing_parent(pod: dict[str, Any], steering: Steering) -> None:
    # (g) walk the operations one by one: each `add` parent exists at that moment
    doc = copy.deepcopy(pod)
    for op in steering_patch(pod, steering):
        parent_path, _, _ = op["path"].rpartition("/")
        parent = jsonpatch.JsonPointer(parent_path).resolve(doc) if parent_path else doc
        assert isinstance(parent, dict | list), op
        if op["op"] == "replace":
            assert jsonpatch.JsonPointer(op["path"]).resolve(doc, None) is not None, op
        doc = jsonpatch.apply_patch(doc, [op])


def test_add_under_missing_parent_is_what_jsonpatch_refuses() -> None:
    # The check used above really fails on the mistake the apiserver answers with HTTP 500.
    pod = fixture_object("patch-add-affinity.mutate.json")
    bad = [{"op": "add", "path": f"/spec/affinity/nodeAffinity/{REQUIRED}", "value": {"nodeSelectorTerms": []}}]
    with pytest.raises((jsonpatch.JsonPatchConflict, jsonpatch.JsonPointerException)):
        jsonpatch.apply_patch(pod, bad)


# ---- exact fixture behaviour ---------------------------------------------------------------------------------


def meta_patch(name: str) -> list[dict[str, Any]]:
    meta = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(meta["response_sent"]["response"]["patch"]))
    return ops


def test_patch_add_affinity_gives_the_affinity_the_apiserver_stored() -> None:
    pod = fixture_object("patch-add-affinity.mutate.json")
    assert "affinity" not in pod["spec"] and "annotations" not in pod["metadata"]
    ops = steering_patch(pod, Steering(avoid_zones=(A,)))
    # The parent is created by the first operation, exactly as in behaviour fact 4.1.
    stored = fixture_object("patch-add-affinity.validate.json")
    assert ops[0] == {"op": "add", "path": "/spec/affinity", "value": stored["spec"]["affinity"]}
    assert ops[1]["op"] == "add" and ops[1]["path"] == "/metadata/annotations"
    assert set(ops[1]["value"]) == {STEERED_ANNOTATION}
    steered = apply(pod, ops)
    assert steered["spec"] == stored["spec"]
    assert_valid_pod(steered)


def test_a_term_that_matches_no_node_is_not_opened_up_by_steering() -> None:
    """A node selector term with no requirement matches no node (the API's rule; an empty `matchExpressions`
    list arrives dropped, as `{}`). Adding `zone NotIn [...]` to it would let the pod onto every node outside
    the avoided zones: it is left as it is, and the user's other term gets the exclusion. Judged through the
    handler on the captured pod, the empty term adds no zone either: us-east-1b, outside the pod's own
    `In [1a, 1c]`, gets no preference."""
    pod = fixture_object("pod-create-affinity.mutate.json")
    terms = required_terms(pod)
    assert len(terms) == 1 and terms[0]["matchExpressions"][0]["values"] == [A, C]
    terms.append({})
    steered = check_steered(pod, Steering(avoid_zones=(C,)))
    assert required_terms(steered)[1] == {}
    assert zone_not_in((C,)) in required_terms(steered)[0]["matchExpressions"]

    index = fixture_cluster(exhausted=[C])
    review = json.loads((FIXTURES / "pod-create-affinity.mutate.json").read_text(encoding="utf-8"))
    review["request"]["object"]["spec"]["affinity"]["nodeAffinity"][REQUIRED]["nodeSelectorTerms"].append({})
    answer = handle(parse_review(json.dumps(review).encode()), "mutate", AdmissionState(index, Settings()))
    assert answer.decision.avoid_zones == (C,), answer.decision
    assert {z for z, _ in answer.decision.prefer_zones} <= {A}, answer.decision
    assert answer.patch is not None
    steered_pod = apply(review["request"]["object"], answer.patch)
    assert required_terms(steered_pod)[1] == {}


def test_patch_merge_affinity_keeps_the_users_term() -> None:
    pod = fixture_object("patch-merge-affinity.mutate.json")
    steered = check_steered(pod, Steering(avoid_zones=(A,)))
    stored = fixture_object("patch-merge-affinity.validate.json")
    # Same stored affinity as the apiserver kept after the append of behaviour fact 4.2.
    assert steered["spec"]["affinity"] == stored["spec"]["affinity"]
    assert required_terms(steered)[0]["matchExpressions"] == [
        {"key": ZONE_LABEL, "operator": "In", "values": [A, C]},
        {"key": ZONE_LABEL, "operator": "NotIn", "values": [A]},
    ]
    assert node_affinity(steered)[PREFERRED] == node_affinity(pod)[PREFERRED]
    # Our own patch also applies to the captured pod the way the capture webhook's did.
    assert apply(pod, meta_patch("patch-merge-affinity.mutate.meta.json"))["spec"] == steered["spec"]


def test_reinvoked_fixture_object_gets_no_duplicate_not_in() -> None:
    # Its round-0 NotIn came from another webhook (no ipguard record): ipguard must not add a second copy.
    pod = fixture_object("reinvocation.mutate-reinvoked.json")
    assert required_terms(pod)[0]["matchExpressions"] == [zone_not_in([A])]
    steered = check_steered(pod, Steering(avoid_zones=(A,)))
    assert required_terms(steered)[0]["matchExpressions"] == [zone_not_in([A])]
    # And un-steering leaves that expression alone: it was never ipguard's.
    assert required_terms(steer(steered, Steering()))[0]["matchExpressions"] == [zone_not_in([A])]
    assert normalised(steer(steered, Steering())) == normalised(pod)
    # A wider steering adds its own expression and takes back only that one later.
    wider = check_steered(steered, Steering(avoid_zones=(A, C)))
    assert required_terms(wider)[0]["matchExpressions"] == [zone_not_in([A]), zone_not_in([A, C])]
    assert normalised(steer(wider, Steering())) == normalised(pod)


def test_capture_webhooks_round0_patch_matches_the_reinvoked_object() -> None:
    # Reading of the fixtures themselves: round 0's patch, then the other webhook's, give the round-1 object.
    pod = fixture_object("reinvocation.mutate.json")
    pod = apply_any(pod, meta_patch("reinvocation.mutate.meta.json"))
    pod = apply_any(pod, meta_patch("reinvocation.mutate2-other.meta.json"))
    reinvoked = fixture_object("reinvocation.mutate-reinvoked.json")
    assert pod["spec"] == reinvoked["spec"]
    assert pod["metadata"]["labels"] == reinvoked["metadata"]["labels"]


def apply_any(pod: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = jsonpatch.apply_patch(pod, ops)
    return result


def review_bytes(name: str, obj: dict[str, Any] | None = None) -> bytes:
    document = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    if obj is not None:
        document["request"]["object"] = obj
    return json.dumps(document).encode()


def mutate(state: AdmissionState, name: str, obj: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    answer = handle(parse_review(review_bytes(name, obj)), "mutate", state)
    assert ("patch" in answer.response) == bool(answer.patch)
    if answer.patch:
        assert json.loads(base64.b64decode(answer.response["patch"])) == answer.patch
        assert answer.response["patchType"] == "JSONPatch"
    return answer.patch or []


@pytest.mark.parametrize("other_webhook", ["captured", "label-only", "annotation-key", "nothing"])
def test_reinvocation_through_the_handler_is_idempotent(other_webhook: str) -> None:
    """Round 0 (ours) -> the other mutating webhook -> round 1 (ours again): round 1 changes nothing."""
    state = AdmissionState(fixture_cluster(exhausted=(A,)), Settings(zone_reserve=2))
    pod = fixture_object("reinvocation.mutate.json")
    round0 = mutate(state, "reinvocation.mutate.json")
    assert round0, "zone us-east-1a is exhausted: the pod must be steered"
    pod = apply(pod, round0)
    other_ops = {
        "captured": meta_patch("reinvocation.mutate2-other.meta.json"),  # replaces /metadata/annotations!
        "label-only": [{"op": "add", "path": "/metadata/labels/other-mutator", "value": "done"}],
        "annotation-key": [{"op": "add", "path": "/metadata/annotations/other.example.com~1injected",
                            "value": "true"}],
        "nothing": [],
    }[other_webhook]
    pod = apply_any(pod, other_ops)
    round1 = mutate(state, "reinvocation.mutate-reinvoked.json", pod)
    assert round1 == [], f"round 1 must not change the pod again: {round1}"
    final = apply(pod, round1)
    for term in required_terms(final):
        assert term["matchExpressions"].count(zone_not_in([A])) == 1
    # The validating stage sees the steered pod and admits it into an open zone.
    answer = handle(parse_review(review_bytes("reinvocation.validate.json", final)), "validate", state)
    assert answer.response["allowed"] is True
    assert answer.decision.reserve_zone in (B, C)


def test_reinvocation_after_the_figures_change_replaces_the_steering() -> None:
    state = AdmissionState(fixture_cluster(exhausted=(A,)), Settings(zone_reserve=2))
    pod = apply(fixture_object("reinvocation.mutate.json"), mutate(state, "reinvocation.mutate.json"))
    # Between the rounds us-east-1c runs out too: round 1 must avoid both, with one expression, not two.
    state.index = fixture_cluster(exhausted=(A, C))
    pod = apply(pod, mutate(state, "reinvocation.mutate-reinvoked.json", pod))
    assert required_terms(pod)[0]["matchExpressions"] == [zone_not_in([A, C])]
    assert_valid_pod(pod)
    # ... and once us-east-1a has room again, a later round takes back what is no longer needed.
    state.index = fixture_cluster(exhausted=())
    pod = apply(pod, mutate(state, "reinvocation.mutate-reinvoked.json", pod))
    assert normalised(pod)["spec"] == normalised(fixture_object("reinvocation.mutate.json"))["spec"]


def test_reinvoked_capture_object_through_the_handler() -> None:
    # The literal round-1 body: its NotIn [us-east-1a] is not ipguard's, and still no duplicate comes of it.
    state = AdmissionState(fixture_cluster(exhausted=(A,)), Settings(zone_reserve=2))
    pod = fixture_object("reinvocation.mutate-reinvoked.json")
    final = apply(pod, mutate(state, "reinvocation.mutate-reinvoked.json"))
    assert all(t["matchExpressions"].count(zone_not_in([A])) == 1 for t in required_terms(final))
    assert_valid_pod(final)


def test_update_of_a_steered_pod_is_never_patched() -> None:
    # Pod spec affinity is immutable after creation: an UPDATE must get no patch, whatever the figures.
    state = AdmissionState(fixture_cluster(exhausted=(A,)), Settings(zone_reserve=2))
    assert mutate(state, "pod-update-label.mutate.json") == []


def test_hand_written_or_broken_record_is_harmless() -> None:
    pod = fixture_object("patch-merge-affinity.mutate.json")
    for text in ["not json", "[1, 2]", '{"avoidZones": "us-east-1a", "preferZones": [1, ["a"], ["b", "x"]]}',
                 '{"avoidZones": [1, null], "kept": "x", "createdRequired": "yes"}']:
        pod["metadata"]["annotations"] = {STEERED_ANNOTATION: text}
        steered = steer(pod, Steering(avoid_zones=(A,)))
        assert_valid_pod(steered)
        assert steering_patch(steered, Steering(avoid_zones=(A,))) == []
        assert required_terms(steered)[0]["matchExpressions"][0] == {
            "key": ZONE_LABEL, "operator": "In", "values": [A, C]}


def test_pod_without_spec_or_metadata_gets_no_broken_patch() -> None:
    assert steering_patch({"kind": "Pod"}, Steering(avoid_zones=(A,))) == []
    pod = {"kind": "Pod", "spec": {"containers": []}}
    steered = apply(pod, steering_patch(pod, Steering(avoid_zones=(A,))))
    assert required_terms(steered) == [{"matchExpressions": [zone_not_in([A])]}]
    assert STEERED_ANNOTATION in steered["metadata"]["annotations"]


def test_fixture_files_exist() -> None:
    assert Path(FIXTURES, "reinvocation.mutate-reinvoked.json").is_file()


# ---- soft steering: a preference, not a requirement, for pods that may have nowhere else to go ---------------


def pvc_pod() -> dict[str, Any]:
    pod = fixture_object("pod-create-affinity.mutate.json")
    pod["spec"]["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "data-db-0"}}]
    return pod


def test_soft_steering_adds_a_preference_and_leaves_the_requirements_alone() -> None:
    pod = pvc_pod()
    steering = Steering(avoid_zones=(A,), prefer_zones=((C, 100),), reason="zone full", soft=True)
    steered = steer(pod, steering)
    assert node_affinity(steered)[REQUIRED] == node_affinity(pod)[REQUIRED]
    soft_term = node_affinity(steered)[PREFERRED][-2]
    assert soft_term == {"weight": 100, "preference": {"matchExpressions": [
        {"key": ZONE_LABEL, "operator": "NotIn", "values": [A]}]}}
    assert node_affinity(steered)[PREFERRED][0] == node_affinity(pod)[PREFERRED][0]  # the user's, first
    assert_valid_pod(steered)
    assert steering_patch(steered, steering) == []  # reinvocation: nothing more
    assert read_record(steered)["soft"] is True  # type: ignore[index]
    restored = steer(steered, Steering())
    assert node_affinity(restored) == node_affinity(pod)
    # a later hard steering replaces the soft one
    hard = steer(steered, Steering(avoid_zones=(A,), reason="zone full"))
    assert len(node_affinity(hard)[PREFERRED]) == len(node_affinity(pod)[PREFERRED])
    assert {"key": ZONE_LABEL, "operator": "NotIn", "values": [A]} in (
        node_affinity(hard)[REQUIRED]["nodeSelectorTerms"][0]["matchExpressions"])


@pytest.mark.parametrize(
    "shape", ["pvc", "ephemeral", "node-selector", "arch", "pod-affinity-zone", "affinity-key", "match-fields"]
)
def test_pods_that_may_have_nowhere_else_to_go_are_steered_softly(shape: str) -> None:
    pod = fixture_object("pod-create-generatename.mutate.json")
    spec = pod["spec"]
    if shape == "pvc":
        spec["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
    elif shape == "ephemeral":
        spec["volumes"] = [{"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}]
    elif shape == "node-selector":
        spec["nodeSelector"] = {"eks.amazonaws.com/nodegroup": "gpu"}
    elif shape == "arch":  # a Graviton node group may live in one zone only
        spec["nodeSelector"] = {"kubernetes.io/arch": "arm64"}
    elif shape == "pod-affinity-zone":  # must share a zone with its peers
        spec["affinity"] = {"podAffinity": {REQUIRED: [
            {"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": ZONE_LABEL}]}}
    else:
        field = "matchFields" if shape == "match-fields" else "matchExpressions"
        key = "metadata.name" if shape == "match-fields" else "node.kubernetes.io/instance-type"
        spec["affinity"] = {"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [
            {field: [{"key": key, "operator": "In", "values": ["x", "y"]}]}]}}}
    body = {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {
        "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": "payments",
        "operation": "CREATE", "object": pod}}
    state = AdmissionState(fixture_cluster(exhausted=[A]), Settings())
    answer = handle(parse_review(json.dumps(body).encode()), "mutate", state)
    if shape == "match-fields":
        assert answer.patch is None  # pinned by name to nodes ipguard does not know: nothing to steer
        return
    assert answer.outcome == "steered" and answer.patch
    steered = apply(pod, answer.patch)
    assert node_affinity(steered).get(REQUIRED) == (node_affinity(pod).get(REQUIRED))
    assert any(t["weight"] == 100 and t["preference"]["matchExpressions"][0]["operator"] == "NotIn"
               for t in node_affinity(steered)[PREFERRED])
