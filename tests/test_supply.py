"""How a subnet's free addresses fall among its nodes' growth units (webhook.model.supply), as properties:
whatever the units, the answer never exceeds what is wanted or what the addresses can fund, more addresses
never give fewer pods, and a pod is served exactly when one unit it needs can be paid for whole."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from webhook.model.limits import PREFIX_SIZE
from webhook.model.supply import Demand, UnitKind, subnet_yield

# attached slots (1 address or 1 block per slot) and new ENIs (primary + slots, created with their request; or
# 1 address + blocks)
KINDS: list[UnitKind] = [(1, 0, 1, 1), (0, 1, 16, 16), (6, 0, 5, 5), (10, 0, 9, 9), (15, 0, 14, 14),
                         (15, 0, 14, 5), (10, 0, 9, 2), (1, 1, 16, 16), (1, 2, 32, 32)]


@st.composite
def demands(draw: st.DrawFn) -> dict[UnitKind, Demand]:
    result: dict[UnitKind, Demand] = {}
    for kind in draw(st.lists(st.sampled_from(KINDS), unique=True, max_size=4)):
        gain = kind[2]
        units = draw(st.integers(1, 6))
        ips = draw(st.integers(1, units * gain))
        wait_ips = draw(st.integers(0, ips))
        result[kind] = Demand(-(-wait_ips // gain), wait_ips, -(-ips // gain), ips - wait_ips)
    return result


def cost(kind: UnitKind) -> int:
    """The least a unit can be funded with: a new ENI with secondary IPs needs its primary and its request."""
    return kind[0] - (kind[2] - kind[3]) + PREFIX_SIZE * kind[1]


@settings(max_examples=400, deadline=None)
@given(demand=demands(), addresses=st.integers(0, 200), blocks=st.integers(0, 12))
def test_yield_is_bounded_by_demand_and_supply(demand: dict[UnitKind, Demand], addresses: int, blocks: int) -> None:
    blocks = min(blocks, addresses // PREFIX_SIZE)
    got = subnet_yield(addresses, blocks, demand)
    assert 0 <= got.new_ips <= sum(d.new_ips for d in demand.values())
    assert 0 <= got.waiting_served <= sum(d.wait_ips for d in demand.values())
    # every IP served came with its unit's whole cost
    spent = addresses - got.addresses_left
    assert 0 <= spent <= addresses
    assert got.addresses_left >= 0 and got.blocks_left >= 0


@settings(max_examples=400, deadline=None)
@given(demand=demands(), addresses=st.integers(0, 200), more=st.integers(1, 60))
def test_more_addresses_never_serve_fewer_pods(demand: dict[UnitKind, Demand], addresses: int, more: int) -> None:
    """Monotone for the waiting pods; for new pods too when none wait (a waiting pod's node may take an ENI
    that more addresses make affordable, before new pods: ipamd is already asking for it)."""
    def served(a: int) -> tuple[int, int]:
        got = subnet_yield(a, a // PREFIX_SIZE, demand)
        return got.waiting_served, got.new_ips

    assert served(addresses + more)[0] >= served(addresses)[0]
    if not any(d.wait_ips for d in demand.values()):
        assert served(addresses + more)[1] >= served(addresses)[1]


@settings(max_examples=400, deadline=None)
@given(demand=demands(), addresses=st.integers(0, 200))
def test_a_pod_is_served_exactly_when_a_unit_can_be_paid_whole(demand: dict[UnitKind, Demand], addresses: int) -> None:
    """No fallback to fewer at ENI creation: below the cheapest unit's whole cost nothing is served."""
    blocks = addresses // PREFIX_SIZE
    got = subnet_yield(addresses, blocks, demand)
    affordable = any(cost(k) <= addresses and k[1] <= blocks for k in demand)
    assert (got.new_ips + got.waiting_served > 0) == affordable


def test_a_full_t3_medium_and_five_free_addresses() -> None:
    """createENI asks for the primary and 5 secondaries at once: 5 free addresses serve nothing, 6 serve 5."""
    eni: UnitKind = (6, 0, 5, 5)
    demand = {eni: Demand(0, 0, 1, 5)}
    assert subnet_yield(5, 0, demand).new_ips == 0
    assert subnet_yield(6, 0, demand).new_ips == 5


def test_a_new_eni_under_warm_ip_target_fills_one_ip_at_a_time_after_its_request() -> None:
    """GetENIResourcesToAllocate asks for min(short, I - 1) at creation (5 under WARM_IP_TARGET=5 on an
    m5.2xlarge, 14 slots); tryAssignIPs then adds IPs to it, one at a time if need be, while addresses last."""
    eni: UnitKind = (15, 0, 14, 5)
    demand = {eni: Demand(0, 0, 2, 28)}
    assert [subnet_yield(a, 0, demand).new_ips for a in (5, 6, 10, 15, 16, 21, 30)] == [0, 5, 9, 14, 14, 19, 28]
