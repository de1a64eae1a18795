"""SecurityGroupPolicy matching and quota math (model/labels.py, model/sgp.py): selector semantics against a
reference implementation, the controller's matching rules, and the quota edges."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhook.model.labels import LabelSelector, SelectorError, parse_selector
from webhook.model.sgp import (
    PolicyContext,
    PolicyStore,
    parse_policy,
    pod_group_findings,
    policy_findings,
    union_excesses,
)
from webhook.model.vpc import GroupRules, Quotas, VpcFacts

KEYS = ["app", "tier", "team", "env"]
VALUES = ["a", "b", "c"]


def reference_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """LabelSelector as the Kubernetes API reference states it, written independently of the model: the
    result of each matchLabels entry and each expression, ANDed; an empty selector selects everything."""
    results = [labels.get(key) == value for key, value in (selector.get("matchLabels") or {}).items()]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], set(expr.get("values") or [])
        has = key in labels
        table = {
            "In": has and labels.get(key) in values,
            "NotIn": (not has) or labels.get(key) not in values,
            "Exists": has,
            "DoesNotExist": not has,
        }
        results.append(table[op])
    return all(results)


labels_st = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=4)


@st.composite
def selectors(draw: st.DrawFn) -> dict[str, Any]:
    selector: dict[str, Any] = {}
    if draw(st.booleans()):
        selector["matchLabels"] = draw(labels_st)
    exprs = []
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
        expr: dict[str, Any] = {"key": draw(st.sampled_from(KEYS)), "operator": op}
        if op in ("In", "NotIn"):
            expr["values"] = draw(st.lists(st.sampled_from(VALUES), min_size=1, max_size=3))
        exprs.append(expr)
    if exprs or draw(st.booleans()):
        selector["matchExpressions"] = exprs
    return selector


@settings(max_examples=400, deadline=None)
@given(selectors(), labels_st)
def test_selector_matches_like_the_reference(selector: dict[str, Any], labels: dict[str, str]) -> None:
    """matchLabels and matchExpressions (In/NotIn/Exists/DoesNotExist) ANDed, as metav1.LabelSelectorAsSelector."""
    assert parse_selector(selector).matches(labels) == reference_matches(selector, labels)


def test_empty_selector_matches_everything_and_notin_matches_a_missing_key() -> None:
    assert parse_selector({}).matches({}) and parse_selector({}).matches({"app": "x"})
    notin = parse_selector({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["batch"]}]})
    assert notin.matches({}) and notin.matches({"tier": "web"}) and not notin.matches({"tier": "batch"})


@pytest.mark.parametrize("expr", [
    {"key": "a", "operator": "In", "values": []},
    {"key": "a", "operator": "NotIn"},
    {"key": "a", "operator": "Exists", "values": ["x"]},
    {"key": "a", "operator": "DoesNotExist", "values": ["x"]},
    {"key": "a", "operator": "Equals", "values": ["x"]},
])
def test_selectors_the_conversion_refuses(expr: dict[str, Any]) -> None:
    """In/NotIn need values, Exists/DoesNotExist take none, other operators are errors."""
    with pytest.raises(SelectorError):
        parse_selector({"matchExpressions": [expr]})


def sgp(name: str, groups: list[str], pod: dict[str, Any] | None = None, sa: dict[str, Any] | None = None,
        namespace: str = "payments") -> dict[str, Any]:
    spec: dict[str, Any] = {"securityGroups": {"groupIds": groups}}
    if pod is not None:
        spec["podSelector"] = pod
    if sa is not None:
        spec["serviceAccountSelector"] = sa
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def test_policy_matching_follows_the_controller() -> None:
    """Both selectors must match when both are set; no selector, or no groups: skipped; a refused selector
    matches nothing (GetMatchingSecurityGroupForPods)."""
    both = parse_policy(sgp("both", ["sg-1"], {"matchLabels": {"app": "api"}}, {"matchLabels": {"team": "p"}}))
    assert both.matches({"app": "api"}, {"team": "p"})
    assert not both.matches({"app": "api"}, {"team": "q"})
    assert not both.matches({"app": "web"}, {"team": "p"})
    assert not both.matches({"app": "api"}, None)  # service account unknown
    assert not parse_policy(sgp("none", ["sg-1"])).matches({}, {})
    assert not parse_policy(sgp("nogroups", [], {})).matches({}, {})
    bad = parse_policy(sgp("bad", ["sg-1"], {"matchExpressions": [{"key": "a", "operator": "In"}]}))
    assert bad.errors and not bad.matches({"a": "x"}, {})
    assert parse_policy(sgp("all", ["sg-1"], {})).matches({"x": "y"}, None)
    assert parse_policy(sgp("dup", ["sg-1", "sg-2", "sg-1"], {})).groups == ("sg-1", "sg-2")


def groups(n: int, prefix: str = "sg-") -> list[str]:
    return [f"{prefix}{i:017x}" for i in range(n)]


def store_with(*policies: dict[str, Any], pods: int = 3) -> PolicyStore:
    store = PolicyStore()
    for raw in policies:
        store.put_policy(parse_policy(raw))
    store.put_service_account("payments", "api", {"team": "p"})
    for i in range(pods):
        store.put_pod(f"payments/api-{i}", "payments", ((("app", "api"),), "api"))
    return store


CONTEXT = PolicyContext(pod_eni=True, branch_room=10, data_stale=False, groups_current=False)


def codes(found: list[Any]) -> list[tuple[str, bool]]:
    return [(f.code, f.deny) for f in found]


@pytest.mark.parametrize(("count", "denied"), [(5, False), (6, True)])
def test_groups_per_eni_quota_edge(count: int, denied: bool) -> None:
    """5 groups fit the default quota of 5; 6 do not."""
    policy = parse_policy(sgp("p", groups(count), {"matchLabels": {"app": "api"}}))
    found = policy_findings(policy, store_with(), VpcFacts(), Quotas(), CONTEXT)
    assert (("too-many-groups", True) in codes(found)) is denied


@pytest.mark.parametrize(("shared", "denied"), [(1, False), (0, True)])
def test_union_of_three_and_three(shared: int, denied: bool) -> None:
    """Two policies of 3 groups select the same pods: sharing one group, the union is 5 (allowed); sharing
    none, 6 (denied), naming the pods and the other policy."""
    first = groups(3, "sg-a")
    second = first[:shared] + groups(3 - shared, "sg-b")
    store = store_with(sgp("first", first, {"matchLabels": {"app": "api"}}))
    policy = parse_policy(sgp("second", second, sa={"matchLabels": {"team": "p"}}))
    found = policy_findings(policy, store, VpcFacts(), Quotas(), CONTEXT)
    union = [f for f in found if f.code == "union-too-many-groups"]
    assert bool(union) is denied
    if denied:
        message = union[0].message
        assert "payments/first" in message and "3 pod(s) (api-0, api-1, api-2)" in message
        assert "union of 6 security groups" in message and "more than the 5" in message
        assert len(union[0].warning) <= 120


def test_union_is_judged_against_service_accounts_for_pods_to_come() -> None:
    """Service-account-only policies that select the same account overlap for every pod it will run."""
    store = store_with(sgp("first", groups(3, "sg-a"), sa={"matchLabels": {"team": "p"}}), pods=0)
    policy = parse_policy(sgp("second", groups(3, "sg-b"), sa={"matchExpressions": [
        {"key": "team", "operator": "Exists"}]}))
    excesses, selected = union_excesses(policy, store, 5)
    assert selected == 1 and excesses and excesses[0].account == "api"
    found = policy_findings(policy, store, VpcFacts(), Quotas(), CONTEXT)
    assert "the pods of service account(s) api" in next(f.message for f in found if f.deny)


def test_an_update_is_not_counted_twice() -> None:
    """On UPDATE the stored version of the same policy is not one of the 'others'."""
    raw = sgp("same", groups(4), {"matchLabels": {"app": "api"}})
    store = store_with(raw)
    found = policy_findings(parse_policy(raw), store, VpcFacts(), Quotas(), CONTEXT)
    assert not any(f.deny for f in found)


def vpc_with(*rules: GroupRules) -> VpcFacts:
    vpc = VpcFacts(vpc_id="vpc-0example", static=True)
    vpc.set_groups({r.group_id: r for r in rules})
    return vpc


@pytest.mark.parametrize(("rules", "warned", "word"), [
    (GroupRules("sg-1", inbound_ipv4=53), False, ""),
    (GroupRules("sg-1", inbound_ipv4=54), True, "within 10% of"),
    (GroupRules("sg-1", inbound_ipv4=60), True, "within 10% of"),
    (GroupRules("sg-1", outbound_ipv6=61), True, "over"),
    (GroupRules("sg-1", inbound_ipv4=40, inbound_ipv6=40), False, ""),  # IPv4 and IPv6 counted apart
])
def test_rules_per_group_quota_edges(rules: GroupRules, warned: bool, word: str) -> None:
    """Warn (never deny) at 90% of the 60 rules per direction and family; IPv4 and IPv6 apart."""
    policy = parse_policy(sgp("p", ["sg-1"], {"matchLabels": {"app": "api"}}))
    context = PolicyContext(True, 10, False, groups_current=True)
    found = policy_findings(policy, store_with(), vpc_with(rules), Quotas(), context)
    near = [f for f in found if f.code == "rules-near-quota"]
    assert bool(near) is warned and not any(f.deny for f in found)
    if warned:
        assert word in near[0].message and str(max(rules.counts().values())) in near[0].message


def test_unknown_group_denied_only_on_current_data() -> None:
    """A group not in the VPC's list is denied when the list is current; stale or missing data only warns."""
    policy = parse_policy(sgp("p", ["sg-1", "sg-0000000000000dead"], {"matchLabels": {"app": "api"}}))
    current = PolicyContext(True, 10, False, groups_current=True)
    found = policy_findings(policy, store_with(), vpc_with(GroupRules("sg-1")), Quotas(), current)
    assert codes(found)[0] == ("unknown-group", True)
    assert "sg-0000000000000dead do not exist in VPC vpc-0example" in found[0].message
    stale = PolicyContext(True, 10, False, groups_current=False)
    found = policy_findings(policy, store_with(), vpc_with(GroupRules("sg-1")), Quotas(), stale)
    assert not any(f.deny for f in found) and ("groups-unchecked", False) in codes(found)


