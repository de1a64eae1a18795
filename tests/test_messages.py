"""The texts people read: denial messages (what kubectl prints), warnings, and audit annotations.

Warnings are one printable-ASCII line of at most 120 characters (the apiserver silently drops a warning with a
newline or tab, and cuts past 4096 characters per response). Audit annotation keys never contain `/` (the
apiserver prefixes `<webhook name>/` and drops such keys). A denial names the pod, every allowed zone with its
free pod IPs, reserve and subnets, and what to do about it.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_server_e2e import ADMISSION_FIXTURES, NODES, SUBNETS, A, B, C, fixture_body, fixture_review
from webhook.admission.handler import AdmissionState, handle
from webhook.admission.messages import (
    WARNING_MAX,
    audit_annotations,
    clean_warning,
    denial_message,
    denial_warnings,
    steer_warning,
)
from webhook.admission.wire import parse_review
from webhook.model.cni import CniSettings
from webhook.model.config import Mode, Settings
from webhook.model.decide import Decision, NodeCheck, Verdict, ZoneCheck, decide
from webhook.model.index import CapacityIndex, PodUse
from webhook.model.limits import LimitsTable

ASCII_LINE = re.compile(r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")  # printable, no edge spaces
AUDIT_KEY = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")  # a qualified name without prefix


def cluster(
    free: dict[str, int] | None = None,
    pods: dict[str, int] | None = None,
    held: dict[str, int] | None = None,
    cni: CniSettings | None = None,
) -> CapacityIndex:
    free = {A: 100, B: 100, C: 100, **(free or {})}
    index = CapacityIndex(LimitsTable(), cni or CniSettings())
    for name, zone, instance_type, allocatable in NODES:
        index.upsert_node(name, zone=zone, instance_type=instance_type, pod_subnet=SUBNETS[zone],
                          allocatable_pods=allocatable)
        for i in range((pods or {}).get(name, 0)):
            index.upsert_pod(f"apps/{name}-{i}", name, PodUse.IP)
        if held and name in held:
            index.set_node_held(name, held[name])
    for zone, subnet in SUBNETS.items():
        index.upsert_subnet(subnet, zone=zone, free_ips=free[zone])
    return index


def subnet_limited(cni: CniSettings | None = None) -> CapacityIndex:
    """Empty subnets, nodes holding no spare IP, plenty of pod room on the nodes."""
    pods = {name: 3 for name, *_ in NODES}
    return cluster(free={A: 0, B: 0, C: 0}, pods=pods, held=pods, cni=cni)


def node_limited(cni: CniSettings | None = None) -> CapacityIndex:
    """Every node full to its pod-IP capacity; subnets down to 2 addresses (no more than the reserve), so new
    nodes would not help either. (Full nodes with subnet addresses left are not denied: new nodes can take
    the pod.)"""
    probe = cluster(cni=cni)
    pods = {name: probe.nodes[name].capacity for name, *_ in NODES}
    return cluster(pods=pods, cni=cni, free={A: 2, B: 2, C: 2})


def pod(name: str = "deny-403.validate.json") -> dict[str, Any]:
    return copy.deepcopy(fixture_review(name)["request"]["object"])


def deny(index: CapacityIndex, obj: dict[str, Any] | None = None, reserve: int = 2) -> Decision:
    decision = decide(obj or pod(), index, Settings(zone_reserve=reserve), namespace="payments")
    assert decision.verdict is Verdict.DENY, decision
    return decision


# ---- warnings ----------------------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=400))
def test_clean_warning_is_one_short_ascii_line(text: str) -> None:
    line = clean_warning(text)
    assert len(line) <= WARNING_MAX
    assert line == "" or ASCII_LINE.fullmatch(line), repr(line)
    assert clean_warning(line) == line  # stable
    if len(text) <= WARNING_MAX and ASCII_LINE.fullmatch(text) and "  " not in text:
        assert line == text  # a good line passes unchanged


def test_clean_warning_examples() -> None:
    # The texts of the captured warnings fixture: non-ASCII, newline, tab, quotes, over-long.
    assert clean_warning("ipguard: zone us\u2011east\u20111a \u2014 0 free IPs \u2713 caf\u00e9 \u65e5\u672c") == (
        "ipguard: zone us east 1a 0 free IPs caf")
    assert clean_warning("line one\nline two\tand\r\nthree") == "line one line two and three"
    assert clean_warning('ipguard: "quoted" and back\\slash') == 'ipguard: "quoted" and back\\slash'
    long = clean_warning("ipguard: " + "x" * 300)
    assert len(long) == WARNING_MAX and long.endswith("...")
    assert clean_warning("\n\t ") == ""


@settings(max_examples=200, deadline=None)
@given(
    pod_name=st.text(min_size=1, max_size=253),
    zones=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=8),
    nodes=st.lists(st.text(min_size=1, max_size=80), max_size=30),
    headroom=st.integers(-50, 10_000),
)
def test_every_warning_is_one_short_ascii_line(pod_name: str, zones: list[str], nodes: list[str],
                                               headroom: int) -> None:
    checks = tuple(ZoneCheck(z, headroom, 3, headroom, 1, 2, 0, ("subnet-1",)) for z in zones)
    node = NodeCheck(nodes[0] if nodes else "n", zones[0], True, 0, 0, 0, 0, 0, False)
    decisions = [
        Decision(Verdict.DENY, pod_name, "every allowed zone is out of pod IPs", zones=checks),
        Decision(Verdict.DENY, pod_name, "node full", node=node),
        Decision(Verdict.STEER, pod_name, "r", zones=checks, avoid_zones=tuple(zones), avoid_nodes=tuple(nodes)),
    ]
    for decision in decisions:
        lines = [*denial_warnings(decision), steer_warning(decision)]
        for line in lines:
            assert len(line) <= WARNING_MAX and ASCII_LINE.fullmatch(line), repr(line)
        assert len(lines) * (WARNING_MAX + 20) < 4096 or len(lines) > 20  # a response stays under the cap


# ---- audit annotations --------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    verdict=st.sampled_from(list(Verdict)),
    zones=st.lists(st.text(min_size=1, max_size=20), max_size=4),
    nodes=st.lists(st.text(max_size=20), max_size=3),
    pinned=st.booleans(),
    stale=st.booleans(),
    mode=st.sampled_from([m.value for m in Mode]),
    outcome=st.text(max_size=20),
)
def test_audit_annotation_keys_never_contain_a_slash(
    verdict: Verdict, zones: list[str], nodes: list[str], pinned: bool, stale: bool, mode: str, outcome: str
) -> None:
    checks = tuple(ZoneCheck(z, 1, 1, 1, 1, 1, 0, ()) for z in zones)
    node = NodeCheck("n/1", "z/1", True, 0, 0, 0, 0, 0, False) if pinned else None
    decision = Decision(verdict, "ns/pod", "a/b", zones=checks, avoid_zones=tuple(zones), avoid_nodes=tuple(nodes),
                        node=node, stale=stale)
    notes = audit_annotations(decision, mode, outcome)
    for key, value in notes.items():
        assert AUDIT_KEY.match(key) and "/" not in key, key
        assert isinstance(value, str)
    assert notes["decision"] == verdict.value and notes["mode"] == mode and notes["outcome"] == outcome


@pytest.mark.parametrize("exhausted", [(), (A,), (A, B, C)])
@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
def test_handler_texts_for_every_fixture(exhausted: tuple[str, ...], mode: Mode) -> None:
    held = {name: 0 for name, zone, *_ in NODES if zone in exhausted}
    index = cluster(free={z: 0 for z in exhausted}, held=held, cni=CniSettings(pod_eni=True))
    state = AdmissionState(index, Settings(mode=mode, zone_reserve=2))
    for name in ADMISSION_FIXTURES:
        answer = handle(parse_review(fixture_body(name)), "mutate" if ".mutate" in name else "validate", state)
        response = answer.response
        for warning in response.get("warnings", []):
            assert len(warning) <= WARNING_MAX and ASCII_LINE.fullmatch(warning), warning
        for key in response.get("auditAnnotations", {}):
            assert AUDIT_KEY.match(key), key
        if not response["allowed"]:
            message = response["status"]["message"]
            assert "\n" not in message and "\t" not in message
            assert answer.decision.pod in message


# ---- denial messages ---------------------------------------------------------------------------------------


def test_denial_message_when_subnets_ran_out() -> None:
    decision = deny(subnet_limited())
    message = denial_message(decision, CniSettings())
    assert message.startswith("ipguard: pod payments/deny-403 cannot get a pod IP in any zone it may run in: ")
    for zone, subnet in SUBNETS.items():
        assert f"{zone}: 0 free pod IPs, reserve 2" in message
        assert f"subnet {subnet}: 0 free" in message
    assert "warm IPs 0" in message
    # What ran out is subnet space: more addresses, fewer idle ones held by the warm pool.
    assert "add pod subnet space" in message
    assert "WARM_IP_TARGET" in message and "WARM_ENI_TARGET" in message
    assert "prefix delegation" not in message  # nodes have room: more IPs per node is not the fix
    # With IP targets already in use, the advice is to lower them.
    message = denial_message(deny(subnet_limited(CniSettings(warm_ip_target=5))), CniSettings(warm_ip_target=5))
    assert "lower WARM_IP_TARGET/MINIMUM_IP_TARGET" in message
    assert "\n" not in message


def test_denial_message_when_nodes_are_full() -> None:
    decision = deny(node_limited())
    message = denial_message(decision, CniSettings())
    for zone in (A, B, C):
        # no pod IP on the nodes; the subnet's few addresses a new node could use are kept back by the reserve
        assert f"{zone}: 0 free pod IPs, all kept back by its reserve of 2 (node room 0" in message
    assert "lower zoneReserve" in message
    # the subnets are down to the reserve too: neither new nodes nor prefixes would get an address, so the
    # subnet is the fix
    assert "add nodes" not in message and "enable prefix delegation" not in message
    assert "add pod subnet space" in message
    prefix = CniSettings(prefix_delegation=True)
    assert "enable prefix delegation" not in denial_message(decision, prefix)


def test_denial_message_for_a_single_zone_pod() -> None:
    obj = pod("pod-create-nodeselector.validate.json")  # nodeSelector zone us-east-1b
    message = denial_message(deny(subnet_limited(), obj), CniSettings())
    assert "payments/zone-b" in message and f"{B}: 0 free pod IPs" in message
    assert A not in message and C not in message
    assert "or let the pod run in more zones" in message


def test_denial_message_for_a_pinned_pod() -> None:
    obj = pod("pod-create-nodename.validate.json")
    node = obj["spec"]["nodeName"]
    message = denial_message(deny(subnet_limited(), obj), CniSettings())
    assert message.startswith("ipguard: pod payments/pinned is pinned by spec.nodeName")
    assert f"node {node} ({A})" in message and "reserve" in message
    assert "remove spec.nodeName" in message


def test_denial_message_for_a_branch_eni_pod() -> None:
    obj = pod("pod-create-pod-eni.validate.json")
    decision = deny(cluster(cni=CniSettings(pod_eni=True), free={A: 0, B: 0, C: 0}), obj)
    assert decision.use is PodUse.BRANCH
    message = denial_message(decision, CniSettings(pod_eni=True))
    assert "a branch ENI (security groups for pods)" in message and "payments/sg-pod" in message
    assert "trunking-capable" in message


@settings(max_examples=60, deadline=None)
@given(
    free=st.fixed_dictionaries({z: st.integers(0, 30) for z in (A, B, C)}),
    fill=st.fixed_dictionaries({name: st.integers(0, 60) for name, *_ in NODES}),
    reserve=st.integers(0, 40),
    fixture=st.sampled_from(["deny-403.validate.json", "pod-create-nodeselector.validate.json",
                             "pod-create-affinity.validate.json", "pod-create-nodename.validate.json"]),
)
def test_any_denial_names_pod_zones_figures_and_remedies(
    free: dict[str, int], fill: dict[str, int], reserve: int, fixture: str
) -> None:
    probe = cluster()
    pods = {name: min(fill[name], probe.nodes[name].capacity) for name in fill}
    index = cluster(free=free, pods=pods, held=pods)
    obj = pod(fixture)
    decision = decide(obj, index, Settings(zone_reserve=reserve), namespace="payments")
    if decision.verdict is not Verdict.DENY:
        return
    message = denial_message(decision, CniSettings())
    assert "\n" not in message and "\t" not in message
    assert message.startswith(f"ipguard: pod payments/{obj['metadata']['name']} ")
    if decision.node is None:
        assert decision.zones
        for check in decision.zones:
            if check.headroom > 0 or check.addresses > 0:  # free, but kept back by the reserve: said so
                phrase = f"{check.zone}: {max(check.headroom, 0)} free pod IPs, all kept back by its reserve of "
                assert phrase + str(reserve) in message
                assert "lower zoneReserve" in message
            else:
                assert f"{check.zone}: {max(check.headroom, 0)} free pod IPs, reserve {reserve}" in message
            assert SUBNETS[check.zone] in message
    else:
        assert decision.node.node in message
    assert "Fix: " in message
    fixes = message.split("Fix: ", 1)[1]
    assert any(word in fixes for word in ("prefix delegation", "subnet", "WARM_", "add nodes"))
