"""Parsing AdmissionReviews: every request a real kube-apiserver sent, the v1beta1 form, and each bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_server_e2e import ADMISSION_FIXTURES, BAD_BODIES, fixture_body, fixture_review
from webhook.admission.wire import MAX_BODY_BYTES, BadReview, Review, parse_review, review_envelope


@pytest.mark.parametrize("name", ADMISSION_FIXTURES)
def test_every_fixture_parses(name: str) -> None:
    request = fixture_review(name)["request"]
    review = parse_review(fixture_body(name))
    assert review.api_version == "admission.k8s.io/v1"
    assert review.uid == request["uid"]
    assert (review.group, review.kind) == (request["kind"]["group"], request["kind"]["kind"])
    assert review.resource == request["resource"]["resource"]
    assert review.operation == request["operation"]
    assert review.namespace == request.get("namespace")
    assert review.name == request.get("name")
    assert review.dry_run is request["dryRun"]
    assert review.object == request["object"]
    assert review.old_object == request["oldObject"]


def test_fixture_specifics() -> None:
    generate = parse_review(fixture_body("pod-create-generatename.mutate.json"))
    assert generate.name is None and "name" not in (generate.object or {})["metadata"]
    assert parse_review(fixture_body("pod-create-generatename.validate.json")).name == "api-7d9c8b6f5d-hpsl2"
    eniconfig = parse_review(fixture_body("eniconfig-create.mutate.json"))
    assert eniconfig.namespace is None and eniconfig.kind == "ENIConfig" and eniconfig.group == "crd.k8s.amazonaws.com"
    sgp = parse_review(fixture_body("sgp-create.validate.json"))
    assert (sgp.group, sgp.kind, sgp.resource) == ("vpcresources.k8s.aws", "SecurityGroupPolicy",
                                                   "securitygrouppolicies")
    update = parse_review(fixture_body("pod-update-label.validate.json"))
    assert update.operation == "UPDATE" and update.old_object is not None
    assert parse_review(fixture_body("pod-create-dryrun-server.mutate.json")).dry_run is True
    uids = {parse_review(fixture_body(n)).uid for n in ADMISSION_FIXTURES}
    assert len(uids) == len(ADMISSION_FIXTURES)  # every webhook call has its own uid


def test_v1beta1() -> None:
    document = fixture_review("pod-create-generatename.mutate.json")
    document["apiVersion"] = "admission.k8s.io/v1beta1"
    review = parse_review(json.dumps(document).encode())
    assert review.api_version == "admission.k8s.io/v1beta1"
    envelope = review_envelope(review.api_version, {"uid": review.uid, "allowed": True})
    assert envelope == {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                        "response": {"uid": review.uid, "allowed": True}}


def test_delete_and_connect_need_no_object() -> None:
    document = fixture_review("pod-update-label.validate.json")
    for operation in ("DELETE", "CONNECT"):
        document["request"]["operation"] = operation
        document["request"]["object"] = None
        review = parse_review(json.dumps(document).encode())
        assert review.object is None and review.operation == operation


@pytest.mark.parametrize(("case", "body", "reason"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_bodies(case: str, body: bytes, reason: str) -> None:
    with pytest.raises(BadReview) as caught:
        parse_review(body)
    assert caught.value.status == 400
    assert reason in caught.value.reason
    assert str(caught.value) == caught.value.reason
    # Once the uid is known, it is carried for the log line.
    uid = fixture_review("pod-create-generatename.validate.json")["request"]["uid"]
    if case in ("missing-object", "object-null", "object-list", "wrong-kind", "missing-kind", "wrong-apiVersion",
                "missing-apiVersion", "request-kind-missing", "request-resource-missing", "operation-missing",
                "pod-name-number", "pod-metadata-list", "pod-node-selector-list"):
        assert caught.value.uid == uid, case


def test_too_large() -> None:
    body = b" " * (MAX_BODY_BYTES + 1)
    with pytest.raises(BadReview) as caught:
        parse_review(body)
    assert caught.value.status == 413 and str(MAX_BODY_BYTES) in caught.value.reason
    # Exactly the limit is still parsed (and here fails only as an empty JSON document would).
    with pytest.raises(BadReview) as caught:
        parse_review(b" " * MAX_BODY_BYTES)
    assert caught.value.status == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)


def _outcome(body: bytes) -> Review | BadReview:
    try:
        return parse_review(body)
    except BadReview as exc:
        assert exc.status in (400, 413) and exc.reason
        return exc


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_a_review_or_bad_review(body: bytes) -> None:
    _outcome(body)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_json_is_a_review_or_bad_review(value: Any) -> None:
    _outcome(json.dumps(value).encode())


REQUEST_KEYS = ["uid", "kind", "resource", "operation", "object", "oldObject", "namespace", "name", "dryRun",
                "options", "userInfo", "requestKind"]


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(ADMISSION_FIXTURES),
    key=st.sampled_from(REQUEST_KEYS),
    value=st.one_of(st.just("<delete>"), json_values),
)
def test_wrong_types_in_request(name: str, key: str, value: Any) -> None:
    document = fixture_review(name)
    if value == "<delete>":
        document["request"].pop(key, None)
    else:
        document["request"][key] = value
    result = _outcome(json.dumps(document).encode())
    if isinstance(result, Review):
        assert result.uid == document["request"]["uid"]
        assert isinstance(result.kind, str) and isinstance(result.operation, str) and result.operation
        assert result.object is None or isinstance(result.object, dict)
        assert result.namespace is None or isinstance(result.namespace, str)
        assert result.name is None or isinstance(result.name, str)
        assert isinstance(result.dry_run, bool)


AFFINITY = "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"


@pytest.mark.parametrize(("path", "value", "where"), [
    ("metadata.generateName", 5, "metadata.generateName must be a string"),
    ("metadata.annotations", {"a": 1}, "metadata.annotations.a must be a string"),
    ("metadata.labels", "app=api", "metadata.labels must be an object"),
    ("spec", [], "spec must be an object"),
    ("spec.hostNetwork", "true", "spec.hostNetwork must be a boolean"),
    ("spec.nodeName", {"name": "n"}, "spec.nodeName must be a string"),
    ("spec.containers", {}, "spec.containers must be an array"),
    ("spec.containers", [{"resources": {"requests": []}}], "spec.containers[0].resources.requests must be an object"),
    (AFFINITY, {"nodeSelectorTerms": {}}, "nodeSelectorTerms must be an array"),
    (AFFINITY, {"nodeSelectorTerms": [{"matchExpressions": [{"key": 1}]}]},
     "nodeSelectorTerms[0].matchExpressions[0].key must be a string"),
    (AFFINITY, {"nodeSelectorTerms": [{"matchExpressions": [{"values": "a"}]}]}, "values must be an array"),
    ("spec.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution", [{"weight": True}],
     "[0].weight must be an integer"),
])
def test_pods_the_apiserver_could_not_have_decoded(path: str, value: Any, where: str) -> None:
    document = fixture_review("pod-create-affinity.mutate.json")
    node = document["request"]["object"]
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    with pytest.raises(BadReview) as caught:
        parse_review(json.dumps(document).encode())
    assert caught.value.status == 400 and where in caught.value.reason
    assert caught.value.reason.startswith("request.object is not a valid Pod: request.object.")
    assert caught.value.uid == document["request"]["uid"]


def test_nulls_and_other_kinds_are_not_pod_checked() -> None:
    document = fixture_review("pod-create-affinity.mutate.json")
    pod = document["request"]["object"]
    pod["metadata"]["annotations"] = None
    pod["spec"]["nodeSelector"] = None
    pod["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] = None
    assert parse_review(json.dumps(document).encode()).object == pod  # null means absent, as for the apiserver
    sgp = fixture_review("sgp-create.mutate.json")
    sgp["request"]["object"]["spec"] = "anything"  # not a Pod: ipguard does not judge it
    assert parse_review(json.dumps(sgp).encode()).kind == "SecurityGroupPolicy"
