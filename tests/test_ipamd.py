"""ipamd's rules (webhook.model.ipamd) against hand-worked figures and ipamd's own code paths.

m5.large: 3 ENIs x 10 IPv4 each, so 9 secondary slots per ENI, 27 pod IPs (432 under prefix delegation).
Each test cites the ipamd function (aws/amazon-vpc-cni-k8s pkg/ipamd/ipamd.go) whose rule it pins.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhook.model.cni import CniSettings
from webhook.model.ipamd import (
    GrowthCost,
    HeldAddresses,
    Rules,
    growth_cost,
    growth_units,
    new_eni_request,
    new_node_cost,
    node_grows,
    predict_held,
    prefix_delegation_on,
)
from webhook.model.limits import LimitsTable, pod_ip_capacity, uses_prefixes

TABLE = LimitsTable()
M5L = TABLE.get("m5.large")


def _slots(held: HeldAddresses) -> tuple[int, int]:
    return held.ips, held.prefixes


# ---- predict_held: WARM_ENI_TARGET ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("assigned", "held"),
    [(0, 9), (1, 18), (8, 18), (9, 18), (10, 27), (18, 27), (19, 27), (25, 27), (27, 27)],
)
def test_warm_eni_target_1(assigned: int, held: int) -> None:
    cni = CniSettings.from_env({"WARM_ENI_TARGET": "1"})
    assert _slots(predict_held(assigned, M5L, cni)) == _slots(HeldAddresses(held))


@pytest.mark.parametrize(("assigned", "held"), [(0, 18), (1, 27), (9, 27), (10, 27)])
def test_warm_eni_target_2(assigned: int, held: int) -> None:
    assert predict_held(assigned, M5L, CniSettings(warm_eni_target=2)).ips == held


@pytest.mark.parametrize(("assigned", "held"), [(0, 9), (1, 9), (8, 9), (9, 18), (10, 18)])
def test_warm_eni_target_0_keeps_one_free_ip(assigned: int, held: int) -> None:
    """isDatastorePoolTooLow: with WARM_ENI_TARGET=0 the pool is low when no IP is free (`warmTarget == 0 &&
    available == 0`), and tryAssignIPs then fills a whole ENI: the pool never sits at zero free IPs."""
    assert predict_held(assigned, M5L, CniSettings(warm_eni_target=0)).ips == held


def test_warm_eni_target_t3_medium() -> None:
    # 5 secondary IPs per ENI, 3 ENIs.
    t3 = TABLE.get("t3.medium")
    assert [predict_held(a, t3, CniSettings()).ips for a in (0, 1, 5, 6, 11, 15)] == [5, 10, 10, 15, 15, 15]


# ---- predict_held: WARM_IP_TARGET / MINIMUM_IP_TARGET -----------------------------------------------------


@pytest.mark.parametrize(("assigned", "held"), [(0, 5), (1, 6), (10, 15), (22, 27), (23, 27), (27, 27)])
def test_warm_ip_target(assigned: int, held: int) -> None:
    cni = CniSettings.from_env({"WARM_IP_TARGET": "5"})
    assert _slots(predict_held(assigned, M5L, cni)) == _slots(HeldAddresses(held))


@pytest.mark.parametrize(("assigned", "held"), [(0, 10), (2, 10), (10, 10), (11, 10), (27, 10)])
def test_minimum_ip_target_alone_never_grows_past_the_minimum(assigned: int, held: int) -> None:
    """datastoreTargetState: with WARM_IP_TARGET unset (or 0) short = max(MINIMUM_IP_TARGET - total, 0), so once
    the node holds the minimum isDatastorePoolTooLow never fires again; pods past it get no IP."""
    cni = CniSettings.from_env({"MINIMUM_IP_TARGET": "10"})
    assert predict_held(assigned, M5L, cni).ips == held


@pytest.mark.parametrize(("assigned", "held"), [(0, 10), (2, 10), (5, 10), (6, 11), (8, 13), (25, 27)])
def test_warm_and_minimum_ip_targets(assigned: int, held: int) -> None:
    cni = CniSettings.from_env({"WARM_IP_TARGET": "5", "MINIMUM_IP_TARGET": "10"})
    assert predict_held(assigned, M5L, cni).ips == held


def test_ip_targets_override_warm_eni_target() -> None:
    cni = CniSettings.from_env({"WARM_IP_TARGET": "2", "WARM_ENI_TARGET": "3"})
    assert predict_held(0, M5L, cni).ips == 2
    assert predict_held(4, M5L, cni).ips == 6


# ---- predict_held: prefix delegation ----------------------------------------------------------------------

PD = {"ENABLE_PREFIX_DELEGATION": "true"}


@pytest.mark.parametrize(
    ("assigned", "prefixes"), [(0, 1), (1, 2), (15, 2), (16, 2), (17, 3), (32, 3), (33, 4), (420, 27), (432, 27)]
)
def test_warm_prefix_target_1(assigned: int, prefixes: int) -> None:
    cni = CniSettings.from_env({**PD, "WARM_PREFIX_TARGET": "1"})
    assert _slots(predict_held(assigned, M5L, cni)) == _slots(HeldAddresses(prefixes * 16, prefixes))


def test_warm_prefix_target_2() -> None:
    cni = CniSettings.from_env({**PD, "WARM_PREFIX_TARGET": "2"})
    assert [predict_held(a, M5L, cni).prefixes for a in (0, 1, 16, 17)] == [2, 3, 3, 4]


@pytest.mark.parametrize(("assigned", "prefixes"), [(0, 1), (11, 1), (12, 2), (27, 2), (28, 3), (430, 27)])
def test_prefix_delegation_with_warm_ip_target(assigned: int, prefixes: int) -> None:
    # max(assigned + 5, 0) addresses, in whole /28s
    cni = CniSettings.from_env({**PD, "WARM_IP_TARGET": "5"})
    assert _slots(predict_held(assigned, M5L, cni)) == _slots(HeldAddresses(prefixes * 16, prefixes))


def test_prefix_delegation_with_minimum_ip_target() -> None:
    cni = CniSettings.from_env({**PD, "MINIMUM_IP_TARGET": "20", "WARM_IP_TARGET": "1"})
    assert _slots(predict_held(0, M5L, cni)) == _slots(HeldAddresses(32, 2))
    assert _slots(predict_held(31, M5L, cni)) == _slots(HeldAddresses(32, 2))
    assert _slots(predict_held(32, M5L, cni)) == _slots(HeldAddresses(48, 3))


def test_prefix_delegation_on_non_nitro_falls_back_to_ips() -> None:
    m4 = TABLE.get("m4.large")  # 2 ENIs x 9 slots, no prefixes
    cni = CniSettings.from_env(PD)
    assert _slots(predict_held(0, m4, cni)) == _slots(HeldAddresses(9, 0))
    assert _slots(predict_held(10, m4, cni)) == _slots(HeldAddresses(18, 0))


# ---- predict_held: capacity-reducing modes ----------------------------------------------------------------


def test_custom_networking_reduces_the_cap() -> None:
    cni = CniSettings.from_env({"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true"})
    # 2 usable ENIs x 9: 18 at most
    assert [predict_held(a, M5L, cni).ips for a in (0, 1, 9, 10, 18)] == [9, 18, 18, 18, 18]
    cni_ip = CniSettings.from_env({"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true", "WARM_IP_TARGET": "5"})
    assert predict_held(15, M5L, cni_ip).ips == 18


def test_max_eni_and_pod_eni_reduce_the_cap() -> None:
    assert predict_held(9, M5L, CniSettings(max_eni=1)).ips == 9
    assert predict_held(9, M5L, CniSettings(pod_eni=True)).ips == 18
    assert predict_held(20, M5L, CniSettings(pod_eni=True, warm_ip_target=5)).ips == 18
    cni_pd = CniSettings(prefix_delegation=True, max_eni=1)
    assert _slots(predict_held(200, M5L, cni_pd)) == _slots(HeldAddresses(9 * 16, 9))


def test_negative_assigned_is_zero() -> None:
    assert predict_held(-3, M5L, CniSettings()) == predict_held(0, M5L, CniSettings())


# ---- properties -------------------------------------------------------------------------------------------

# A spread of real types: small, trunking and not, Nitro and not, big.
TYPES = ["m5.large", "t3.medium", "t3.nano", "m4.large", "t2.medium", "c5.18xlarge", "m5.xlarge", "c5.9xlarge"]

cni_settings = st.builds(
    CniSettings,
    prefix_delegation=st.booleans(),
    warm_eni_target=st.integers(0, 4),
    warm_ip_target=st.one_of(st.none(), st.integers(0, 40)),
    minimum_ip_target=st.one_of(st.none(), st.integers(0, 60)),
    warm_prefix_target=st.integers(0, 4),
    custom_networking=st.booleans(),
    max_eni=st.one_of(st.none(), st.integers(1, 16)),
    pod_eni=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(TYPES), cni=cni_settings, data=st.data())
def test_held_properties(name: str, cni: CniSettings, data: st.DataObject) -> None:
    limits = TABLE.get(name)
    capacity = pod_ip_capacity(limits, cni.mode)
    assigned = data.draw(st.integers(0, capacity + 20), label="assigned")
    held = predict_held(assigned, limits, cni)
    assert 0 <= held.ips <= capacity
    minimum_only = bool(cni.minimum_ip_target) and not cni.warm_ip_target
    if assigned <= capacity and not minimum_only:
        assert held.ips >= assigned
    more = predict_held(assigned + 1, limits, cni)
    assert more.ips >= held.ips, "held is monotone in assigned"
    if uses_prefixes(limits, cni.mode):
        assert held.ips % 16 == 0
        assert held.ips == held.prefixes * 16
    else:
        assert held.prefixes == 0


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(TYPES), cni=cni_settings)
def test_held_monotone_over_whole_range(name: str, cni: CniSettings) -> None:
    limits = TABLE.get(name)
    capacity = pod_ip_capacity(limits, cni.mode)
    figures = [predict_held(a, limits, cni).ips for a in range(0, capacity + 2)]
    assert figures == sorted(figures)
    if not (cni.minimum_ip_target and not cni.warm_ip_target):
        assert all(figures[a] >= a for a in range(0, capacity + 1))


# ---- growth: what a node asks of its subnet ---------------------------------------------------------------

T3M = TABLE.get("t3.medium")  # 3 ENIs x 6 IPv4: 5 secondary IPs per ENI


def test_full_node_needs_a_whole_eni_from_the_subnet() -> None:
    """tryAllocateENI -> createENI: a node whose attached ENIs are full gets another IP only through a new ENI,
    which asks for its primary address plus I - 1 secondaries at once (WARM_ENI_TARGET), with no fallback."""
    held = HeldAddresses(10, 0, 2)
    cost = growth_cost(1, held, T3M, CniSettings())
    assert cost == GrowthCost(addresses=6, blocks=0, new_enis=1)


def test_free_slot_on_an_attached_eni_costs_one_address() -> None:
    """tryAssignIPs: on an attached ENI with free slots ipamd falls back to asking for one IP."""
    held = HeldAddresses(7, 0, 2)
    assert growth_cost(1, held, T3M, CniSettings()) == GrowthCost(1, 0, 0)
    # 3 free slots, then a new ENI for the 4th IP
    assert growth_cost(4, held, T3M, CniSettings()) == GrowthCost(3 + 6, 0, 1)


def test_eni_request_under_warm_ip_target_is_the_shortfall() -> None:
    """GetENIResourcesToAllocate: min(short, I - 1) secondaries under WARM_IP_TARGET/MINIMUM_IP_TARGET."""
    cni = CniSettings(warm_ip_target=2)
    assert new_eni_request(10, 10, T3M, cni) == 2
    assert growth_cost(1, HeldAddresses(10, 0, 2), T3M, cni) == GrowthCost(3, 0, 1)


def test_prefix_delegation_new_eni_takes_one_address_and_whole_blocks() -> None:
    """createENI under prefix delegation: Ipv4PrefixCount prefixes (at least one) plus the ENI's primary."""
    cni = CniSettings(prefix_delegation=True, warm_prefix_target=1)
    full = HeldAddresses(9 * 16, 9, 1)  # m5.large primary ENI full of prefixes
    assert growth_cost(1, full, M5L, cni) == GrowthCost(1, 1, 1)
    assert growth_cost(1, HeldAddresses(32, 2, 1), M5L, cni) == GrowthCost(0, 1, 0)


