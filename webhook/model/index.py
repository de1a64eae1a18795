"""The capacity index: nodes, subnets, zones, pods and reservations, with aggregates kept current.

Every update is O(1) (amortised): an event touches one pod, its node, that node's pod subnet and zone, and
adjusts their sums by the change it made. No query walks all pods or all nodes.

Quantities, per node n (see DESIGN.md "Decisions"):
  capacity(n)  pod IPs the node's type holds in the CNI mode (or allocatable pods when the type is unknown)
  room(n)      max(0, min(capacity - assigned - reserved, allocatable pods - pods - reserved))
  held(n)      IPs the node holds from its subnet: EC2's figure when known, else the warm-pool prediction
  warm(n)      max(0, held - assigned - reserved): IPs ready on the node with no subnet call
  demand(n)    max(held, assigned + reserved) + branch pods: addresses the node takes from its subnet, now or
               soon (whole /28s under prefix delegation; each branch ENI takes one address)
Per subnet s: supply(s) = free addresses EC2 last reported, less what its nodes' demand grew by since then
(in whole /28 blocks under prefix delegation). It may go below zero: predicted warm IPs the subnet could not
really give, which the zone figure then takes back.
Per zone z, each node first uses its own warm IPs and then draws on the zone's shared subnet supply:
  headroom = sum min(room, warm) + min(sum max(0, room - warm), sum supply) - unbound reservations - pending
Unbound reservations are those not on a known node (node-bound ones are already inside room and warm);
pending pods are unbound pods that ipguard steered to the zone.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cachetools import TTLCache

from webhook.model.cni import CniSettings, predict_held
from webhook.model.limits import (
    PREFIX_SIZE,
    InstanceLimits,
    LimitsTable,
    UnknownInstanceType,
    pod_ip_capacity,
    uses_prefixes,
)

Clock = Callable[[], float]


class PodUse(enum.IntEnum):
    """What a running pod takes from its node."""

    NONE = 0  # host network, Fargate, Windows: counts against allocatable pods only
    IP = 1  # a warm-pool IP from the node's ENIs
    BRANCH = 2  # its own branch ENI (security groups for pods): one subnet address, no warm-pool IP


@dataclass(slots=True)
class Node:
    name: str
    zone: str | None = None
    instance_type: str | None = None
    pod_subnet: str | None = None
    allocatable_pods: int | None = None
    schedulable: bool = True  # Linux, EC2, not cordoned
    limits: InstanceLimits | None = None
    ec2_held: int | None = None  # IPs held per EC2 DescribeNetworkInterfaces, when known
    # pod counts
    pods: int = 0
    assigned: int = 0
    branch: int = 0
    reserved: int = 0
    # derived, recomputed by the index after every change
    capacity: int = 0
    room: int = 0
    branch_room: int = 0  # branch ENIs still free (security groups for pods)
    held: int = 0
    warm: int = 0
    demand: int = 0
    known: bool = False  # a Node object has been seen (pods may name a node before it arrives)


@dataclass(slots=True)
class Subnet:
    subnet_id: str
    zone: str
    cidr: str = ""
    free_ips: int = 0  # AvailableIpAddressCount at the last refresh
    free_blocks: int | None = None  # free /28 blocks at the last refresh, when known
    demand_at_refresh: int = 0
    demand: int = 0  # sum of its nodes' demand
    nodes: int = 0
    supply: int = 0  # derived: pod IPs it can still hand out to its schedulable nodes
    addresses: int = 0  # derived: the same with or without nodes on it (what new nodes could draw on)
    tags: Mapping[str, str] = field(default_factory=dict)  # its EC2 tags, as last fetched
    launchable: bool = False  # an autoscaler (Karpenter's EC2NodeClass) can launch new nodes into it


@dataclass(slots=True)
class Zone:
    name: str
    nodes: int = 0
    room: int = 0
    branch_room: int = 0
    warm: int = 0
    warm_usable: int = 0  # sum of min(room, warm): pods the nodes can place on their own warm IPs
    beyond_warm: int = 0  # sum of max(0, room - warm) over nodes whose subnet is known: needs subnet addresses
    beyond_warm_unknown: int = 0  # the same over nodes whose subnet has no figures yet: not judged (fail open)
    unknown_subnet_nodes: int = 0  # nodes whose pod subnet has no figures yet
    supply: int = 0  # sum of its subnets' supply (may be negative, see the module docstring)
    addresses: int = 0  # sum of its subnets' addresses, nodes on them or not: what new nodes could get
    reservations: int = 0  # all reservations in the zone
    unbound_reservations: int = 0  # those not on a known node: not yet inside room and warm
    pending: int = 0  # unbound pods that were steered here
    # nodes at or below the node reserve, and nodes with no warm IP (which depend on their subnet)
    full_nodes: set[str] = field(default_factory=set)
    # nodes with no warm IP, by the subnet they depend on (only a dry node in an empty subnet is exhausted)
    dry_nodes: dict[str, set[str]] = field(default_factory=dict)
    subnet_ids: set[str] = field(default_factory=set)
    subnet_tuple: tuple[str, ...] = ()  # sorted subnet_ids, kept for the request path

    def add_subnet(self, subnet_id: str) -> None:
        self.subnet_ids.add(subnet_id)
        self.subnet_tuple = tuple(sorted(self.subnet_ids))

    def discard_subnet(self, subnet_id: str) -> None:
        self.subnet_ids.discard(subnet_id)
        self.subnet_tuple = tuple(sorted(self.subnet_ids))

    @property
    def headroom(self) -> int:
        """Pods needing a warm-pool IP the zone can still take."""
        debit = self.unbound_reservations + self.pending
        return self.warm_usable + min(self.beyond_warm, self.supply) + self.beyond_warm_unknown - debit

    @property
    def branch_headroom(self) -> int:
        """Pods needing a branch ENI (one subnet address each, no warm-pool IP) the zone can still take."""
        debit = self.unbound_reservations + self.pending
        return min(self.branch_room - debit, self.supply - debit)


@dataclass(frozen=True, slots=True)
class Reservation:
    key: str
    zone: str
    node: str | None


@dataclass(frozen=True, slots=True)
class ZoneFigures:
    """One zone's figures at one moment, as a decision or a report uses them."""

    zone: str
    nodes: int
    room: int
    warm_free: int
    subnet_free: int
    reservations: int
    pending: int
    headroom: int
    branch_headroom: int
    subnets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SubnetFigures:
    subnet_id: str
    zone: str
    cidr: str
    free_ips: int
    free_blocks: int | None
    supply: int
    nodes: int


