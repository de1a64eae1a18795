"""`respond` is a pure function of (review, decision, stage, settings); `handle` adds the reservation."""

from __future__ import annotations

import copy
import json

from tests.paths import FIXTURES
from tests.test_server_e2e import A, fixture_cluster
from webhook.admission.handler import AdmissionState, handle, judge, respond
from webhook.admission.wire import parse_review
from webhook.model.config import Settings


def review(name: str, stage: str):  # type: ignore[no-untyped-def]
    return parse_review((FIXTURES / f"{name}.{stage}.json").read_bytes())


def test_respond_is_pure_and_handle_reserves() -> None:
    index = fixture_cluster()
    state = AdmissionState(index, Settings())
    rv = review("pod-create-generatename", "validate")
    decision = judge(rv, "validate", state)
    version = index.version
    first = respond(rv, decision, "validate", state.settings, index.cni)
    second = respond(rv, decision, "validate", state.settings, index.cni)
    assert first == second and index.version == version and not index.reservations()
    answer = handle(rv, "validate", state)
    assert answer.response == first.response
    assert [r.key for r in index.reservations()] == ["payments/api-7d9c8b6f5d-hpsl2"]


def test_dry_run_request_takes_no_reservation() -> None:
    index = fixture_cluster()
    handle(review("pod-create-dryrun-server", "validate"), "validate", AdmissionState(index, Settings()))
    assert index.reservations() == []


def test_stale_warning_is_given_once_by_the_validating_stage() -> None:
    state = AdmissionState(fixture_cluster(), Settings(), lambda: "pods data is 300s old (bound 120s)")
    mutated = handle(review("pod-create-generatename", "mutate"), "mutate", state)
    validated = handle(review("pod-create-generatename", "validate"), "validate", state)
    assert "warnings" not in mutated.response and "patch" not in mutated.response
    assert validated.response["allowed"] and len(validated.response["warnings"]) == 1
    assert "300s old" in validated.response["warnings"][0]
    assert validated.response["auditAnnotations"]["stale"] == "true"


def test_judged_on_the_pod_as_written_at_the_mutating_stage() -> None:
    # the reinvoked call carries ipguard's round-0 steering: the decision must still be to steer
    body = json.loads((FIXTURES / "reinvocation.mutate.json").read_bytes())
    index = fixture_cluster()
    state = AdmissionState(index, Settings(zone_reserves={A: 10_000}))
    first = handle(parse_review(json.dumps(body).encode()), "mutate", state)
    assert first.outcome == "steered" and first.patch
    import jsonpatch

    again = copy.deepcopy(body)
    again["request"]["object"] = jsonpatch.apply_patch(body["request"]["object"], first.patch)
    second = handle(parse_review(json.dumps(again).encode()), "mutate", state)
    assert second.decision.verdict == first.decision.verdict and second.patch is None


def test_own_steering_never_turns_into_a_denial() -> None:
    """Zone za: its only node full, 500 addresses in its subnet (new nodes can come). Zone zb: 2 warm IPs and an
    empty subnet. Pods mutated then validated, several mutated before any is validated: none may be denied
    while za has addresses, and none is pinned away from za."""
    import jsonpatch

    from webhook.model.index import CapacityIndex, PodUse

    ix = CapacityIndex()
    ix.upsert_node("na", zone="za", instance_type="m5.large", pod_subnet="sa", allocatable_pods=29)
    ix.upsert_node("nb", zone="zb", instance_type="m5.large", pod_subnet="sb", allocatable_pods=29)
    for i in range(27):
        ix.upsert_pod(f"apps/a-{i}", "na", PodUse.IP)
    for i in range(7):
        ix.upsert_pod(f"apps/b-{i}", "nb", PodUse.IP)
    ix.set_node_held("nb", 9)
    ix.upsert_subnet("sa", zone="za", free_ips=500)
    ix.upsert_subnet("sb", zone="zb", free_ips=0)
    state = AdmissionState(ix, Settings())
    body = json.loads((FIXTURES / "pod-create-generatename.mutate.json").read_bytes())
    mutated = []
    for _ in range(4):
        answer = handle(parse_review(json.dumps(body).encode()), "mutate", state)
        pod = jsonpatch.apply_patch(body["request"]["object"], answer.patch or [])
        affinity = json.dumps(pod["spec"].get("affinity", {}))
        assert '"NotIn","values":["za"]' not in affinity.replace(" ", "")
        mutated.append(pod)
    for i, pod in enumerate(mutated):
        pod["metadata"]["name"] = f"api-{i}"
        review = {**body, "request": {**body["request"], "uid": f"v-{i}", "name": f"api-{i}", "object": pod}}
        answer = handle(parse_review(json.dumps(review).encode()), "validate", state)
        assert answer.response["allowed"], answer.decision