def test_eni_slots_full_means_no_growth() -> None:
    assert growth_cost(1, HeldAddresses(15, 0, 3), T3M, CniSettings()) is None


def test_minimum_ip_target_alone_stops_growth() -> None:
    """isDatastorePoolTooLow via datastoreTargetState: short is 0 once the minimum is held."""
    cni = CniSettings(minimum_ip_target=10)
    held = HeldAddresses(10, 0, 2)
    assert not node_grows(held, 10, M5L, cni, max_pods=29, cordoned=False)
    assert node_grows(HeldAddresses(10, 0, 2), 10, M5L, CniSettings(minimum_ip_target=10, warm_ip_target=1),
                      max_pods=29, cordoned=False)


def test_cordoned_node_does_not_grow_unless_ipamd_manages_it() -> None:
    """isENIAttachmentAllowed: no new IP or ENI on an unschedulable node unless AWS_MANAGE_ENIS_NON_SCHEDULABLE."""
    held = HeldAddresses(9, 0, 1)
    assert not node_grows(held, 9, M5L, CniSettings(), max_pods=29, cordoned=True)
    assert node_grows(held, 9, M5L, CniSettings(manage_enis_non_schedulable=True), max_pods=29, cordoned=True)
    assert node_grows(held, 9, M5L, CniSettings(), max_pods=29, cordoned=False)