@dataclass(frozen=True, slots=True)
class NodeFigures:
    name: str
    zone: str | None
    instance_type: str | None
    pod_subnet: str | None
    capacity: int
    pods: int
    assigned: int
    reserved: int
    room: int
    warm_free: int


class _ReservationCache(TTLCache[str, Reservation]):
    """A TTL cache that tells the index about every reservation it drops, however it drops it."""

    def __init__(self, ttl: float, timer: Clock, on_release: Callable[[Reservation], None]) -> None:
        super().__init__(maxsize=1_000_000, ttl=ttl, timer=timer)
        self._on_release = on_release

    def expire(self, time: float | None = None) -> list[tuple[str, Reservation]]:
        expired = list(super().expire(time))
        for _, reservation in expired:
            self._on_release(reservation)
        return expired

    def popitem(self) -> tuple[str, Reservation]:
        key, reservation = super().popitem()
        self._on_release(reservation)
        return key, reservation


# A pod entry: (node name or None, use, zone it was steered to while unbound or None).
PodEntry = tuple[str | None, PodUse, str | None]


class CapacityIndex:
    def __init__(
        self,
        limits: LimitsTable | None = None,
        cni: CniSettings | None = None,
        *,
        node_reserve: int = 0,
        reservation_ttl: float = 30.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.limits = limits or LimitsTable()
        self.cni = cni or CniSettings()
        self.node_reserve = node_reserve
        self.clock = clock
        self.nodes: dict[str, Node] = {}
        self.subnets: dict[str, Subnet] = {}
        self.zones: dict[str, Zone] = {}
        self.pods: dict[str, PodEntry] = {}
        self.unknown_types: set[str] = set()
        self.version = 0  # bumped by every change, so a caller can tell if figures moved
        self._reservations = _ReservationCache(reservation_ttl, clock, self._released)

    # ---- settings -------------------------------------------------------------------------------------

    def set_cni(self, cni: CniSettings) -> None:
        """New CNI settings change every node's capacity and warm pool: recompute all (rare)."""
        self.cni = cni
        self._recompute_all()

    def set_node_reserve(self, node_reserve: int) -> None:
        self.node_reserve = node_reserve
        self._recompute_all()

    def set_reservation_ttl(self, ttl: float) -> None:
        if ttl == self._reservations.ttl:
            return
        old = self._reservations
        old.expire()
        self._reservations = _ReservationCache(ttl, self.clock, self._released)
        for key, reservation in list(old.items()):
            self._reservations[key] = reservation  # restarts its TTL: a longer hold, never a lost one

    def _recompute_all(self) -> None:
        for node in self.nodes.values():
            self._detach(node)
            if node.instance_type is not None:
                node.limits = self._lookup(node.instance_type)
            self._attach(node)
        for subnet in self.subnets.values():
            # Baselines stay: what nodes drew since EC2's last figure is still drawn.
            self._refresh_supply(subnet)
        self.version += 1

    # ---- nodes ----------------------------------------------------------------------------------------

    def _lookup(self, instance_type: str) -> InstanceLimits | None:
        try:
            return self.limits.get(instance_type)
        except UnknownInstanceType:
            # Judge such a node by its allocatable pods alone; `unknown_types` makes it visible.
            self.unknown_types.add(instance_type)
            return None

    def upsert_node(
        self,
        name: str,
        *,
        zone: str | None,
        instance_type: str | None,
        pod_subnet: str | None,
        allocatable_pods: int | None,
        schedulable: bool = True,
    ) -> None:
        node = self.nodes.get(name)
        if node is None:
            node = self.nodes[name] = Node(name)
        else:
            self._detach(node)
        node.known = True
        node.zone = zone
        if instance_type != node.instance_type or node.limits is None:
            node.limits = self._lookup(instance_type) if instance_type else None
        node.instance_type = instance_type
        node.pod_subnet = pod_subnet
        node.allocatable_pods = allocatable_pods
        node.schedulable = schedulable
        self._attach(node)
        self.version += 1

    def remove_node(self, name: str) -> None:
        node = self.nodes.get(name)
        if node is None:
            return
        self._detach(node)
        node.known = False
        node.zone = None
        node.pod_subnet = None
        node.ec2_held = None
        if node.pods == 0 and node.reserved == 0:
            del self.nodes[name]
        else:
            # Its pods' DELETE events are still to come; keep their counts so they cancel out.
            self._attach(node)
        self.version += 1

    def set_node_held(self, name: str, held_ips: int | None) -> None:
        """IPs the node holds according to EC2 (None: unknown, predict it)."""
        node = self.nodes.get(name)
        if node is None:
            return
        self._detach(node)
        node.ec2_held = held_ips
        self._attach(node)
        self.version += 1

    def _node_counted(self, node: Node) -> bool:
        return node.known and node.schedulable and node.zone is not None

    def _derive(self, node: Node) -> None:
        limits = node.limits
        used = node.assigned + node.reserved
        if limits is None:
            node.capacity = node.allocatable_pods or 0
            node.held = node.ec2_held if node.ec2_held is not None else used
        else:
            node.capacity = pod_ip_capacity(limits, self.cni.mode)
            if node.ec2_held is not None:
                node.held = node.ec2_held
            else:
                node.held = predict_held(used, limits, self.cni).ips
        ip_room = node.capacity - used
        if node.allocatable_pods is not None:
            ip_room = min(ip_room, node.allocatable_pods - node.pods - node.reserved)
        node.room = max(0, ip_room)
        branch_limit = limits.branch_enis if limits is not None and self.cni.pod_eni else 0
        pod_room = node.room if node.allocatable_pods is None else node.allocatable_pods - node.pods
        node.branch_room = max(0, min(branch_limit - node.branch, pod_room - node.reserved))
        node.warm = max(0, node.held - used)
        demand = max(node.held, used)
        if limits is not None and uses_prefixes(limits, self.cni.mode):
            demand = -(-demand // PREFIX_SIZE) * PREFIX_SIZE  # whole /28s
        node.demand = demand + node.branch  # a branch ENI takes one address of its own

    def _attach(self, node: Node) -> None:
        """Add a node's contribution to its zone and subnet (after recomputing it)."""
        self._derive(node)
        self._contribute(node, 1)

    def _detach(self, node: Node) -> None:
        """Take a node's contribution out of its zone and subnet (before changing it)."""
        self._contribute(node, -1)

    def _contribute(self, node: Node, sign: int, zones: dict[str, Zone] | None = None,
                    subnets: dict[str, Subnet] | None = None) -> None:
        """Add (sign 1) or take out (sign -1) a node's figures in its zone's and subnet's sums. `recount` passes
        fresh dicts and leaves supply to be computed after."""
        counted = self._node_counted(node)
        # A cordoned node is not counted in its zone but still holds its addresses: it stays in its subnet.
        subnet = (subnets if subnets is not None else self.subnets).get(node.pod_subnet or "") if node.known else None
        if counted:
            assert node.zone is not None
            zone = self._zone(node.zone) if zones is None else zones.setdefault(node.zone, Zone(node.zone))
            zone.nodes += sign
            zone.room += sign * node.room
            zone.branch_room += sign * node.branch_room
            zone.warm += sign * node.warm
            zone.warm_usable += sign * min(node.room, node.warm)
            if subnet is not None:
                zone.beyond_warm += sign * max(0, node.room - node.warm)
            else:
                zone.beyond_warm_unknown += sign * max(0, node.room - node.warm)
                zone.unknown_subnet_nodes += sign
            if node.room <= self.node_reserve and sign > 0:
                zone.full_nodes.add(node.name)
            elif sign < 0:
                zone.full_nodes.discard(node.name)
            if node.warm == 0 and subnet is not None and sign > 0:
                zone.dry_nodes.setdefault(subnet.subnet_id, set()).add(node.name)
            elif subnet is not None and sign < 0:
                dry = zone.dry_nodes.get(subnet.subnet_id)
                if dry is not None:
                    dry.discard(node.name)
                    if not dry:
                        del zone.dry_nodes[subnet.subnet_id]
        if subnet is not None:
            subnet.nodes += sign * counted
            subnet.demand += sign * node.demand
            if subnets is None:
                self._refresh_supply(subnet)

    def _zone(self, name: str) -> Zone:
        zone = self.zones.get(name)
        if zone is None:
            zone = self.zones[name] = Zone(name)
        return zone

    # ---- subnets --------------------------------------------------------------------------------------

    def upsert_subnet(
        self,
        subnet_id: str,
        *,
        zone: str,
        cidr: str = "",
        free_ips: int,
        free_blocks: int | None = None,
        tags: Mapping[str, str] | None = None,
        launchable: bool | None = None,
    ) -> None:
        """A fresh DescribeSubnets figure: what its nodes held until now is already outside `free_ips`."""
        subnet = self.subnets.get(subnet_id)
        users: list[Node] = []
        if subnet is None or subnet.zone != zone:
            # Its nodes change how they count (known supply, or another zone): take them out and back in.
            users = [n for n in self.nodes.values() if n.known and n.pod_subnet == subnet_id]
            for node in users:
                self._detach(node)
            if subnet is None:
                subnet = self.subnets[subnet_id] = Subnet(subnet_id, zone)
            else:
                self._set_supply_in_zone(subnet, 0, 0)
                self.zones[subnet.zone].discard_subnet(subnet_id)
                subnet.zone = zone
            self._zone(zone).add_subnet(subnet_id)
        subnet.cidr = cidr or subnet.cidr
        subnet.free_ips = max(0, free_ips)
        subnet.free_blocks = None if free_blocks is None else max(0, free_blocks)
        if tags is not None:
            subnet.tags = dict(tags)
        if launchable is not None:
            subnet.launchable = launchable
        for node in users:
            self._attach(node)
        self._set_subnet_supply(subnet, subnet.demand)
        self.version += 1

    def remove_subnet(self, subnet_id: str) -> None:
        subnet = self.subnets.get(subnet_id)
        if subnet is None:
            return
        users = [n for n in self.nodes.values() if n.known and n.pod_subnet == subnet_id]
        for node in users:
            self._detach(node)
        self._set_supply_in_zone(subnet, 0, 0)
        del self.subnets[subnet_id]
        self.zones[subnet.zone].discard_subnet(subnet_id)
        for node in users:
            self._attach(node)  # their subnet is unknown again: not judged on it
        self.version += 1

    def _set_subnet_supply(self, subnet: Subnet, demand_at_refresh: int) -> None:
        subnet.demand_at_refresh = demand_at_refresh
        self._refresh_supply(subnet)

    def _subnet_addresses(self, subnet: Subnet) -> int:
        """Addresses the subnet can still give; below zero when predicted warm IPs outran it."""
        grown = subnet.demand - subnet.demand_at_refresh
        if self.cni.prefix_delegation:
            # A /28 needs 16 contiguous free addresses; without a block count, assume no fragmentation.
            blocks = subnet.free_blocks if subnet.free_blocks is not None else subnet.free_ips // PREFIX_SIZE
            return (blocks - -(-grown // PREFIX_SIZE)) * PREFIX_SIZE  # growth takes whole blocks
        return subnet.free_ips - grown

    def _subnet_supply(self, subnet: Subnet) -> int:
        """What the subnet's schedulable nodes can draw on (none: nothing to draw with)."""
        return self._subnet_addresses(subnet) if subnet.nodes else 0

    def _refresh_supply(self, subnet: Subnet) -> None:
        addresses = self._subnet_addresses(subnet)
        self._set_supply_in_zone(subnet, addresses if subnet.nodes else 0, addresses)

    def _set_supply_in_zone(self, subnet: Subnet, supply: int, addresses: int) -> None:
        zone = self._zone(subnet.zone)
        zone.supply += supply - subnet.supply
        zone.addresses += addresses - subnet.addresses
        subnet.supply, subnet.addresses = supply, addresses

    # ---- pods -----------------------------------------------------------------------------------------

    def upsert_pod(
        self, key: str, node_name: str | None, use: PodUse, *, steered_zone: str | None = None
    ) -> None:
        """A pod as the watch shows it. Terminal pods (Succeeded/Failed) must be removed, not upserted."""
        old = self.pods.get(key)
        entry: PodEntry = (node_name, use, None if node_name else steered_zone)
        if old == entry:
            if node_name is not None or entry[2] is not None:
                self.release(key)  # a reservation taken after the pod was already seen
            return
        if old is not None:
            self._unapply(old)
        self.pods[key] = entry
        self._apply(entry)
        if node_name is not None or entry[2] is not None:
            # Bound (its real usage) or counted as pending in its steered zone: either replaces the reservation.
            self.release(key)
        self.version += 1

    def remove_pod(self, key: str) -> None:
        old = self.pods.pop(key, None)
        if old is not None:
            self._unapply(old)
            self.version += 1
        self.release(key)

    def _apply(self, entry: PodEntry) -> None:
        self._count(entry, 1)

    def _unapply(self, entry: PodEntry) -> None:
        self._count(entry, -1)

    def _count(self, entry: PodEntry, sign: int) -> None:
        node_name, use, steered_zone = entry
        if node_name is None:
            if steered_zone is not None:
                self._zone(steered_zone).pending += sign
            return
        node = self.nodes.get(node_name)
        if node is None:
            node = self.nodes[node_name] = Node(node_name)
        self._detach(node)
        node.pods += sign
        if use is PodUse.IP:
            node.assigned += sign
        elif use is PodUse.BRANCH:
            node.branch += sign
        self._attach(node)
        if not node.known and node.pods == 0 and node.reserved == 0:
            del self.nodes[node_name]

    # ---- reservations ---------------------------------------------------------------------------------

    def reserve(self, key: str, zone: str, node: str | None = None) -> None:
        """Hold one pod IP in `zone` (on `node` when known) until the pod is seen bound or the TTL passes."""
        self._reservations.expire()
        old = self._reservations.pop(key, None)  # pop does not go through the release hook
        if old is not None:
            self._hold(old, -1)
        known = self.nodes.get(node) if node else None
        # A reservation on a node the index cannot count yet is held against the zone instead.
        reservation = Reservation(key, zone, node if known and self._node_counted(known) else None)
        self._hold(reservation, 1)
        self._reservations[key] = reservation
        self.version += 1

    def release(self, key: str) -> None:
        reservation = self._reservations.get(key)
        if reservation is not None:
            del self._reservations[key]
            self._hold(reservation, -1)
            self.version += 1

    def _released(self, reservation: Reservation) -> None:
        self._hold(reservation, -1)
        self.version += 1

    def _hold(self, reservation: Reservation, sign: int) -> None:
        self._zone(reservation.zone).reservations += sign
        if reservation.node is None:
            self._zone(reservation.zone).unbound_reservations += sign
            return
        # The node record outlives a node deletion while it still carries reservations.
        node = self.nodes[reservation.node]
        self._detach(node)
        node.reserved += sign
        self._attach(node)
        if not node.known and node.pods == 0 and node.reserved == 0:
            del self.nodes[node.name]

    def reservations(self) -> list[Reservation]:
        self._reservations.expire()
        return list(self._reservations.values())

    def expire(self) -> None:
        """Drop reservations whose TTL has passed (also done by every query)."""
        self._reservations.expire()

    # ---- queries --------------------------------------------------------------------------------------

    def zone_names(self) -> list[str]:
        """Zones with schedulable nodes."""
        return sorted(name for name, zone in self.zones.items() if zone.nodes > 0)

    def has_nodes(self) -> bool:
        return any(zone.nodes > 0 for zone in self.zones.values())

    def candidate_zones(self) -> list[str]:
        """Zones a pod could be placed in: with nodes, or with pod subnets new nodes could launch into
        (unordered: this runs per request)."""
        return [name for name, zone in self.zones.items() if zone.nodes > 0 or zone.subnet_ids]

    def zone_headroom(self, name: str) -> int:
        self._reservations.expire()
        zone = self.zones.get(name)
        return zone.headroom if zone is not None else 0

    def node_room(self, name: str) -> int:
        self._reservations.expire()
        node = self.nodes.get(name)
        return node.room if node is not None else 0

    def _ip_at_hand(self, node: Node) -> bool:
        """A warm IP on the node, or a subnet that can still supply one. With no subnet data we cannot tell
        the node is dry: do not call it exhausted."""
        if node.warm > 0:
            return True
        subnet = self.subnets.get(node.pod_subnet) if node.pod_subnet else None
        return subnet is None or subnet.supply > 0

    def node_has_address(self, node: Node) -> bool:
        """An IP slot free on the node (pods aside), and an IP at hand for it."""
        return node.capacity - node.assigned - node.reserved > self.node_reserve and self._ip_at_hand(node)

    def node_can_take(self, node: Node) -> bool:
        """Room for one more pod, and an IP at hand for it."""
        return node.room > self.node_reserve and self._ip_at_hand(node)

    def exhausted_nodes(self, zone_name: str) -> Iterator[str]:
        """Nodes in the zone that cannot take a pod now: full, or dry with an empty subnet. Walks only those."""
        zone = self.zones.get(zone_name)
        if zone is None:
            return
        yield from zone.full_nodes
        for subnet_id, names in zone.dry_nodes.items():
            if self.subnets[subnet_id].supply > 0:
                continue
            for name in names:
                if name not in zone.full_nodes and self.nodes[name].room > self.node_reserve:
                    yield name

    def exhausted_count(self, zone_name: str) -> int:
        """An upper bound on len(exhausted_nodes(zone)), in O(subnets)."""
        zone = self.zones.get(zone_name)
        if zone is None:
            return 0
        return len(zone.full_nodes) + sum(
            len(names) for sid, names in zone.dry_nodes.items() if self.subnets[sid].supply <= 0
        )

    def zone_figures(self, name: str, *, expire: bool = True) -> ZoneFigures:
        """One zone's figures (`expire=False` when the caller has just expired reservations itself)."""
        if expire:
            self._reservations.expire()
        zone = self.zones.get(name) or Zone(name)
        subnets = tuple(sorted(s for s in zone.subnet_ids if self.subnets[s].nodes))
        return ZoneFigures(
            zone=name,
            nodes=zone.nodes,
            room=zone.room,
            warm_free=zone.warm,
            subnet_free=max(0, zone.supply),
            reservations=zone.reservations,
            pending=zone.pending,
            headroom=zone.headroom,
            branch_headroom=zone.branch_headroom,
            subnets=subnets,
        )

    def node_figures(self, name: str) -> NodeFigures | None:
        self._reservations.expire()
        node = self.nodes.get(name)
        if node is None or not node.known:
            return None
        return NodeFigures(
            name=node.name,
            zone=node.zone,
            instance_type=node.instance_type,
            pod_subnet=node.pod_subnet,
            capacity=node.capacity,
            pods=node.pods,
            assigned=node.assigned,
            reserved=node.reserved,
            room=node.room,
            warm_free=node.warm,
        )

    def subnet_figures(self) -> list[SubnetFigures]:
        self._reservations.expire()
        return [
            SubnetFigures(s.subnet_id, s.zone, s.cidr, s.free_ips, s.free_blocks, max(0, s.supply), s.nodes)
            for s in sorted(self.subnets.values(), key=lambda s: (s.zone, s.subnet_id))
        ]

    def snapshot(self) -> IndexSnapshot:
        """Every zone's and subnet's figures at one moment (one version of the index)."""
        self._reservations.expire()
        return IndexSnapshot(
            version=self.version,
            zones=tuple(self.zone_figures(z) for z in sorted(self.zones) if self.zones[z].nodes > 0),
            subnets=tuple(self.subnet_figures()),
            pods=len(self.pods),
            nodes=sum(1 for n in self.nodes.values() if n.known),
            reservations=len(self._reservations),
            unknown_types=tuple(sorted(self.unknown_types)),
        )

    # ---- checking -------------------------------------------------------------------------------------

    def recount(self) -> dict[str, Any]:
        """Aggregates recomputed from scratch, without the incremental path, to check it."""
        self._reservations.expire()
        nodes = {
            name: Node(n.name, n.zone, n.instance_type, n.pod_subnet, n.allocatable_pods, n.schedulable,
                       n.limits, n.ec2_held, known=n.known)
            for name, n in self.nodes.items()
        }
        zones: dict[str, Zone] = {}
        for node_name, use, steered_zone in self.pods.values():
            if node_name is None:
                if steered_zone is not None:
                    zones.setdefault(steered_zone, Zone(steered_zone)).pending += 1
                continue
            node = nodes.setdefault(node_name, Node(node_name))
            node.pods += 1
            node.assigned += use is PodUse.IP
            node.branch += use is PodUse.BRANCH
        for reservation in self._reservations.values():
            zone = zones.setdefault(reservation.zone, Zone(reservation.zone))
            zone.reservations += 1
            if reservation.node is None:
                zone.unbound_reservations += 1
            else:
                nodes.setdefault(reservation.node, Node(reservation.node)).reserved += 1
        subnets = {
            sid: Subnet(sid, s.zone, s.cidr, s.free_ips, s.free_blocks, s.demand_at_refresh)
            for sid, s in self.subnets.items()
        }
        for node in nodes.values():
            self._derive(node)
            self._contribute(node, 1, zones, subnets)
        for subnet in subnets.values():
            subnet.supply = self._subnet_supply(subnet)
            subnet.addresses = self._subnet_addresses(subnet)
            zone = zones.setdefault(subnet.zone, Zone(subnet.zone))
            zone.supply += subnet.supply
            zone.addresses += subnet.addresses
        return _aggregates(zones, subnets, nodes)

    def aggregates(self) -> dict[str, Any]:
        """The incrementally kept aggregates, in the form `recount` gives."""
        self._reservations.expire()
        return _aggregates(self.zones, self.subnets, self.nodes)


def _aggregates(zones: dict[str, Zone], subnets: dict[str, Subnet], nodes: dict[str, Node]) -> dict[str, Any]:
    return {
        "zones": {
            z.name: (
                z.nodes, z.room, z.branch_room, z.warm, z.warm_usable, z.beyond_warm, z.supply, z.reservations,
                z.unbound_reservations, z.pending, z.beyond_warm_unknown, z.unknown_subnet_nodes, z.addresses,
                sorted(z.full_nodes),
                sorted((sid, sorted(names)) for sid, names in z.dry_nodes.items() if names),
            )
            for z in zones.values()
            if z.nodes or z.supply or z.addresses or z.reservations or z.pending
        },
        "subnets": {s.subnet_id: (s.nodes, s.demand, s.supply, s.addresses) for s in subnets.values()},
        "nodes": {
            n.name: (n.known, n.pods, n.assigned, n.branch, n.reserved, n.room, n.branch_room, n.warm, n.demand)
            for n in nodes.values()
            if n.known or n.pods or n.reserved
        },
    }

@dataclass(frozen=True, slots=True)
class IndexSnapshot:
    version: int
    zones: tuple[ZoneFigures, ...]
    subnets: tuple[SubnetFigures, ...]
    pods: int
    nodes: int
    reservations: int
    unknown_types: tuple[str, ...]


def pod_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"

