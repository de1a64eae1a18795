"""How many more pod IPs one subnet's free addresses can give the nodes that draw on it.

Nodes do not take addresses one at a time: a node whose attached ENIs are full gets nothing until the subnet
can fund a whole new ENI (its primary address plus its whole request, `ipamd.growth_cost`). So each node's
growth is a list of units, each with a cost (addresses, /28 blocks) and a gain (pod IPs), and the subnet's
answer depends on how its free addresses fall among them: cheapest units first, which keeps the answer
monotone (more addresses never serve fewer pods) and exact at the edge (a pod is served when one unit it needs
can be paid whole). The index keeps, per subnet, the sum of its nodes'
units by kind (`Demand`, O(1) to update); `subnet_yield` then answers in O(kinds), a handful.

Pods already on a node beyond what it holds (waiting for an IP: the `FailedCreatePodSandBox` pods) are
served first: their node's ipamd is already asking. What is left goes to new pods, then to new nodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from webhook.model.limits import PREFIX_SIZE

# (addresses, /28 blocks, pod IPs gained, fewest pod IPs) of one growth unit: a free slot filled on an attached
# ENI ((1, 0, 1, 1), or (0, 1, 16, 16) for a prefix), or a new ENI: with prefixes (1, n, 16 n, 16 n); with
# secondary IPs its primary and its slots (1 + s, 0, s, n), created with the n IPs it asks for at once and then
# filled one IP at a time as addresses allow (so a subnet short of the whole ENI still funds part of it, never
# less than n).
UnitKind = tuple[int, int, int, int]


@dataclass(slots=True)
class Demand:
    """What the nodes of one subnet want of one unit kind."""

    wait_units: int = 0  # units needed to serve the pods waiting for an IP
    wait_ips: int = 0
    all_units: int = 0  # units needed to serve those and the new pods the nodes have room for
    new_ips: int = 0

    def add(self, other: Demand, sign: int) -> None:
        self.wait_units += sign * other.wait_units
        self.wait_ips += sign * other.wait_ips
        self.all_units += sign * other.all_units
        self.new_ips += sign * other.new_ips

    @property
    def empty(self) -> bool:
        return not (self.wait_units or self.wait_ips or self.all_units or self.new_ips)


# What a subnet could not fund of its nodes' new ENIs, by kind: (units, waiting pods, new pods) unserved.
Unserved = tuple[tuple[UnitKind, int, int, int], ...]


@dataclass(frozen=True, slots=True)
class Yield:
    new_ips: int  # pod IPs new pods on the subnet's nodes can get (negative: predicted warm IPs it cannot fund)
    waiting_served: int  # waiting pods that will get an IP
    addresses_left: int  # free addresses once the waiting pods are served (what new nodes could draw on)
    blocks_left: int
    unserved: Unserved = ()  # new ENIs it could not fund: subnet discovery may find them another subnet
    spare: tuple[int, int] = (0, 0)  # (addresses, blocks) still free once its own nodes' growth is funded


def new_eni_kind(kind: UnitKind) -> bool:
    """A new ENI (its primary address plus its request), as opposed to a slot on an attached ENI: only a new
    ENI can come from another subnet."""
    cost_addresses, cost_blocks, _, _ = kind
    return cost_addresses >= 1 and (cost_blocks > 0 or cost_addresses > 1)


def _unit_cost(kind: UnitKind) -> tuple[int, int, int]:
    """What the cheapest funding of one unit takes (its fewest IPs, for a new ENI filled later)."""
    cost_addresses, cost_blocks, gain, least = kind
    return cost_addresses - (gain - least) + PREFIX_SIZE * cost_blocks, cost_blocks, -gain


def _fund(addresses: int, blocks: int, kind: UnitKind, units: int) -> tuple[int, int, int, int]:
    """Fund up to `units` units: (units funded, pod IPs they give, addresses left, blocks left). A new ENI with
    secondary IPs the subnet cannot fill whole still comes with its request, and takes one IP at a time after
    (tryAssignIPs' fallback) while addresses last."""
    if units <= 0:
        return 0, 0, addresses, blocks
    whole = _affordable(addresses, blocks, kind)
    full = min(units, whole)
    addresses, blocks = _spend(addresses, blocks, kind, full)
    ips = full * kind[2]
    _, cost_blocks, gain, least = kind
    if full < units and least < gain and not cost_blocks and addresses >= 1 + least:
        part = min(addresses - 1, gain - 1)
        addresses -= 1 + part
        blocks = min(blocks, max(addresses, 0) // PREFIX_SIZE)
        return full + 1, ips + part, addresses, blocks
    return full, ips, addresses, blocks


def _affordable(addresses: int, blocks: int, kind: UnitKind) -> int:
    cost_addresses, cost_blocks, _, _ = kind
    whole = cost_addresses + PREFIX_SIZE * cost_blocks
    count = addresses // whole if whole else 1 << 30
    if cost_blocks:
        count = min(count, blocks // cost_blocks)
    return max(count, 0)


def _spend(addresses: int, blocks: int, kind: UnitKind, units: int) -> tuple[int, int]:
    cost_addresses, cost_blocks, _, _ = kind
    addresses -= units * (cost_addresses + PREFIX_SIZE * cost_blocks)
    blocks -= units * cost_blocks
    # Loose addresses taken may break free blocks: never count more blocks than the addresses left can hold.
    return addresses, min(blocks, max(addresses, 0) // PREFIX_SIZE)


def subnet_yield(addresses: int, blocks: int, demand: Mapping[UnitKind, Demand]) -> Yield:
    """Serve the waiting pods, then the new ones, cheapest units first, from `addresses` free addresses of which
    `blocks` aligned /28 blocks are whole. Below zero (predicted warm pools the subnet could not give), the
    shortfall is the answer: the zone sum takes those phantom IPs back."""
    if addresses < 0 or blocks < 0:
        shortfall = min(addresses, blocks * PREFIX_SIZE)
        return Yield(shortfall, 0, addresses, blocks)
    # The common case first: the subnet funds every unit its nodes want (one pass, nothing to rank).
    all_addresses = all_blocks = wait_addresses = wait_blocks = waiting = new = 0
    for (cost_addresses, cost_blocks, _, _), want in demand.items():
        whole = cost_addresses + PREFIX_SIZE * cost_blocks
        all_addresses += want.all_units * whole
        all_blocks += want.all_units * cost_blocks
        wait_addresses += want.wait_units * whole
        wait_blocks += want.wait_units * cost_blocks
        waiting += want.wait_ips
        new += want.new_ips
    if all_addresses <= addresses and all_blocks <= blocks:
        left = addresses - wait_addresses
        spare = addresses - all_addresses
        return Yield(new, waiting, left, min(blocks - wait_blocks, left // PREFIX_SIZE), (),
                     (spare, min(blocks - all_blocks, spare // PREFIX_SIZE)))
    # Cheapest units first: with more addresses the same units are funded and maybe more, never fewer.
    kinds = sorted(demand, key=_unit_cost)
    funded: dict[UnitKind, int] = {}
    surplus: dict[UnitKind, int] = {}
    served_waiting: dict[UnitKind, int] = {}
    waiting_served = 0
    for kind in kinds:
        want = demand[kind]
        units, ips, addresses, blocks = _fund(addresses, blocks, kind, want.wait_units)
        served = min(want.wait_ips, ips)
        waiting_served += served
        funded[kind] = units
        surplus[kind] = ips - served
        served_waiting[kind] = served
    after_waiting = (addresses, blocks)
    new_ips = 0
    unserved: list[tuple[UnitKind, int, int, int]] = []
    for kind in kinds:
        want = demand[kind]
        units, ips, addresses, blocks = _fund(addresses, blocks, kind, want.all_units - funded[kind])
        got = min(want.new_ips, surplus[kind] + ips)
        new_ips += got
        missing_units = want.all_units - funded[kind] - units
        if missing_units > 0 and new_eni_kind(kind):
            unserved.append((kind, missing_units, want.wait_ips - served_waiting[kind], want.new_ips - got))
    return Yield(new_ips, waiting_served, after_waiting[0], after_waiting[1], tuple(unserved), (addresses, blocks))


def discovery_yield(unserved: Iterable[tuple[UnitKind, int, int, int]],
                    subnets: list[tuple[int, int]]) -> tuple[int, int, list[tuple[int, int]]]:
    """New ENIs the nodes' own subnets could not fund, from the zone's subnets tagged for discovery: ipamd
    tries them most free first, each ENI whole in one subnet (`createENI` with ENABLE_SUBNET_DISCOVERY).
    `subnets` is (addresses, blocks) left in each; returns (waiting served, new pods served, what is left)."""
    pool = sorted(subnets, reverse=True)
    totals: dict[UnitKind, list[int]] = {}
    for kind, units, waiting, new in unserved:
        entry = totals.setdefault(kind, [0, 0, 0])
        entry[0] += units
        entry[1] += waiting
        entry[2] += new
    waiting_served = new_served = 0
    for kind in sorted(totals, key=_unit_cost):
        units, waiting, new = totals[kind]
        for i, (addresses, blocks) in enumerate(pool):
            if units <= 0:
                break
            funded, ips, addresses, blocks = _fund(addresses, blocks, kind, units)
            if funded <= 0:
                continue
            pool[i] = (addresses, blocks)
            units -= funded
            served = min(waiting, ips)
            waiting -= served
            waiting_served += served
            got = min(new, ips - served)
            new -= got
            new_served += got
    return waiting_served, new_served, pool


def add_demand(into: dict[UnitKind, Demand], parts: Iterable[tuple[UnitKind, Demand]], sign: int) -> None:
    for kind, part in parts:
        total = into.get(kind)
        if total is None:
            total = into[kind] = Demand()
        total.add(part, sign)
        if total.empty:
            del into[kind]


def new_node_ips(addresses: int, blocks: int, cost_addresses: int, cost_blocks: int) -> int:
    """Pod IPs new nodes could still get from what is left: none unless one node's first pod can be funded
    (its own primary address and its first IP, or its first ENI's whole request); then what the addresses
    hold beyond that node's overhead."""
    if addresses < cost_addresses + PREFIX_SIZE * cost_blocks or blocks < cost_blocks:
        return 0
    if cost_blocks:
        return PREFIX_SIZE * blocks
    overhead = cost_addresses - 1  # every address past the overhead can become a pod IP
    return addresses - overhead