def test_growth_stops_at_max_pods_ips() -> None:
    """isDatastorePoolTooLow: never low once the node holds max-pods IPs; a node at 96 of 110 pods holding 7
    /28s (112 IPs) takes no 8th under WARM_PREFIX_TARGET=1."""
    m5x = TABLE.get("m5.xlarge")
    cni = CniSettings(prefix_delegation=True, warm_prefix_target=1)
    assert predict_held(96, m5x, cni, max_pods=110).prefixes == 7
    assert predict_held(100, m5x, cni, max_pods=110).prefixes == 7
    assert predict_held(96, m5x, cni).prefixes == 7
    assert predict_held(97, m5x, cni).prefixes == 8
    assert not node_grows(HeldAddresses(112, 7, 1), 112, m5x, cni, max_pods=110, cordoned=False)


def test_prefix_delegation_falls_back_to_secondary_ips_on_non_nitro() -> None:
    """isConfigValid: ENABLE_PREFIX_DELEGATION on a non-Nitro type runs it on secondary IPs."""
    m4 = TABLE.get("m4.large")
    cni = CniSettings(prefix_delegation=True)
    assert not prefix_delegation_on(m4, cni)
    assert growth_cost(1, HeldAddresses(9, 0, 1), m4, cni) == GrowthCost(10, 0, 1)