def test_stale_pod_data_never_denies_a_union() -> None:
    store = store_with(sgp("first", groups(3, "sg-a"), {"matchLabels": {"app": "api"}}))
    policy = parse_policy(sgp("second", groups(3, "sg-b"), {"matchLabels": {"app": "api"}}))
    stale = PolicyContext(True, 10, data_stale=True, groups_current=False)
    found = policy_findings(policy, store, VpcFacts(), Quotas(), stale)
    assert ("union-too-many-groups", False) in codes(found) and not any(f.deny for f in found)


def test_warnings_for_pod_eni_off_no_branch_room_and_nothing_selected() -> None:
    policy = parse_policy(sgp("p", ["sg-1"], {"matchLabels": {"app": "reports"}}))
    off = policy_findings(policy, store_with(), VpcFacts(), Quotas(), PolicyContext(False, 0, False, False))
    assert ("pod-eni-off", False) in codes(off) and ("selects-nothing", False) in codes(off)
    no_room = policy_findings(policy, store_with(), VpcFacts(), Quotas(), PolicyContext(True, 0, False, False))
    assert ("no-branch-room", False) in codes(no_room)
    assert all(len(f.warning) <= 120 for f in off + no_room)


def test_a_branch_pods_union_names_its_policies() -> None:
    store = store_with(sgp("a", groups(3, "sg-a"), {"matchLabels": {"app": "api"}}),
                       sgp("b", groups(3, "sg-b"), sa={"matchLabels": {"team": "p"}}))
    pod = {"metadata": {"labels": {"app": "api"}}, "spec": {"serviceAccountName": "api"}}
    policies = store.pod_policies(pod, "payments")
    [finding] = pod_group_findings("payments/x", policies, Quotas())
    assert finding.deny and "SecurityGroupPolicies a, b" in finding.message and "6 security groups" in finding.message
    assert pod_group_findings("payments/x", policies, Quotas(groups_per_eni=6)) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["p1", "p2", "p3"]), st.sampled_from([0, 1, 2]), st.booleans()),
                max_size=30))
def test_pod_shape_counts_follow_adds_and_removes(events: list[tuple[str, int, bool]]) -> None:
    """The store's counts per shape equal a recount of the pods it holds, whatever the order of events."""
    store = PolicyStore()
    shapes = [((("app", "a"),), "default"), ((("app", "b"),), "default"), ((), "api")]
    live: dict[str, int] = {}
    for name, shape, add in events:
        key = f"ns/{name}"
        if add:
            store.put_pod(key, "ns", shapes[shape])
            live[key] = shape
        else:
            store.drop_pod(key)
            live.pop(key, None)
    expected: dict[Any, int] = {}
    for shape in live.values():
        expected[shapes[shape]] = expected.get(shapes[shape], 0) + 1
    assert {s: c.count for s, c in store.shapes.get("ns", {}).items()} == expected


def test_selector_describe() -> None:
    selector = parse_selector({"matchLabels": {"app": "api"}, "matchExpressions": [
        {"key": "tier", "operator": "In", "values": ["db", "cache"]}, {"key": "legacy", "operator": "DoesNotExist"}]})
    assert selector.describe() == "app=api,tier in (cache,db),!legacy"
    assert LabelSelector().describe() == "(everything)"
