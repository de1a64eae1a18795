"""The capacity index: hand-worked figures on a tiny cluster, reservations with a fake clock, and a stateful
property test that checks the incremental aggregates against a recount and against an independent model.

Hand-worked figures use the default CNI settings (secondary IPs, WARM_ENI_TARGET=1) and the formulas at the top
of webhook/model/index.py:
  m5.large: 3 ENIs x 9 slots = 27 pod IPs; held = min(27, 9 x (ceil(used / 9) + 1))
  t3.medium: 3 ENIs x 5 slots = 15 pod IPs; held = min(15, 5 x (ceil(used / 5) + 1))
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from webhook.model.cni import CniSettings
from webhook.model.index import CapacityIndex, PodUse, pod_key
from webhook.model.ipamd import HeldAddresses, predict_held
from webhook.model.limits import LimitsTable, UnknownInstanceType, pod_ip_capacity

TTL = 30.0


class Clock:
    def __init__(self) -> None:
        self.t = [0.0]

    def __call__(self) -> float:
        return self.t[0]

    def advance(self, seconds: float) -> None:
        self.t[0] += seconds


def tiny(clock: Clock | None = None, cni: CniSettings | None = None) -> CapacityIndex:
    """Zone za: a1 (m5.large) and a2 (t3.medium) on subnet sa (20 free). Zone zb: b1 (m5.large) with 12 IP pods
    and 2 host-network pods on subnet sb (0 free, measured with those pods in place)."""
    ix = CapacityIndex(cni=cni, clock=clock or Clock(), reservation_ttl=TTL)
    ix.upsert_node("a1", zone="za", instance_type="m5.large", pod_subnet="sa", allocatable_pods=29)
    ix.upsert_node("a2", zone="za", instance_type="t3.medium", pod_subnet="sa", allocatable_pods=17)
    ix.upsert_node("b1", zone="zb", instance_type="m5.large", pod_subnet="sb", allocatable_pods=29)
    for i in range(12):
        ix.upsert_pod(f"apps/b1-{i}", "b1", PodUse.IP)
    for i in range(2):
        ix.upsert_pod(f"kube-system/b1-host-{i}", "b1", PodUse.NONE)
    ix.upsert_subnet("sa", zone="za", cidr="10.0.1.0/24", free_ips=20)
    ix.upsert_subnet("sb", zone="zb", cidr="10.0.2.0/24", free_ips=0)
    return ix


def supply(ix: CapacityIndex, subnet_id: str) -> int:
    return next(s.supply for s in ix.subnet_figures() if s.subnet_id == subnet_id)


def consistent(ix: CapacityIndex) -> None:
    assert ix.aggregates() == ix.recount()


# ---- hand-worked figures ----------------------------------------------------------------------------------


def test_tiny_cluster_figures() -> None:
    ix = tiny()
    a1 = ix.node_figures("a1")
    assert a1 is not None
    assert (a1.capacity, a1.pods, a1.assigned, a1.room, a1.warm_free) == (27, 0, 0, 27, 9)
    a2 = ix.node_figures("a2")
    assert a2 is not None
    assert (a2.capacity, a2.room, a2.warm_free) == (15, 15, 5)
    b1 = ix.node_figures("b1")
    assert b1 is not None
    # 12 IP pods + 2 host-network pods: room min(27 - 12, 29 - 14) = 15; held 27 (3 ENIs), warm 15
    assert (b1.capacity, b1.pods, b1.assigned, b1.room, b1.warm_free) == (27, 14, 12, 15, 15)

    za = ix.zone_figures("za")
    assert (za.nodes, za.room, za.warm_free, za.subnet_free) == (2, 42, 14, 20)
    # Beyond their warm IPs both nodes need whole new ENIs, funded cheapest first: a2's two t3.medium ENIs (a
    # primary and 5 secondaries each: 12 addresses, 10 pod IPs), then 8 left, short of an m5.large ENI's 10.
    assert za.headroom == 14 + 10 == 24
    assert za.subnets == ("sa",)
    zb = ix.zone_figures("zb")
    assert (zb.nodes, zb.room, zb.warm_free, zb.subnet_free) == (1, 15, 15, 0)
    assert zb.headroom == 15
    assert ix.zone_names() == ["za", "zb"]
    consistent(ix)


def test_empty_subnet_with_warm_ips_is_not_exhausted() -> None:
    ix = tiny()
    assert supply(ix, "sb") == 0
    assert ix.zone_headroom("zb") == 15 > 0
    b1 = ix.nodes["b1"]
    assert ix.node_can_take(b1)
    assert list(ix.exhausted_nodes("zb")) == []


def test_empty_subnet_and_no_warm_ip_is_exhausted() -> None:
    ix = tiny()
    ix.set_node_held("b1", 12)  # EC2: b1 holds exactly what its pods use
    ix.upsert_subnet("sb", zone="zb", free_ips=0)  # and the subnet is measured with that in place
    zb = ix.zone_figures("zb")
    assert (zb.room, zb.warm_free, zb.subnet_free, zb.headroom) == (15, 0, 0, 0)
    assert not ix.node_can_take(ix.nodes["b1"])
    assert list(ix.exhausted_nodes("zb")) == ["b1"]
    consistent(ix)


def test_pods_draw_the_warm_pool_from_the_subnet() -> None:
    clock = Clock()
    ix = tiny(clock)
    for i in range(3):
        ix.upsert_pod(f"apps/a1-{i}", "a1", PodUse.IP)
    # a1: used 3 -> held 18 (one more ENI: its primary and 9 secondaries) -> supply 10
    a1 = ix.node_figures("a1")
    assert a1 is not None
    assert (a1.room, a1.warm_free) == (24, 15)
    assert supply(ix, "sa") == 10
    # warm 15 + 5; beyond warm, the cheapest unit first: one t3.medium ENI for a2 (6 addresses: 5 IPs); the 4
    # left fund neither another nor a1's next ENI (10)
    assert ix.zone_headroom("za") == 15 + 5 + 5 == 25
    for i in range(3, 10):
        ix.upsert_pod(f"apps/a1-{i}", "a1", PodUse.IP)
    # used 10 -> held 27 on 3 ENIs: 18 IPs and 2 ENI primaries more -> supply 0
    assert supply(ix, "sa") == 0
    assert ix.zone_figures("za").warm_free == 17 + 5
    assert ix.zone_headroom("za") == 17 + 5 == 22
    consistent(ix)
    # pods going away: their IPs stay held through ipamd's cooldown, then demand shrinks again
    for i in range(10):
        ix.remove_pod(f"apps/a1-{i}")
    assert supply(ix, "sa") == 0
    clock.advance(31)
    assert supply(ix, "sa") == 20
    assert ix.zone_headroom("za") == 24
    consistent(ix)


def test_host_network_pods_count_against_allocatable_only() -> None:
    ix = tiny()
    for i in range(20):
        ix.upsert_pod(f"kube-system/host-{i}", "a2", PodUse.NONE)
    a2 = ix.node_figures("a2")
    assert a2 is not None
    # allocatable 17 - 20 pods < 0: no room; no IP used so the warm pool is untouched
    assert (a2.pods, a2.assigned, a2.room, a2.warm_free) == (20, 0, 0, 5)
    assert supply(ix, "sa") == 20
    consistent(ix)


def test_room_bound_by_allocatable_pods() -> None:
    ix = tiny()
    ix.upsert_node("b1", zone="zb", instance_type="m5.large", pod_subnet="sb", allocatable_pods=20)
    b1 = ix.node_figures("b1")
    assert b1 is not None
    assert b1.room == min(27 - 12, 20 - 14) == 6
    consistent(ix)


def test_ec2_held_overrides_prediction() -> None:
    ix = tiny()
    ix.set_node_held("a1", 20)
    a1 = ix.node_figures("a1")
    assert a1 is not None
    assert a1.warm_free == 20
    assert a1.room == 27
    ix.upsert_pod("apps/a1-0", "a1", PodUse.IP)
    assert ix.node_figures("a1").warm_free == 19  # type: ignore[union-attr]
    ix.set_node_held("a1", None)
    assert ix.node_figures("a1").warm_free == 17  # type: ignore[union-attr]
    consistent(ix)


@pytest.mark.xfail(
    strict=True,
    reason="BUG (suspected): EC2's held figure replacing a prediction is booked as IPs released to the subnet: "
    "when DescribeNetworkInterfaces reports less than predicted after DescribeSubnets, supply grows by the "
    "prediction error although no address went back (index.py set_node_held / _subnet_supply)",
)
def test_ec2_held_correction_is_not_a_release() -> None:
    ix = tiny()
    assert supply(ix, "sb") == 0
    ix.set_node_held("b1", 12)  # the prediction (27) was wrong: b1 holds 12, and did when sb was measured
    assert supply(ix, "sb") == 0
    assert ix.zone_headroom("zb") == 0


def test_subnet_refresh_resets_the_baseline() -> None:
    ix = tiny()
    for i in range(10):
        ix.upsert_pod(f"apps/a1-{i}", "a1", PodUse.IP)
    assert supply(ix, "sa") == 0  # a1 took two more ENIs: 18 IPs and their 2 primaries
    ix.upsert_subnet("sa", zone="za", free_ips=2)  # EC2 now measures what the nodes hold
    assert supply(ix, "sa") == 2
    ix.upsert_subnet("sa", zone="za", free_ips=7)
    assert supply(ix, "sa") == 7
    ix.upsert_pod("apps/a1-10", "a1", PodUse.IP)  # still within a1's 27 held: no subnet draw
    assert supply(ix, "sa") == 7
    sa = next(s for s in ix.subnet_figures() if s.subnet_id == "sa")
    assert (sa.zone, sa.cidr, sa.free_ips, sa.nodes) == ("za", "10.0.1.0/24", 7, 2)
    consistent(ix)


def test_subnet_removed_and_moved() -> None:
    ix = tiny()
    ix.remove_subnet("sa")
    assert ix.zone_figures("za").subnet_free == 0
    # its nodes' subnet has no figures now: their room is not judged on the subnet (fail open), not taken as 0
    assert ix.zone_headroom("za") == 42
    consistent(ix)
    ix.upsert_subnet("sa", zone="za", free_ips=20)
    assert ix.zone_headroom("za") == 24
    ix.upsert_subnet("sb", zone="za", free_ips=5)  # re-zoned: its supply moves with it
    assert ix.zone_figures("zb").subnet_free == 0
    assert ix.zone_figures("za").subnet_free == 25
    consistent(ix)


def test_subnet_without_counted_nodes_supplies_nothing() -> None:
    ix = tiny()
    ix.upsert_subnet("sc", zone="za", free_ips=500)
    assert supply(ix, "sc") == 0
    assert ix.zone_figures("za").subnet_free == 20
    consistent(ix)


def test_prefix_delegation_supply_in_blocks() -> None:
    ix = CapacityIndex(cni=CniSettings(prefix_delegation=True))
    ix.upsert_node("n", zone="za", instance_type="m5.large", pod_subnet="sa", allocatable_pods=110)
    ix.upsert_subnet("sa", zone="za", free_ips=100, free_blocks=2)
    n = ix.node_figures("n")
    assert n is not None
    assert (n.capacity, n.room, n.warm_free) == (432, 110, 16)  # one /28 warm
    assert supply(ix, "sa") == 32  # 2 whole /28s, not 100 addresses
    assert ix.zone_headroom("za") == min(110, 16 + 32)
    for i in range(16):
        ix.upsert_pod(f"apps/p{i}", "n", PodUse.IP)
    # 16 used -> 2 prefixes held: one more /28 from the subnet
    assert supply(ix, "sa") == 16
    assert ix.zone_headroom("za") == min(94, 16 + 16)
    consistent(ix)


def test_prefix_delegation_fragmented_subnet_supplies_nothing() -> None:
    ix = CapacityIndex(cni=CniSettings(prefix_delegation=True))
    ix.upsert_node("n", zone="za", instance_type="m5.large", pod_subnet="sa", allocatable_pods=110)
    ix.upsert_subnet("sa", zone="za", free_ips=61, free_blocks=0)
    assert supply(ix, "sa") == 0
    # the node's own /28 is still warm: not exhausted
    assert ix.zone_headroom("za") == 16
    assert ix.node_can_take(ix.nodes["n"])


def test_prefix_delegation_without_block_count_assumes_whole_blocks() -> None:
    ix = CapacityIndex(cni=CniSettings(prefix_delegation=True))
    ix.upsert_node("n", zone="za", instance_type="m5.large", pod_subnet="sa", allocatable_pods=110)
    ix.upsert_subnet("sa", zone="za", free_ips=40)
    assert supply(ix, "sa") == 32


# ---- reservations -----------------------------------------------------------------------------------------


def test_zone_reservation_counts_and_expires() -> None:
    clock = Clock()
    ix = tiny(clock)
    ix.reserve("apps/new", "za")
    za = ix.zone_figures("za")
    assert (za.reservations, za.headroom) == (1, 23)
    clock.advance(TTL - 0.5)
    assert ix.zone_headroom("za") == 23
    clock.advance(1.0)
    assert ix.zone_headroom("za") == 24
    assert ix.zone_figures("za").reservations == 0
    assert ix.reservations() == []
    consistent(ix)


def test_node_reservation_counts_in_node_room_and_warm_pool() -> None:
    clock = Clock()
    ix = tiny(clock)
    ix.reserve("apps/new", "za", "a1")
    a1 = ix.node_figures("a1")
    assert a1 is not None
    # used 1 -> held 18: room 26, warm 17, and the second ENI (its primary and 9 IPs) comes out of the subnet
    assert (a1.reserved, a1.room, a1.warm_free) == (1, 26, 17)
    assert supply(ix, "sa") == 10
    assert ix.zone_headroom("za") == 17 + 5 + 5 == 27  # then one t3.medium ENI for a2 (the cheapest unit)
    assert [(r.key, r.zone, r.node) for r in ix.reservations()] == [("apps/new", "za", "a1")]
    consistent(ix)
    clock.advance(TTL + 1)
    assert ix.zone_headroom("za") == 24
    assert ix.node_figures("a1").reserved == 0  # type: ignore[union-attr]
    consistent(ix)


def test_reservation_released_when_pod_seen_bound() -> None:
    clock = Clock()
    ix = tiny(clock)
    ix.reserve("apps/new", "za", "a1")
    ix.upsert_pod("apps/new", "a1", PodUse.IP)
    a1 = ix.node_figures("a1")
    assert a1 is not None
    assert (a1.assigned, a1.reserved, a1.room) == (1, 0, 26)
    assert ix.zone_figures("za").reservations == 0
    assert ix.zone_headroom("za") == 27
    clock.advance(TTL + 1)  # nothing left to expire: no double release
    assert ix.zone_headroom("za") == 27
    consistent(ix)


def test_zone_reservation_released_when_bound_elsewhere() -> None:
    clock = Clock()
    ix = tiny(clock)
    ix.reserve("apps/new", "za")
    ix.upsert_pod("apps/new", "a2", PodUse.IP)
    # a2: used 1 -> held 10 on 2 ENIs: room 14, warm 9, supply 14: a2's last ENI (6) first, then 8 left, short
    # of a1's next (10)
    assert ix.zone_figures("za").reservations == 0
    assert ix.zone_headroom("za") == 9 + 9 + 5 == 23
    consistent(ix)


def test_unbound_pod_does_not_release() -> None:
    ix = tiny()
    ix.reserve("apps/new", "za")
    ix.upsert_pod("apps/new", None, PodUse.IP)  # created, not yet scheduled, not steered
    assert ix.zone_figures("za").reservations == 1
    assert ix.zone_headroom("za") == 23
    consistent(ix)


def test_steered_unbound_pod_with_reservation_counts_once() -> None:
    # its reservation and its 'pending' entry in the zone it was steered to are the same pod
    clock = Clock()
    ix = tiny(clock)
    ix.reserve("apps/new", "za")
    ix.upsert_pod("apps/new", None, PodUse.IP, steered_zone="za")
    assert ix.zone_headroom("za") == 23
    assert ix.zone_figures("za").pending == 1
    clock.advance(TTL + 1)
    assert ix.zone_headroom("za") == 23  # pending until bound, whatever the TTL
    ix.upsert_pod("apps/new", "a2", PodUse.IP)
    assert ix.zone_figures("za").pending == 0
    assert ix.zone_headroom("za") == 23  # a2 used 1 -> held 10: room 14, warm 9, supply 14
    consistent(ix)


def test_rereserve_same_key_does_not_double_count() -> None:
    ix = tiny()
    ix.reserve("apps/new", "za")
    ix.reserve("apps/new", "za")
    assert ix.zone_figures("za").reservations == 1
    assert ix.zone_headroom("za") == 23
    ix.reserve("apps/new", "za", "a1")
    assert ix.zone_figures("za").reservations == 1
    assert ix.node_figures("a1").reserved == 1  # type: ignore[union-attr]
    assert ix.zone_headroom("za") == 27  # on a1: its second ENI is held for it, a2's still cheapest to fund
    ix.reserve("apps/new", "zb")  # moved: za is whole again
    assert ix.zone_headroom("za") == 24
    assert ix.node_figures("a1").reserved == 0  # type: ignore[union-attr]
    assert ix.zone_headroom("zb") == 14
    assert len(ix.reservations()) == 1
    consistent(ix)


def test_release_and_remove_pod_release() -> None:
    ix = tiny()
    ix.reserve("apps/x", "za")
    ix.reserve("apps/y", "za", "a2")
    ix.release("apps/x")
    ix.remove_pod("apps/y")  # a pod deleted before the watch showed it bound
    ix.release("apps/never-reserved")
    assert ix.zone_figures("za").reservations == 0
    assert ix.zone_headroom("za") == 24
    consistent(ix)


def test_reservation_on_unknown_node_is_held_against_the_zone() -> None:
    ix = tiny()
    ix.reserve("apps/x", "za", "nope")
    assert ix.reservations()[0].node is None
    assert ix.zone_headroom("za") == 23
    consistent(ix)


def test_reservation_outlives_its_node() -> None:
    clock = Clock()
    ix = tiny(clock)
    ix.reserve("apps/x", "za", "a1")
    ix.remove_node("a1")
    assert ix.zone_figures("za").nodes == 1
    consistent(ix)
    clock.advance(TTL + 1)
    ix.expire()
    assert "a1" not in ix.nodes
    consistent(ix)


# ---- node lifecycle ---------------------------------------------------------------------------------------


def test_pods_arriving_before_their_node() -> None:
    ix = tiny()
    for i in range(3):
        ix.upsert_pod(f"apps/early-{i}", "n9", PodUse.IP)
    assert ix.node_figures("n9") is None
    assert ix.zone_names() == ["za", "zb"]
    assert ix.zone_headroom("za") == 24
    consistent(ix)
    ix.upsert_node("n9", zone="za", instance_type="m5.large", pod_subnet="sa", allocatable_pods=29)
    n9 = ix.node_figures("n9")
    assert n9 is not None
    # used 3 -> held 18 on 2 ENIs, all of it new to the subnet since its refresh: 18 IPs and 2 ENI primaries
    # (the first being the node's own): the subnet's 20 addresses
    assert (n9.pods, n9.assigned, n9.room, n9.warm_free) == (3, 3, 24, 15)
    assert supply(ix, "sa") == 0
    assert ix.subnets["sa"].supply == 0
    consistent(ix)


def test_pods_on_a_node_that_never_comes() -> None:
    clock = Clock()
    ix = tiny(clock)
    ix.upsert_pod("apps/ghost", "n9", PodUse.IP)
    ix.remove_pod("apps/ghost")
    assert ix.nodes["n9"].cooling == 1  # its IP through ipamd's cooldown, then the record goes
    clock.advance(31)
    ix.expire()
    assert "n9" not in ix.nodes
    consistent(ix)


def test_node_removed_with_pods_still_on_it() -> None:
    clock = Clock()
    ix = tiny(clock)
    ix.remove_node("b1")
    assert ix.zone_names() == ["za"]
    assert ix.node_figures("b1") is None
    assert ix.zone_figures("zb").nodes == 0
    consistent(ix)
    for i in range(12):
        ix.remove_pod(f"apps/b1-{i}")
        consistent(ix)
    ix.remove_pod("kube-system/b1-host-0")
    ix.remove_pod("kube-system/b1-host-1")
    clock.advance(31)  # the IPs' cooldown
    ix.expire()
    assert "b1" not in ix.nodes
    assert ix.recount()["nodes"].keys() == {"a1", "a2"}
    consistent(ix)


def test_node_removed_and_back_keeps_its_pods() -> None:
    ix = tiny()
    ix.remove_node("b1")
    ix.upsert_node("b1", zone="zb", instance_type="m5.large", pod_subnet="sb", allocatable_pods=29)
    b1 = ix.node_figures("b1")
    assert b1 is not None
    assert (b1.pods, b1.assigned, b1.room) == (14, 12, 15)
    consistent(ix)


def test_remove_unknown_things_is_harmless() -> None:
    ix = tiny()
    before = ix.aggregates()
    ix.remove_node("nope")
    ix.remove_pod("apps/nope")
    ix.remove_subnet("subnet-nope")
    ix.set_node_held("nope", 3)
    assert ix.aggregates() == before


def test_unknown_instance_type() -> None:
    ix = tiny()
    ix.upsert_node("u1", zone="za", instance_type="x99.mega", pod_subnet="sa", allocatable_pods=50)
    assert ix.unknown_types == {"x99.mega"}
    with pytest.raises(UnknownInstanceType):
        ix.limits.get("x99.mega")
    u1 = ix.node_figures("u1")
    assert u1 is not None
    assert (u1.capacity, u1.room, u1.warm_free) == (50, 50, 0)  # judged by allocatable pods alone
    ix.upsert_pod("apps/u", "u1", PodUse.IP)
    assert ix.node_figures("u1").room == 49  # type: ignore[union-attr]
    ix.set_node_held("u1", 10)
    assert ix.node_figures("u1").warm_free == 9  # type: ignore[union-attr]
    ix.upsert_node("u2", zone="za", instance_type="x99.mega", pod_subnet="sa", allocatable_pods=None)
    assert ix.node_figures("u2").room == 0  # type: ignore[union-attr]
    assert ix.snapshot().unknown_types == ("x99.mega",)
    consistent(ix)


def test_unschedulable_node_is_not_counted() -> None:
    ix = tiny()
    ix.upsert_node("a2", zone="za", instance_type="t3.medium", pod_subnet="sa", allocatable_pods=17,
                   schedulable=False)
    za = ix.zone_figures("za")
    assert (za.nodes, za.room) == (1, 27)
    consistent(ix)


def test_cordon_does_not_free_subnet_addresses() -> None:
    ix = tiny()
    for i in range(10):
        ix.upsert_pod(f"apps/a1-{i}", "a1", PodUse.IP)
    ix.upsert_subnet("sa", zone="za", free_ips=7)  # measured with a1's 27 IPs in place
    before = ix.subnets["sa"].supply
    assert before == 7
    ix.upsert_node("a1", zone="za", instance_type="m5.large", pod_subnet="sa", allocatable_pods=29,
                   schedulable=False, cordoned=True)
    assert ix.subnets["sa"].supply == before
    consistent(ix)


@pytest.mark.parametrize("change", ["node_reserve", "same_cni"])
def test_settings_change_keeps_subnet_growth(change: str) -> None:
    ix = tiny()
    for i in range(10):
        ix.upsert_pod(f"apps/a1-{i}", "a1", PodUse.IP)
    ix.upsert_subnet("sa", zone="za", free_ips=7)
    for i in range(10, 12):
        ix.upsert_pod(f"apps/a1-{i}", "a1", PodUse.IP)  # within a1's 27: no draw
    ix.upsert_pod("apps/a2-0", "a2", PodUse.IP)  # a2 takes its second ENI: 6 addresses
    assert supply(ix, "sa") == 1
    if change == "node_reserve":
        ix.set_node_reserve(0)
    else:
        ix.set_cni(CniSettings())
    assert supply(ix, "sa") == 1
    assert ix.zone_headroom("za") == 15 + 9 == 24


@pytest.mark.parametrize("mode", ["secondary", "prefix"])
def test_warm_pool_cannot_grow_past_an_empty_subnet(mode: str) -> None:
    if mode == "secondary":
        ix = CapacityIndex()
        ix.upsert_node("n", zone="za", instance_type="m5.large", pod_subnet="sa", allocatable_pods=29)
        ix.upsert_subnet("sa", zone="za", free_ips=2)  # measured with n holding 9
        for i in range(10):
            ix.upsert_pod(f"apps/p{i}", "n", PodUse.IP)
        # n's one ENI is full and a second needs 10 addresses: the 10th pod waits for an IP, and nothing is
        # left for an 11th (the predicted warm ENIs the subnet cannot fund are taken back)
        assert ix.zone_headroom("za") <= 0
    else:
        ix = CapacityIndex(cni=CniSettings(prefix_delegation=True))
        ix.upsert_node("n", zone="za", instance_type="m5.large", pod_subnet="sa", allocatable_pods=110)
        ix.upsert_subnet("sa", zone="za", free_ips=61, free_blocks=0)  # measured with n holding one /28
        for i in range(16):
            ix.upsert_pod(f"apps/p{i}", "n", PodUse.IP)
        # its one /28 is full and no whole /28 is left in the subnet
        assert ix.zone_headroom("za") == 0


def test_branch_pods_draw_subnet_addresses() -> None:
    ix = CapacityIndex(cni=CniSettings(pod_eni=True))
    ix.upsert_node("n", zone="za", instance_type="m5.large", pod_subnet="sa", allocatable_pods=29)
    ix.upsert_subnet("sa", zone="za", free_ips=3)
    assert ix.zone_figures("za").branch_headroom == 3
    for i in range(3):
        ix.upsert_pod(f"apps/sg-{i}", "n", PodUse.BRANCH)
    assert ix.zone_figures("za").branch_headroom == 0


def test_branch_room() -> None:
    ix = CapacityIndex(cni=CniSettings(pod_eni=True))
    ix.upsert_node("n", zone="za", instance_type="m5.large", pod_subnet="sa", allocatable_pods=29)
    ix.upsert_node("t", zone="za", instance_type="t3.medium", pod_subnet="sa", allocatable_pods=17)
    ix.upsert_subnet("sa", zone="za", free_ips=100)
    assert ix.nodes["n"].branch_room == 9
    assert ix.nodes["t"].branch_room == 0  # t3 cannot trunk
    ix.upsert_pod("apps/sg", "n", PodUse.BRANCH)
    assert ix.nodes["n"].branch_room == 8
    assert ix.zone_figures("za").branch_headroom == 8
    no_pod_eni = CapacityIndex()
    no_pod_eni.upsert_node("n", zone="za", instance_type="m5.large", pod_subnet="sa", allocatable_pods=29)
    assert no_pod_eni.nodes["n"].branch_room == 0
    consistent(ix)


def test_node_reserve_marks_full_nodes() -> None:
    ix = tiny()
    ix.set_node_reserve(15)
    assert set(ix.exhausted_nodes("za")) == {"a2"}  # room 15 <= reserve 15
    assert set(ix.exhausted_nodes("zb")) == {"b1"}
    assert not ix.node_can_take(ix.nodes["a2"])
    assert ix.node_can_take(ix.nodes["a1"])
    consistent(ix)


def test_cni_change_recomputes_capacity() -> None:
    ix = tiny()
    ix.set_cni(CniSettings(custom_networking=True))
    assert ix.node_figures("a1").capacity == 18  # type: ignore[union-attr]
    assert ix.node_figures("a2").capacity == 10  # type: ignore[union-attr]
    ix.set_cni(CniSettings(prefix_delegation=True))
    assert ix.node_figures("a1").capacity == 432  # type: ignore[union-attr]
    assert ix.node_figures("a1").room == 29  # type: ignore[union-attr]
    consistent(ix)


def test_version_moves_on_every_change() -> None:
    ix = tiny()
    v = ix.version
    ix.upsert_pod("apps/x", "a1", PodUse.IP)
    assert ix.version > v
    v = ix.version
    ix.upsert_pod("apps/x", "a1", PodUse.IP)  # no change
    assert ix.version == v
    ix.reserve("apps/y", "za")
    assert ix.version > v


def test_pod_key() -> None:
    assert pod_key("payments", "api-1") == "payments/api-1"


# ---- the stateful property test ---------------------------------------------------------------------------

NODES = ["n1", "n2", "n3", "n4"]
ZONES = ["za", "zb"]
SUBNETS = ["s1", "s2", "s3"]
TYPES = ["m5.large", "t3.medium", "m4.large", "c5.large", "x9.unknown", None]
KEYS = [f"ns/p{i}" for i in range(8)]
LIMITS = LimitsTable()

cni_strategy = st.builds(
    CniSettings,
    prefix_delegation=st.booleans(),
    warm_eni_target=st.integers(0, 2),
    warm_ip_target=st.one_of(st.none(), st.integers(0, 10)),
    minimum_ip_target=st.one_of(st.none(), st.integers(0, 20)),
    warm_prefix_target=st.integers(0, 2),
    custom_networking=st.booleans(),
    max_eni=st.one_of(st.none(), st.integers(1, 4)),
    pod_eni=st.booleans(),
)


class IndexMachine(RuleBasedStateMachine):
    """Random event sequences; after each, the index must agree with a recount and with a model kept here."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.ix = CapacityIndex(clock=self.clock, reservation_ttl=TTL)
        self.cni = CniSettings()
        self.node_reserve = 0
        # model
        self.known: dict[str, dict[str, Any]] = {}  # node -> zone, type, subnet, alloc, schedulable
        self.ec2_held: dict[str, int | None] = {}
        self.pods: dict[str, tuple[str | None, PodUse, str | None]] = {}
        self.res: dict[str, tuple[str, str | None, float]] = {}  # key -> zone, node, expires
        self.cool: dict[str, tuple[str, bool, float]] = {}  # pod key -> node, branch, cooldown ends

    # -- model helpers --

    def _expire(self) -> None:
        now = self.clock()
        self.res = {k: r for k, r in self.res.items() if now < r[2]}
        self.cool = {k: c for k, c in self.cool.items() if now < c[2]}

    def _counted(self, name: str) -> bool:
        node = self.known.get(name)
        return node is not None and node["schedulable"] and node["zone"] is not None

    def _exists(self, name: str) -> bool:
        return (
            name in self.known
            or any(p[0] == name for p in self.pods.values())
            or any(r[1] == name for r in self.res.values())
            or any(c[0] == name for c in self.cool.values())
        )

    def _gc(self) -> None:
        for name in list(self.ec2_held):
            if not self._exists(name):
                del self.ec2_held[name]

    # -- rules --

    @rule(name=st.sampled_from(NODES), zone=st.sampled_from([*ZONES, None]), itype=st.sampled_from(TYPES),
          subnet=st.sampled_from([*SUBNETS, None]), alloc=st.sampled_from([None, 5, 17, 29, 110]),
          schedulable=st.booleans())
    def upsert_node(self, name: str, zone: str | None, itype: str | None, subnet: str | None, alloc: int | None,
                    schedulable: bool) -> None:
        self.ix.upsert_node(name, zone=zone, instance_type=itype, pod_subnet=subnet, allocatable_pods=alloc,
                            schedulable=schedulable)
        self.known[name] = {"zone": zone, "type": itype, "subnet": subnet, "alloc": alloc,
                            "schedulable": schedulable}

    @rule(name=st.sampled_from(NODES))
    def remove_node(self, name: str) -> None:
        self.ix.remove_node(name)
        self.known.pop(name, None)
        if name in self.ec2_held:
            self.ec2_held[name] = None
        self._gc()

    @rule(sid=st.sampled_from(SUBNETS), zone=st.sampled_from(ZONES), free=st.integers(0, 60),
          blocks=st.one_of(st.none(), st.integers(0, 4)), cni_tag=st.sampled_from([None, "1", "0", ""]))
    def upsert_subnet(self, sid: str, zone: str, free: int, blocks: int | None, cni_tag: str | None) -> None:
        # subnet discovery: a tagged subnet may fund new ENIs for any node of its zone
        tags = {} if cni_tag is None else {"kubernetes.io/role/cni": cni_tag}
        self.ix.upsert_subnet(sid, zone=zone, free_ips=free, free_blocks=blocks, tags=tags)

    @rule(sid=st.sampled_from(SUBNETS))
    def remove_subnet(self, sid: str) -> None:
        self.ix.remove_subnet(sid)

    @rule(key=st.sampled_from(KEYS), node=st.sampled_from([*NODES, None]), use=st.sampled_from(list(PodUse)),
          steered=st.sampled_from([*ZONES, None]))
    def upsert_pod(self, key: str, node: str | None, use: PodUse, steered: str | None) -> None:
        self.ix.upsert_pod(key, node, use, steered_zone=steered)
        entry = (node, use, None if node else steered)
        self.pods[key] = entry
        if node is not None or entry[2] is not None:
            # bound, or counted as pending in the zone it was steered to: either replaces the reservation,
            # also one taken after the pod was already seen so
            self.res.pop(key, None)
        self._gc()

    @rule(key=st.sampled_from(KEYS))
    def remove_pod(self, key: str) -> None:
        self.ix.remove_pod(key)
        old = self.pods.pop(key, None)
        self._expire()
        if old is not None and old[0] is not None and old[1] is not PodUse.NONE:
            # its address stays taken through the cooldown (30 s for an IP, 60 s for a branch ENI)
            branch = old[1] is PodUse.BRANCH
            self.cool[key] = (old[0], branch, self.clock() + (60.0 if branch else self.cni.ip_cooldown))
        self.res.pop(key, None)
        self._gc()

    @rule(name=st.sampled_from(NODES), held=st.one_of(st.none(), st.integers(0, 40)),
          elsewhere=st.one_of(st.none(), st.tuples(st.sampled_from(SUBNETS), st.integers(0, 20))))
    def set_node_held(self, name: str, held: int | None, elsewhere: tuple[str, int] | None) -> None:
        # EC2 figures come for nodes the index knows. (For a pod-only placeholder record the figure is dropped
        # whenever a pod update empties and refills the record: harmless, the next poll sets it again.)
        # `elsewhere`: one of its ENIs is in that subnet (attached before its ENIConfig changed, or by subnet
        # discovery) with that many of the IPs; the rest on one ENI in its pod subnet.
        if name not in self.known:
            return
        if held is not None and elsewhere is not None:
            other, part = elsewhere[0], min(elsewhere[1], held)
            own = self.known[name]["subnet"] or "s-none"
            split = {own: HeldAddresses(held - part, 0, 1)} if own != other else {}
            split[other] = HeldAddresses(part if own != other else held, 0, 1)
            self.ix.set_node_held(name, held, enis=len(split), subnets=split)
        else:
            self.ix.set_node_held(name, held)
        self.ec2_held[name] = held

    @rule(key=st.sampled_from(KEYS), zone=st.sampled_from(ZONES), node=st.sampled_from([*NODES, None]))
    def reserve(self, key: str, zone: str, node: str | None) -> None:
        self.ix.reserve(key, zone, node)
        self._expire()
        bound = node if node is not None and self._counted(node) else None
        self.res[key] = (zone, bound, self.clock() + TTL)
        self._gc()

    @rule(key=st.sampled_from(KEYS))
    def release(self, key: str) -> None:
        self.ix.release(key)
        self._expire()
        self.res.pop(key, None)
        self._gc()

    @rule(seconds=st.sampled_from([1.0, 5.0, 15.0, 29.0, 31.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(cni=cni_strategy)
    def set_cni(self, cni: CniSettings) -> None:
        self.ix.set_cni(cni)
        self.cni = cni

    @rule(reserve=st.integers(0, 3))
    def set_node_reserve(self, reserve: int) -> None:
        self.ix.set_node_reserve(reserve)
        self.node_reserve = reserve

    # -- checks --

    def _expected_node(self, name: str) -> dict[str, int]:
        node = self.known[name]
        on = [p for p in self.pods.values() if p[0] == name]
        pods = len(on)
        assigned = sum(1 for p in on if p[1] is PodUse.IP)
        reserved = sum(1 for r in self.res.values() if r[1] == name)
        cooling = sum(1 for c in self.cool.values() if c[0] == name and not c[1])
        used = assigned + reserved
        limits = LIMITS.get(node["type"]) if node["type"] and LIMITS.known(node["type"]) else None
        alloc = node["alloc"]
        capacity = pod_ip_capacity(limits, self.cni.mode) if limits else (alloc or 0)
        ip_room = capacity - used
        if alloc is not None:
            ip_room = min(ip_room, alloc - pods - reserved)
        ec2 = self.ec2_held.get(name)
        if ec2 is not None:
            held = ec2
        elif limits is not None:
            held = predict_held(used + cooling, limits, self.cni, alloc).ips
        else:
            held = used + cooling
        return {"capacity": capacity, "pods": pods, "assigned": assigned, "reserved": reserved,
                "room": max(0, ip_room), "warm": max(0, held - cooling - used)}

    @invariant()
    def index_agrees(self) -> None:
        ix = self.ix
        self._expire()
        aggregates = ix.aggregates()
        assert aggregates == ix.recount()

        # nothing negative
        # (a zone's and a subnet's supply and growth may go below zero: predicted warm IPs the subnet could not
        # give, taken back)
        for zone_row in aggregates["zones"].values():
            assert all(v >= 0 for v in zone_row[:5] + zone_row[8:17]), zone_row  # (5-7: growth, supplies)
        for subnet_row in aggregates["subnets"].values():
            assert all(v >= 0 for v in subnet_row[:3] + subnet_row[5:7]), subnet_row
        for node_row in aggregates["nodes"].values():
            assert all(v >= 0 for v in node_row[1:]), node_row

        # every known node against the model
        expected: dict[str, dict[str, int]] = {}
        for name in self.known:
            figures = ix.node_figures(name)
            assert figures is not None
            want = self._expected_node(name)
            expected[name] = want
            got = {"capacity": figures.capacity, "pods": figures.pods, "assigned": figures.assigned,
                   "reserved": figures.reserved, "room": figures.room, "warm": figures.warm_free}
            assert got == want, name
        for name in NODES:
            if name not in self.known:
                assert ix.node_figures(name) is None

        # subnets: node counts from the model, supply never negative and zero with no node to draw on it
        subnet_figures = {s.subnet_id: s for s in ix.subnet_figures()}
        for sid, sf in subnet_figures.items():
            users = [n for n in self.known if self._counted(n) and self.known[n]["subnet"] == sid]
            assert sf.nodes == len(users)
            assert sf.supply >= 0
            if not users:
                assert sf.supply == 0

        # zones: the headroom formula from the node and subnet figures
        counted = [n for n in self.known if self._counted(n)]
        assert ix.zone_names() == sorted({self.known[n]["zone"] for n in counted})
        for zone in ZONES:
            members = [n for n in counted if self.known[n]["zone"] == zone]
            room = sum(expected[n]["room"] for n in members)
            warm = sum(expected[n]["warm"] for n in members)
            warm_usable = sum(min(expected[n]["room"], expected[n]["warm"]) for n in members)
            beyond_warm = sum(max(0, expected[n]["room"] - expected[n]["warm"]) for n in members)
            raw_supply = sum(ix.subnets[sid].usable for sid, s in subnet_figures.items() if s.zone == zone)
            unknown = [n for n in members if self.known[n]["subnet"] not in subnet_figures]
            beyond_warm -= sum(max(0, expected[n]["room"] - expected[n]["warm"]) for n in unknown)
            beyond_unknown = sum(max(0, expected[n]["room"] - expected[n]["warm"]) for n in unknown)
            zone_supply = max(0, raw_supply)
            reservations = sum(1 for r in self.res.values() if r[0] == zone)
            unbound = sum(1 for r in self.res.values() if r[0] == zone and r[1] is None)
            pending = sum(1 for p in self.pods.values() if p[0] is None and p[2] == zone)
            debit = unbound + pending
            zf = ix.zone_figures(zone)
            assert (zf.nodes, zf.room, zf.warm_free, zf.subnet_free, zf.reservations, zf.pending) == (
                len(members), room, warm, zone_supply, reservations, pending,
            )
            # each node uses its own warm IPs first; the rest of its room draws on the shared subnet supply,
            # never more than it asks for nor than the subnet has; a node whose subnet has no figures yet is
            # judged on its room alone (fail open)
            growth = sum(ix.subnets[sid].growth for sid, s in subnet_figures.items() if s.zone == zone)
            growth += ix.zones[zone].discovery_growth if zone in ix.zones else 0
            assert zf.headroom == warm_usable + growth + beyond_unknown - debit
            assert growth <= beyond_warm
            # each subnet funds its own nodes' growth only: another's shortfall beyond its predicted warm IPs
            # (a count that lags EC2's figures) takes nothing from it
            addresses = sum(max(0, ix.subnets[sid].supply) for sid, s in subnet_figures.items() if s.zone == zone)
            assert growth <= addresses or growth < 0
            assert ix.zone_headroom(zone) == zf.headroom

            # exhausted nodes: no room above the node reserve, or no warm IP and none the subnet can fund
            def can_take(n: str) -> bool:
                if expected[n]["room"] <= self.node_reserve:
                    return False
                if expected[n]["warm"] > 0:
                    return True
                node = ix.nodes[n]
                sid = self.known[n]["subnet"]
                if sid not in subnet_figures:
                    return node.grows
                if node.limits is None:  # an unknown type: one address per IP
                    return node.grows and ix.subnets[sid].left > 0
                if any(part.free_slots for part in node.elsewhere):  # free slots on ENIs in other subnets
                    return node.grows and ix.placed_growth_funded(node)
                return node.grows and (ix.growth_funded(node, ix.subnets[sid]) is True or ix.discovery_funds(node))

            def pod_slot(n: str) -> bool:
                alloc = self.known[n]["alloc"]
                return alloc is None or alloc - expected[n]["pods"] - expected[n]["reserved"] > 0

            assert sorted(ix.exhausted_nodes(zone)) == sorted(n for n in members if not can_take(n) and pod_slot(n))

        assert {r.key for r in ix.reservations()} == set(self.res)


IndexMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestIndexMachine = IndexMachine.TestCase


def test_node_room_query() -> None:
    ix = tiny()
    for name, node in ix.nodes.items():
        assert ix.node_room(name) == node.room == ix.node_figures(name).room  # type: ignore[union-attr]
    assert ix.node_room("no-such-node") == 0


def test_an_entry_set_again_expires_once_from_its_last_setting() -> None:
    """Reservations and cooldowns expire in the order they were set; one set again lives from its last setting
    and is released once; one taken out is never released."""
    from webhook.model.index import _ExpiringCache

    now = [0.0]
    released: list[str] = []
    cache: _ExpiringCache[str] = _ExpiringCache(30.0, lambda: now[0], released.append)
    cache["a"] = "a0"
    cache["b"] = "b0"
    now[0] = 10.0
    cache["a"] = "a1"
    cache["c"] = "c0"
    assert cache.pop("c") == "c0"
    now[0] = 31.0
    assert cache.get("b") is None and cache.get("a") == "a1"  # past its time: invisible before it is released
    assert [k for k, _ in cache.expire()] == ["b"] and released == ["b0"]
    now[0] = 41.0
    assert len(cache) == 0 and cache.get("a") is None
    assert [k for k, _ in cache.expire()] == ["a"] and released == ["b0", "a1"]
    assert cache.expire() == []