def test_new_node_needs_its_primary_and_a_first_ip() -> None:
    """A new node launches with its primary address in the pod subnet; its primary ENI then gets one IP (the
    fallback); under custom networking its first pod waits for a whole ENI from the ENIConfig subnet."""
    assert new_node_cost(T3M, CniSettings()) == GrowthCost(2, 0, 0)
    assert new_node_cost(T3M, CniSettings(custom_networking=True)) == GrowthCost(6, 0, 1)
    assert new_node_cost(M5L, CniSettings(prefix_delegation=True)) == GrowthCost(1, 1, 0)


def test_a_new_eni_under_warm_ip_target_is_filled_after_its_request() -> None:
    """GetENIResourcesToAllocate asks for min(short, I - 1) at creation; tryAssignIPs then fills that ENI, one IP
    at a time if need be: 8 more IPs on an m5.2xlarge whose 2 ENIs are full take one ENI (its primary and 8
    IPs), not two ENIs of 5."""
    m5 = TABLE.get("m5.2xlarge")  # 4 ENIs x 15 IPv4: 14 slots per ENI
    cni = CniSettings(warm_ip_target=5)
    full = HeldAddresses(28, 0, 2)
    assert growth_cost(8, full, m5, cni) == GrowthCost(9, 0, 1)
    assert growth_cost(1, full, m5, cni) == GrowthCost(6, 0, 1)  # the request, at once
    assert growth_cost(16, full, m5, cni) == GrowthCost(15 + 6, 0, 2)


@settings(max_examples=300, deadline=None)
@given(
    instance_type=st.sampled_from(["t3.medium", "m5.large", "m5.2xlarge", "m4.large", "c5.18xlarge"]),
    cni=st.sampled_from([CniSettings(), CniSettings(warm_ip_target=5, minimum_ip_target=10),
                         CniSettings(prefix_delegation=True), CniSettings(minimum_ip_target=10)]),
    calls=st.lists(st.tuples(st.integers(0, 120), st.integers(0, 40), st.integers(0, 3), st.booleans(),
                             st.sampled_from([None, 17, 58, 110])), min_size=1, max_size=30),
)
def test_remembered_rules_answer_as_the_rules_do(instance_type: str, cni: CniSettings,
                                                 calls: list[tuple[int, int, int, bool, int | None]]) -> None:
    """`Rules` remembers answers by their arguments; whatever the order of calls, and across its bound (here 4
    entries), each answer is the rule's own."""
    limits = TABLE.get(instance_type)
    rules = Rules(cni, limit=4)
    for assigned, waiting, cooling, cordoned, max_pods in calls:
        held = rules.predict_held(assigned, limits, max_pods)
        assert held == predict_held(assigned, limits, cni, max_pods)
        assert rules.node_grows(held, assigned, limits, max_pods, cordoned, cooling) == node_grows(
            held, assigned, limits, cni, max_pods=max_pods, cordoned=cordoned, cooling=cooling)
        assert rules.growth_units(waiting, assigned, held, limits) == growth_units(waiting, assigned, held, limits,
                                                                                   cni)
