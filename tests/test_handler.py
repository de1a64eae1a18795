"""`respond` is a pure function of (review, decision, stage, settings); `handle` adds the reservation."""

from __future__ import annotations

import copy
import json

from tests.paths import FIXTURES
from tests.test_server_e2e import A, B, fixture_cluster
from webhook.admission.handler import AdmissionState, handle, judge, respond
from webhook.admission.wire import parse_review
from webhook.model.config import Settings
from webhook.model.index import PodUse


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


def _zone_pod(zone: str, priority: int = 0, policy: str = "PreemptLowerPriority") -> bytes:
    """The captured Deployment pod, confined to a zone, at this priority (as the Priority plugin sets it)."""
    document = json.loads((FIXTURES / "pod-create-generatename.validate.json").read_bytes())
    spec = document["request"]["object"]["spec"]
    spec["nodeSelector"] = {"topology.kubernetes.io/zone": zone}
    spec["priority"], spec["preemptionPolicy"] = priority, policy
    return json.dumps(document).encode()


def test_a_system_critical_pod_is_not_denied_where_the_scheduler_would_preempt_for_it() -> None:
    """Zone A is out of pod IPs. A system-critical pod (priority above every user PriorityClass, allowed to
    preempt) makes the scheduler evict a user pod where a node has no pod slot left; that pod's IP comes back to
    it after the cooldown. Once a zone A node runs full, ipguard admits it and says why (a warning, an audit
    annotation) rather than deny a pod that gets an IP. Denied as before: with no full node (the scheduler binds
    it where a slot is free, without preempting, and the sandbox fails), at a user priority (a globalDefault
    class gives every pod the same), and with preemptionPolicy Never."""
    index = fixture_cluster(exhausted=[A])
    state = AdmissionState(index, Settings())
    critical = _zone_pod(A, 2_000_001_000)
    assert handle(parse_review(critical), "validate", state).response["allowed"] is False  # a slot is free
    node = index.nodes["ip-10-0-1-10.ec2.internal"]
    assert node.allocatable_pods == 29 and node.capacity == 18
    for i in range(29):  # 18 pods with a VPC IP and 11 on the host network: no pod slot left
        index.upsert_pod(f"shop/p-{i}", node.name, PodUse.IP if i < 18 else PodUse.NONE)
    answer = handle(parse_review(critical), "validate", state)
    assert answer.response["allowed"] is True and answer.decision.preempts == 2_000_001_000
    assert answer.response["auditAnnotations"]["preempts"] == "2000001000"
    (warning,) = answer.response["warnings"]
    assert warning.startswith("ipguard: every allowed zone is out of pod IPs; admitted: at priority 2000001000")
    assert answer.reservation is None and index.reservations() == []
    for priority, policy in ((0, "PreemptLowerPriority"), (1_000_000, "PreemptLowerPriority"),
                             (2_000_001_000, "Never")):
        answer = handle(parse_review(_zone_pod(A, priority, policy)), "validate", state)
        assert answer.response["allowed"] is False and answer.decision.preempts is None


def test_a_create_retried_under_the_same_name_is_not_judged_against_its_own_reservation() -> None:
    """Zone B has 9 warm IPs, no subnet address, and a reserve of 8: one pod IP to give. The pod is admitted and
    holds it; its create is then refused by a later admission step (a quota) and retried under the same name at
    once: judged without its own first reservation, it is admitted again, and it still holds exactly one.
    Another pod is then denied."""
    index = fixture_cluster(free=0)
    state = AdmissionState(index, Settings(zone_reserves={B: 8}))
    for _ in range(2):
        answer = handle(parse_review(_zone_pod(B)), "validate", state)
        assert answer.response["allowed"] is True and answer.reservation == "held"
        assert [r.key for r in index.reservations()] == ["payments/api-7d9c8b6f5d-hpsl2"]
    other = json.loads(_zone_pod(B))
    other["request"]["name"] = other["request"]["object"]["metadata"]["name"] = "api-7d9c8b6f5d-other"
    assert handle(parse_review(json.dumps(other).encode()), "validate", state).response["allowed"] is False


def test_a_review_from_outside_the_control_plane_moves_no_reservation() -> None:
    """A pod's reservation is held; a made-up review under its name from a caller outside the control plane
    (answered with reserve=False) neither takes one nor releases the real pod's: the zone's last IP stays held,
    and another pod is still denied."""
    index = fixture_cluster(free=0)
    state = AdmissionState(index, Settings(zone_reserves={B: 8}))
    assert handle(parse_review(_zone_pod(B)), "validate", state).reservation == "held"
    made_up = handle(parse_review(_zone_pod(B)), "validate", state, reserve=False)
    assert made_up.reservation is None
    assert [r.key for r in index.reservations()] == ["payments/api-7d9c8b6f5d-hpsl2"]
    other = json.loads(_zone_pod(B))
    other["request"]["name"] = other["request"]["object"]["metadata"]["name"] = "api-7d9c8b6f5d-other"
    assert handle(parse_review(json.dumps(other).encode()), "validate", state).response["allowed"] is False
