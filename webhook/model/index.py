"""The capacity index: nodes, subnets, zones, pods and reservations, with aggregates kept current.

Every update is O(1) (amortised): an event touches one pod, its node, that node's pod subnet and zone, and
adjusts their sums by the change it made. No query walks all pods or all nodes. What a node holds and how it
grows are ipamd's rules (`webhook.model.ipamd`); how a subnet's addresses fall among its nodes is
`webhook.model.supply`; this module keeps the books.

Quantities, per node n:
  capacity(n)  pod IPs the node's type holds in the CNI mode (or allocatable pods when the type is unknown);
               none under custom networking when no ENIConfig applies to it
  room(n)      max(0, min(capacity - assigned - reserved, allocatable pods - pods - reserved))
  held(n)      IPs (and ENIs) the node holds from its subnet: EC2's figures when known, else ipamd's prediction;
               each ENI's share stays with the subnet it is in (`Placed`: an ENIConfig change moves no ENI)
  warm(n)      max(0, held - assigned - reserved): IPs ready on the node with no subnet call
  waiting(n)   max(0, assigned + reserved - held): pods on the node with no IP yet; ipamd serves them first
  units(n)     what the subnet must fund for the waiting pods and the room beyond warm: free slots on attached
               ENIs, then whole new ENIs (each its primary address plus its whole request); none when ipamd
               would not grow the node (cordoned, MINIMUM_IP_TARGET reached, max-pods IPs held, ENIs full)
  topup(n)     addresses ipamd will draw to bring its pool back to its warm targets, beyond EC2's last figure
               and the waiting pods (EC2 figures known only: between refreshes)
Per subnet s: supply(s) = free addresses EC2 last reported, less what its nodes drew since (held IPs, /28
blocks, ENI primaries, node primaries, branch ENIs). Its yield serves waiting pods, then new pods, cheapest
units first; what is left is what new nodes could draw on. When that is less than its nodes' top-ups, which
nodes hold its last addresses is not known until the next refresh (`uncertain_nodes`). Below zero, the yield
takes back the warm IPs predicted on nodes EC2 has not shown yet, never more: beyond them, what is out of date
is the subnet's count, not the warm IPs EC2 shows.
Per zone z:
  headroom = sum min(room, warm) + sum of its subnets' yield to new pods - unbound reservations - pending
Unbound reservations are those not on a known node (node-bound ones are already inside room and warm);
pending pods are unbound pods that ipguard steered to the zone.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from webhook.model import ipamd
from webhook.model.cni import CniSettings
from webhook.model.ipamd import HeldAddresses
from webhook.model.limits import (
    PREFIX_SIZE,
    InstanceLimits,
    LimitsTable,
    UnknownInstanceType,
    pod_ip_capacity,
    without_lost_slots,
)
from webhook.model.supply import (
    Demand,
    UnitKind,
    Unserved,
    Yield,
    add_demand,
    discovery_yield,
    new_eni_kind,
    new_node_ips,
    subnet_yield,
)

CNI_SUBNET_TAG = "kubernetes.io/role/cni"  # enhanced subnet discovery: ipamd may create ENIs in such subnets
HOSTNAME_LABEL = "kubernetes.io/hostname"  # on EKS, the node's name

# The zone headroom rule as `zone_headroom` computes it, in words: `ipguard report` prints it and README states it
# (a test keeps README's text equal to this one). Change it together with the computation.
HEADROOM_RULE = (
    "headroom = sum of min(room, warm free) + what the pod subnets can still fund of the nodes' growth (a free "
    "ENI slot one address, a new ENI its primary and its whole request at once; pods waiting for an IP first), "
    "less reservations not yet on a node and pending pods steered there"
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
    cordoned: bool = False  # tainted unschedulable: ipamd gives it no new IP (isENIAttachmentAllowed)
    cooling: int = 0  # IPs freed within IP_COOLDOWN_PERIOD: held, not handed out yet
    branch_cooling: int = 0  # branch ENIs deleted within the branch cooldown: their slot and address still taken
    no_eni_config: bool = False  # custom networking with no ENIConfig for it: no pod ENI, no pod IP
    ec2_enis: int | None = None  # ENIs carrying its pod IPs per EC2, when known
    # per EC2, what it holds in each subnet its pod ENIs are in (None: all in its pod subnet, as far as known)
    ec2_subnets: tuple[tuple[str, HeldAddresses], ...] | None = None
    lost_enis: int = 0  # ENI slots taken by attached ENIs that carry no pod IPs, per EC2 (no_manage, excluded)
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
    held_prefixes: int = 0
    held_enis: int = 0
    warm: int = 0
    waiting: int = 0
    grows: bool = True
    demand: int = 0  # loose addresses drawn from its pod subnet (IPs, ENI and node primaries, branch ENIs)
    demand_blocks: int = 0  # /28 prefixes drawn
    # addresses ipamd will draw to restore its warm targets beyond EC2's last figures and the pods waiting
    # (`increaseDatastorePool` tops the pool up within seconds of the pods that emptied it)
    topup: int = 0
    units: tuple[tuple[UnitKind, Demand], ...] = ()
    # for a node with no warm IP that ipamd would grow (derived then, so the request path only compares):
    next_cost: ipamd.GrowthCost | None = None  # what one more IP beyond the waiting pods takes from its subnet
    own_cost: ipamd.GrowthCost | None = None  # what the waiting pods take
    eni_cost: ipamd.GrowthCost | None = None  # one more ENI (from a discovered subnet)
    known: bool = False  # a Node object has been seen (pods may name a node before it arrives)
    # its ENIs in subnets other than `pod_subnet` (where new ENIs come from): what they hold and can still grow
    elsewhere: tuple[Placed, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)  # its labels, for pods that select nodes by them
    windows: bool = False  # a Windows node: its own IPAM, never judged on ipamd's

    @property
    def idle(self) -> bool:
        """Nothing on the record any more: a removed node's record can go."""
        return not self.known and not (self.pods or self.reserved or self.cooling or self.branch_cooling)

    @property
    def held_addresses(self) -> HeldAddresses:
        return HeldAddresses(self.held, self.held_prefixes, self.held_enis)


@dataclass(frozen=True, slots=True)
class Placed:
    """A node's ENIs in a subnet other than the one its new ENIs come from: attached before its ENIConfig (or the
    ENIConfig's subnet) changed, or created there by subnet discovery. ipamd never moves an attached ENI: what it
    holds stays taken from that subnet, and its free slots are filled from that subnet (`tryAssignIPs` /
    `tryAssignPrefixes` call AssignPrivateIpAddresses on the ENI itself); only new ENIs (`tryAllocateENI`) use
    the ENIConfig's subnet, looked up again (`MyENIConfig`) each time."""

    subnet_id: str
    demand: int  # loose addresses its ENIs hold there (secondary IPs and each ENI's primary)
    blocks: int  # /28 prefixes they hold there
    free_slots: int  # slots (IPs, or prefixes) still free on those ENIs
    units: tuple[tuple[UnitKind, Demand], ...]  # the node's growth those free slots carry


@dataclass(slots=True)
class Subnet:
    subnet_id: str
    zone: str
    cidr: str = ""
    free_ips: int = 0  # AvailableIpAddressCount at the last refresh
    free_blocks: int | None = None  # free /28 blocks at the last refresh, when known
    demand_at_refresh: int = 0
    blocks_at_refresh: int = 0
    demand: int = 0  # sum of its nodes' demand (loose addresses)
    demand_blocks: int = 0  # sum of its nodes' /28 prefixes
    nodes: int = 0
    wants: dict[UnitKind, Demand] = field(default_factory=dict)  # its nodes' growth units, summed by kind
    topups: int = 0  # sum of its nodes' top-ups
    # sum of min(room, warm) of its nodes whose warm IPs are predicted (no EC2 figure yet): the only warm IPs a
    # shortfall may take back. Below zero by EC2's own figures, the subnet's count is what is out of date.
    predicted_warm: int = 0
    tags: Mapping[str, str] = field(default_factory=dict)  # its EC2 tags, as last fetched
    launchable: bool = False  # an autoscaler (Karpenter's EC2NodeClass) can launch new nodes into it
    held_only: bool = False  # known only because nodes hold ENIs in it: no ENIConfig or node puts new ENIs there
    # derived from the above by `_refresh_supply`
    supply: int = 0  # free addresses now, less what its nodes drew since the refresh (may be negative)
    supply_blocks: int = 0
    growth: int = 0  # pod IPs new pods on its nodes can still get (negative: predicted IPs it cannot fund)
    waiting_served: int = 0
    left: int = 0  # addresses once the waiting pods are served
    left_blocks: int = 0
    addresses: int = 0  # pod IPs new nodes could still get from it
    usable: int = 0  # what its schedulable nodes can draw on (whole /28s under prefix delegation)
    loose: int = 0  # the same in single addresses, whatever the mode (a branch ENI takes one)
    unserved: Unserved = ()  # its nodes' new ENIs it could not fund (subnet discovery may)
    spare: tuple[int, int] = (0, 0)  # (addresses, blocks) free once its own nodes' growth is funded
    # what is left cannot fund every node's top-up: its last addresses go to whichever nodes' ipamd asks first,
    # so a node ipguard last saw with no warm IP may have none now while another has a few
    topups_short: bool = False

    @property
    def discoverable(self) -> bool:
        """Tagged for enhanced subnet discovery and not opted out: `isSubnetValidForENICreation` (a tag with an
        empty value counts as no tag, `0` excludes)."""
        value = self.tags.get(CNI_SUBNET_TAG)
        return bool(value) and value != "0"


@dataclass(slots=True)
class Zone:
    name: str
    nodes: int = 0
    room: int = 0
    branch_room: int = 0
    warm: int = 0
    warm_usable: int = 0  # sum of min(room, warm): pods the nodes can place on their own warm IPs
    beyond_warm_unknown: int = 0  # max(0, room - warm) over nodes whose subnet has no figures yet (fail open)
    unknown_subnet_nodes: int = 0  # nodes whose pod subnet has no figures yet
    no_config_nodes: int = 0  # custom networking: nodes no ENIConfig applies to (no pod IPs)
    waiting: int = 0  # pods on its nodes with no IP yet
    cooling: int = 0  # freed IPs in cooldown on nodes with room: back within IP_COOLDOWN_PERIOD
    supply: int = 0  # sum of its subnets' supply (may be negative, see the module docstring)
    loose_supply: int = 0  # the same in single addresses under prefix delegation too (branch ENIs take one each)
    growth: int = 0  # sum of its subnets' yield to new pods on its nodes
    discovery_growth: int = 0  # new pods whose ENIs only the zone's discovery-tagged subnets can fund
    discovery_waiting_served: int = 0
    waiting_served: int = 0
    addresses: int = 0  # sum of its subnets' addresses for new nodes
    reservations: int = 0  # all reservations in the zone
    unbound_reservations: int = 0  # those not on a known node: not yet inside room and warm
    pending: int = 0  # unbound pods that were steered here
    # nodes at or below the node reserve that still have a pod slot (the scheduler, blind to IPs, would bind
    # there), and nodes with no warm IP (which depend on their subnet)
    full_nodes: set[str] = field(default_factory=set)
    # nodes with no warm IP, by the subnet they depend on (only a dry node in an empty subnet is exhausted)
    dry_nodes: dict[str, set[str]] = field(default_factory=dict)
    subnet_ids: set[str] = field(default_factory=set)
    subnet_tuple: tuple[str, ...] = ()  # sorted subnet_ids, kept for the request path
    discoverable: set[str] = field(default_factory=set)  # its subnets tagged for subnet discovery
    topups_short: int = 0  # its subnets that cannot fund every node's top-up (see Subnet.topups_short)

    def add_subnet(self, subnet_id: str, discoverable: bool = False) -> None:
        self.subnet_ids.add(subnet_id)
        self.subnet_tuple = tuple(sorted(self.subnet_ids))
        if discoverable:
            self.discoverable.add(subnet_id)
        else:
            self.discoverable.discard(subnet_id)

    def discard_subnet(self, subnet_id: str) -> None:
        self.subnet_ids.discard(subnet_id)
        self.discoverable.discard(subnet_id)
        self.subnet_tuple = tuple(sorted(self.subnet_ids))

    @property
    def headroom(self) -> int:
        """Pods needing a warm-pool IP the zone can still take."""
        debit = self.unbound_reservations + self.pending
        return self.warm_usable + self.growth + self.discovery_growth + self.beyond_warm_unknown - debit

    @property
    def branch_headroom(self) -> int:
        """Pods needing a branch ENI (one subnet address each, no warm-pool IP) the zone can still take."""
        debit = self.unbound_reservations + self.pending
        return min(self.branch_room - debit, self.loose_supply - debit)


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
    waiting: int = 0  # pods on its nodes with no IP yet
    waiting_served: int = 0  # of those, how many its subnets can still serve
    new_node_ips: int = 0  # pod IPs new nodes could still get from its subnets


@dataclass(frozen=True, slots=True)
class SubnetFigures:
    subnet_id: str
    zone: str
    cidr: str
    free_ips: int
    free_blocks: int | None
    supply: int
    nodes: int
    waiting_served: int = 0
    left: int = 0  # free addresses once the waiting pods are served
    new_node_ips: int = 0
    topups: int = 0  # what its nodes' ipamd will draw to restore their warm targets since EC2's last figures
    topups_short: bool = False  # what is left cannot fund them all (see Subnet.topups_short)


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
    held: int = 0
    enis: int = 0
    waiting: int = 0
    grows: bool = True
    cordoned: bool = False
    no_eni_config: bool = False


V = TypeVar("V")
_NO_NODES: frozenset[str] = frozenset()


class _ExpiringCache(Generic[V]):
    """Entries that expire `ttl` seconds after they were set, telling the index about each one that expires.
    An entry past its time is invisible at once and released by the next `expire` (or set). The TTL is fixed,
    so entries expire in the order they were set: a queue, not a heap (a pod event sets one)."""

    def __init__(self, ttl: float, timer: Clock, on_release: Callable[[V], None]) -> None:
        self.ttl = ttl
        self._timer = timer
        self._on_release = on_release
        self._entries: dict[str, tuple[float, V]] = {}
        self._order: deque[tuple[float, str]] = deque()

    def __setitem__(self, key: str, value: V) -> None:
        now = self._timer()
        self.expire(now)
        expires = now + self.ttl
        self._entries[key] = (expires, value)
        self._order.append((expires, key))

    def __delitem__(self, key: str) -> None:
        del self._entries[key]

    def __len__(self) -> int:
        return len(self.values())

    def _live(self, key: str) -> tuple[float, V] | None:
        entry = self._entries.get(key)
        return entry if entry is not None and self._timer() < entry[0] else None

    def get(self, key: str) -> V | None:
        entry = self._live(key)
        return entry[1] if entry is not None else None

    def pop(self, key: str, default: V | None = None) -> V | None:
        """Take an entry out without releasing it (the caller accounts for it)."""
        entry = self._live(key)
        if entry is None:
            return default
        del self._entries[key]
        return entry[1]

    def values(self) -> list[V]:
        now = self._timer()
        return [value for expires, value in self._entries.values() if now < expires]

    def items(self) -> list[tuple[str, V]]:
        now = self._timer()
        return [(key, value) for key, (expires, value) in self._entries.items() if now < expires]

    def expire(self, time: float | None = None) -> list[tuple[str, V]]:
        now = self._timer() if time is None else time
        order, entries = self._order, self._entries
        expired: list[tuple[str, V]] = []
        while order and order[0][0] <= now:
            expires, key = order.popleft()
            entry = entries.get(key)
            if entry is not None and entry[0] == expires:  # not set again or taken out since
                del entries[key]
                expired.append((key, entry[1]))
        for _, value in expired:
            self._on_release(value)
        return expired


@dataclass(frozen=True, slots=True)
class Cooling:
    """An address freed by a pod on a node, which ipamd does not hand out again before its cooldown ends."""

    node: str
    branch: bool  # a branch ENI (the resource controller's cooldown), else a warm-pool IP (ipamd's)


# What a node's contribution put in the subnets' sums: (pod subnet, counted, demand, /28 blocks, growth units,
# its parts in other subnets, its top-up, its predicted warm IPs).
_Brought = tuple[Subnet | None, bool, int, int, tuple[tuple[UnitKind, Demand], ...], tuple[Placed, ...], int, int]

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
        self._rules = ipamd.Rules(self.cni)
        self.node_reserve = node_reserve
        self.clock = clock
        self.nodes: dict[str, Node] = {}
        self.subnets: dict[str, Subnet] = {}
        self.zones: dict[str, Zone] = {}
        self.pods: dict[str, PodEntry] = {}
        self.unknown_types: set[str] = set()
        self.version = 0  # bumped by every change, so a caller can tell if figures moved
        # bumped by every change but a reservation held against a zone alone (no node or subnet figure moves)
        self.node_version = 0
        self._new_node_cost: ipamd.GrowthCost | None = None
        self._type_counts: dict[InstanceLimits, int] = {}  # known nodes by their limits
        self._labelled: dict[tuple[str, str], set[str]] = {}  # (label, value) -> known nodes carrying it
        self._dirty: list[Subnet] = []  # subnets whose nodes changed, refreshed once the change is whole
        # What a node detached from its subnet, until it is attached again: if it brings back the same, the
        # subnet's sums did not move and its supply need not be worked out again (most pod events).
        self._detached: dict[str, _Brought] = {}
        self._memo: dict[Any, Any] = {}
        self._memo_version = -1
        self._node_memo: dict[Any, Any] = {}
        self._node_memo_version = -1
        self._reservations: _ExpiringCache[Reservation] = _ExpiringCache(reservation_ttl, clock, self._released)
        self._cooling: _ExpiringCache[Cooling] = _ExpiringCache(self.cni.ip_cooldown, clock, self._cooled)
        self._branch_cooling: _ExpiringCache[Cooling] = _ExpiringCache(self.cni.branch_cooldown, clock,
                                                                      self._cooled)

    # ---- settings -------------------------------------------------------------------------------------

    def set_cni(self, cni: CniSettings) -> None:
        """New CNI settings change every node's capacity and warm pool: recompute all (rare)."""
        self.cni = cni
        self._rules = ipamd.Rules(cni)
        self._cooling = self._retimed(self._cooling, cni.ip_cooldown)
        self._recompute_all()

    def set_node_reserve(self, node_reserve: int) -> None:
        self.node_reserve = node_reserve
        self._recompute_all()

    def set_reservation_ttl(self, ttl: float) -> None:
        self._reservations = self._retimed(self._reservations, ttl)

    def _retimed(self, cache: _ExpiringCache[V], ttl: float) -> _ExpiringCache[V]:
        """The same entries under a new TTL: each restarts it (a longer hold, never a lost one)."""
        if ttl == cache.ttl:
            return cache
        cache.expire()
        renewed: _ExpiringCache[V] = _ExpiringCache(ttl, self.clock, cache._on_release)
        for key, value in list(cache.items()):
            renewed[key] = value
        return renewed

    def _recompute_all(self) -> None:
        for node in self.nodes.values():
            self._detach(node)
            self._count_type(node, -1)
            if node.instance_type is not None:
                node.limits = self._lookup(node.instance_type)
            self._count_type(node, 1)
            self._attach(node)
        self._new_node_cost = None
        for subnet in self.subnets.values():
            # Baselines stay: what nodes drew since EC2's last figure is still drawn.
            self._refresh_supply(subnet)
        self._changed()

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
        cordoned: bool = False,
        no_eni_config: bool = False,
        labels: Mapping[str, str] | None = None,
        windows: bool = False,
    ) -> None:
        """A node as the watch shows it. `schedulable`: new pods may be placed there (Linux, EC2, not
        cordoned); `cordoned`: tainted unschedulable, which also stops ipamd growing it; `no_eni_config`: custom
        networking finds no ENIConfig for it; `labels`: its labels (None: unchanged)."""
        node = self.nodes.get(name)
        if node is None:
            node = self.nodes[name] = Node(name)
        else:
            self._detach(node)
            self._count_type(node, -1)
        node.known = True
        node.zone = zone
        if instance_type != node.instance_type or node.limits is None:
            node.limits = self._lookup(instance_type) if instance_type else None
        node.instance_type = instance_type
        node.pod_subnet = pod_subnet
        node.allocatable_pods = allocatable_pods
        node.schedulable = schedulable
        node.cordoned = cordoned
        node.no_eni_config = no_eni_config
        if labels is not None and labels != node.labels:
            self._label(node, -1)
            node.labels = labels
        self._label(node, 1)
        node.windows = windows
        self._count_type(node, 1)
        self._attach(node)
        self._types_changed()
        self._changed()

    def remove_node(self, name: str) -> None:
        node = self.nodes.get(name)
        if node is None:
            return
        self._detach(node)
        self._count_type(node, -1)
        self._label(node, -1)
        node.labels = {}
        node.known = False
        node.zone = None
        node.pod_subnet = None
        node.ec2_held = None
        node.ec2_enis = None
        node.ec2_subnets = None
        node.lost_enis = 0
        if node.idle:
            del self.nodes[name]
            self._flush()
        else:
            # Its pods' DELETE events are still to come; keep their counts so they cancel out.
            self._attach(node)
        self._types_changed()
        self._changed()

    def set_node_held(self, name: str, held_ips: int | None, *, enis: int | None = None,
                      subnets: Mapping[str, HeldAddresses] | None = None, lost_enis: int = 0) -> None:
        """IPs the node holds according to EC2, and the ENIs that carry them (None: unknown, predict it);
        `subnets`: what it holds in each subnet its pod ENIs are in (None: all in its pod subnet); `lost_enis`:
        the ENI slots its other attached ENIs take without carrying pod IPs."""
        node = self.nodes.get(name)
        if node is None:
            return
        self._detach(node)
        node.ec2_held = held_ips
        node.ec2_enis = enis if held_ips is not None else None
        node.ec2_subnets = tuple(sorted(subnets.items())) if subnets is not None and held_ips is not None else None
        node.lost_enis = lost_enis if held_ips is not None else 0
        self._attach(node)
        self._changed()

    def held_subnets(self) -> set[str]:
        """Subnets the nodes' ENIs are in, per EC2's last figures (walks the nodes: for a refresh, not a request)."""
        return {sid for n in self.nodes.values() if n.known and n.ec2_subnets for sid, _ in n.ec2_subnets}

    @staticmethod
    def _uses(node: Node, subnet_id: str) -> bool:
        """The node draws on the subnet: its new ENIs come from there, or it has ENIs attached there."""
        return node.known and (node.pod_subnet == subnet_id or any(sid == subnet_id for sid, _ in
                                                                   node.ec2_subnets or ()))

    def _label(self, node: Node, sign: int) -> None:
        """Index (sign 1) or unindex (-1) the node's labels; indexing twice is harmless. Not the hostname label:
        on EKS it is the node's name, one node per value."""
        for pair in node.labels.items():
            if pair[0] == HOSTNAME_LABEL:
                continue
            names = self._labelled.get(pair)
            if sign > 0:
                if names is None:
                    names = self._labelled[pair] = set()
                names.add(node.name)
            elif names is not None:
                names.discard(node.name)
                if not names:
                    del self._labelled[pair]

    def nodes_labelled(self, key: str, value: str) -> AbstractSet[str]:
        """Known nodes carrying the label `key=value` (O(1): the pods that select nodes by label read this)."""
        return self._labelled.get((key, value), _NO_NODES)

    @staticmethod
    def counted(node: Node) -> bool:
        """The node counts for new pods: known, schedulable (Linux, not cordoned) and in a zone."""
        return node.known and node.schedulable and node.zone is not None

    def _held(self, node: Node, limits: InstanceLimits, used: int) -> HeldAddresses:
        # IPs in cooldown are held (ipamd frees no ENI that has one) though no pod uses them.
        """What the node holds: EC2's figures when known, else what ipamd would hold for its pods."""
        if node.ec2_held is None:
            # No ENIConfig: no pod ENI is attached (MyENIConfig fails before the first one), unless EC2 shows some.
            return HeldAddresses(0) if node.no_eni_config else self._rules.predict_held(used, limits,
                                                                                       node.allocatable_pods)
        if node.ec2_subnets:
            # The prefixes EC2 counted, subnet by subnet (the parts `_place` takes out are the same figures).
            parts = [self._in_mode(held, limits) for _, held in node.ec2_subnets]
            return HeldAddresses(node.ec2_held, sum(p.prefixes for p in parts), sum(p.enis for p in parts))
        prefixes = node.ec2_held // PREFIX_SIZE if ipamd.prefix_delegation_on(limits, self.cni) else 0
        enis = node.ec2_enis
        if enis is None:
            slots = prefixes or node.ec2_held
            per_eni = ipamd.slots_per_eni(limits) or 1
            enis = max(-(-slots // per_eni), 0 if self.cni.custom_networking else 1)
        return HeldAddresses(node.ec2_held, prefixes, enis)

    def _in_mode(self, held: HeldAddresses, limits: InstanceLimits) -> HeldAddresses:
        """EC2's figures for some ENIs as the node's CNI mode counts them: prefixes only under prefix delegation
        (otherwise their addresses are loose ones, as `_held` counts them)."""
        return held if ipamd.prefix_delegation_on(limits, self.cni) else HeldAddresses(held.ips, 0, held.enis)

    def _slot_limits(self, node: Node) -> InstanceLimits | None:
        """The node's limits less the ENI slots its ENIs that carry no pod IPs take (`hasRoomForEni`)."""
        if node.limits is None or not node.lost_enis:
            return node.limits
        return without_lost_slots(node.limits, node.lost_enis, self.cni.mode)

    def _derive(self, node: Node) -> None:
        limits = self._slot_limits(node)
        used = node.assigned + node.reserved
        taken = used + node.cooling  # IPs in cooldown are held but no pod can have them yet
        if limits is None:
            node.capacity = node.allocatable_pods or 0
            held = HeldAddresses(node.ec2_held if node.ec2_held is not None else taken)
        else:
            held = self._held(node, limits, taken)
            node.capacity = pod_ip_capacity(limits, self.cni.mode)
            if node.no_eni_config:
                # No new ENI without an ENIConfig (`tryAllocateENI` -> MyENIConfig fails); the ENIs attached
                # before keep serving pods from their own subnets (`tryAssignIPs` asks no ENIConfig).
                slots = held.enis * ipamd.slots_per_eni(limits) * ipamd.slot_size(limits, self.cni)
                node.capacity = min(node.capacity, slots)
        node.held, node.held_prefixes, node.held_enis = held.ips, held.prefixes, held.enis
        ip_room = node.capacity - used
        if node.allocatable_pods is not None:
            ip_room = min(ip_room, node.allocatable_pods - node.pods - node.reserved)
        node.room = max(0, ip_room)
        branch_limit = limits.branch_enis if limits is not None and self.cni.pod_eni else 0
        pod_room = node.room if node.allocatable_pods is None else node.allocatable_pods - node.pods
        node.branch_room = max(0, min(branch_limit - node.branch - node.branch_cooling, pod_room - node.reserved))
        usable = held.ips - node.cooling
        node.warm = max(0, usable - used)
        node.waiting = max(0, used - usable)
        beyond = max(0, node.room - node.warm) if self.counted(node) else 0
        # EC2 attaches no ENI from a subnet in another Availability Zone (an ENIConfig pointing across zones).
        subnet = self.subnets.get(node.pod_subnet) if node.pod_subnet else None
        across = subnet is not None and node.zone is not None and subnet.zone != node.zone
        if limits is None:
            # An unknown type: judged by its allocatable pods, one address per IP (no ENI figures to go on).
            node.grows = not across
            node.topup = 0
            kind: UnitKind = (1, 0, 1, 1)
            wants = Demand(node.waiting, node.waiting, node.waiting + beyond, beyond)
            node.units = ((kind, wants),) if node.grows else ()
        else:
            node.grows = not node.no_eni_config and not across and self._rules.node_grows(
                held, used, limits, node.allocatable_pods, node.cordoned, node.cooling)
            node.units = self._rules.growth_units(node.waiting, beyond, held, limits) if node.grows else ()
            node.topup = 0
            if node.grows and node.ec2_held is not None:
                settled = self._rules.predict_held(taken, limits, node.allocatable_pods)
                node.topup = max(0, settled.ips - max(held.ips, taken))
            if node.grows and node.warm == 0:
                node.next_cost = ipamd.growth_cost(node.waiting + 1, held, limits, self.cni)
                node.own_cost = ipamd.growth_cost(node.waiting, held, limits, self.cni)
                node.eni_cost = ipamd.new_eni_cost(held, limits, self.cni)
            else:
                node.next_cost = node.own_cost = node.eni_cost = None
        # Every ENI's primary address, the primary ENI's being the node's own: in the pod subnet unless custom
        # networking puts pods elsewhere.
        primaries = held.enis if self.cni.custom_networking else max(held.enis, 1)
        node.demand = (held.ips - held.prefixes * PREFIX_SIZE) + primaries + node.branch + node.branch_cooling
        node.demand_blocks = held.prefixes
        node.elsewhere = self._place(node, limits) if node.ec2_subnets and limits else ()

    def _place(self, node: Node, limits: InstanceLimits) -> tuple[Placed, ...]:
        """Take out of the node's pod-subnet figures what its ENIs in other (known) subnets hold and can still
        grow, and return it per subnet. Free slots are filled in the pod subnet's ENIs first, then the others
        (ipamd picks among attached ENIs in no set order); new ENIs stay with the pod subnet."""
        assert node.ec2_subnets is not None
        known = self.subnets
        # (EC2 attaches no ENI from another zone's subnet: such a figure is debited, never grown from.)
        parts = [(sid, self._in_mode(held, limits)) for sid, held in node.ec2_subnets
                 if sid != node.pod_subnet and sid in known]
        apart = {sid for sid, _ in parts if known[sid].zone != node.zone}
        if not parts:
            return ()
        if node.no_eni_config or node.pod_subnet not in known:
            # No growth to place (no ENIConfig: no new ENI; no figures for its pod subnet: judged on its room
            # alone, nothing of it counted there), but its attached ENIs keep their addresses where they are.
            return tuple(Placed(sid, held.ips - held.prefixes * PREFIX_SIZE + held.enis, held.prefixes, 0, ())
                         for sid, held in parts)
        frees = [0 if sid in apart else ipamd.free_attached_slots(held, limits, self.cni) for sid, held in parts]
        own_free = max(ipamd.free_attached_slots(node.held_addresses, limits, self.cni) - sum(frees), 0)
        units = list(node.units)
        split: list[tuple[tuple[UnitKind, Demand], ...]] = [() for _ in parts]
        if units and not new_eni_kind(units[0][0]):
            kind, attached = units[0]
            gain = kind[2]
            waiting, new = attached.wait_ips, attached.new_ips
            shares: list[tuple[int, int]] = []
            for free in (own_free, *frees):
                room = free * gain
                w = min(waiting, room)
                n = min(new, room - w)
                waiting, new = waiting - w, new - n
                shares.append((w, n))
            own_share, *other_shares = shares
            units[0:1] = [(kind, _attached_demand(gain, *own_share))] if sum(own_share) else []
            split = [((kind, _attached_demand(gain, w, n)),) if w + n else () for w, n in other_shares]
        placed = tuple(
            Placed(sid, held.ips - held.prefixes * PREFIX_SIZE + held.enis, held.prefixes, free, share)
            for (sid, held), free, share in zip(parts, frees, split, strict=True)
        )
        node.units = tuple(units)
        node.demand -= sum(p.demand for p in placed)
        node.demand_blocks -= sum(p.blocks for p in placed)
        return placed

    def _attach(self, node: Node) -> None:
        """Add a node's contribution to its zone and subnet (after recomputing it), and bring the subnets it
        left and joined up to date."""
        self._derive(node)
        self._contribute(node, 1)
        self._flush()

    def _detach(self, node: Node) -> None:
        """Take a node's contribution out of its zone and subnet (before changing it). The subnet's figures
        wait for the `_attach` (or `_flush`) that follows: one refresh per change, not two."""
        self._contribute(node, -1)

    def _flush(self) -> None:
        for taken in self._detached.values():
            self._dirty.extend(self._subnets_of(taken))
        self._detached.clear()
        dirty, self._dirty = self._dirty, []
        for subnet in dirty:
            if self.subnets.get(subnet.subnet_id) is subnet:  # not removed meanwhile
                self._refresh_supply(subnet)

    def _contribute(self, node: Node, sign: int, zones: dict[str, Zone] | None = None,
                    subnets: dict[str, Subnet] | None = None) -> None:
        """Add (sign 1) or take out (sign -1) a node's figures in its zone's and subnet's sums. `recount` passes
        fresh dicts and leaves supply to be computed after."""
        counted = self.counted(node)
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
            zone.waiting += sign * node.waiting
            zone.cooling += sign * min(node.cooling, node.room)
            if node.no_eni_config:
                zone.no_config_nodes += sign
            elif subnet is None:
                zone.beyond_warm_unknown += sign * max(0, node.room - node.warm)
                zone.unknown_subnet_nodes += sign
            if node.room <= self.node_reserve and sign > 0 and self.pod_slot(node):
                zone.full_nodes.add(node.name)
            elif sign < 0:
                zone.full_nodes.discard(node.name)
            # by the subnet they depend on ("" for none known: such a node is dry only if ipamd will not grow it)
            dry_key = subnet.subnet_id if subnet is not None else ""
            if node.warm == 0 and sign > 0:
                zone.dry_nodes.setdefault(dry_key, set()).add(node.name)
            elif sign < 0:
                dry = zone.dry_nodes.get(dry_key)
                if dry is not None:
                    dry.discard(node.name)
                    if not dry:
                        del zone.dry_nodes[dry_key]
        predicted = min(node.room, node.warm) if counted and node.ec2_held is None else 0
        if subnet is not None:
            subnet.nodes += sign * counted
            subnet.demand += sign * node.demand
            subnet.demand_blocks += sign * node.demand_blocks
            subnet.topups += sign * node.topup
            subnet.predicted_warm += sign * predicted
            add_demand(subnet.wants, node.units, sign)
        elsewhere = node.elsewhere if node.known else ()
        for part in elsewhere:
            other = (subnets if subnets is not None else self.subnets)[part.subnet_id]
            other.demand += sign * part.demand
            other.demand_blocks += sign * part.blocks
            add_demand(other.wants, part.units, sign)
        if subnets is None:
            self._mark_dirty(node, sign, (subnet, counted, node.demand, node.demand_blocks, node.units, elsewhere,
                                          node.topup, predicted))

    def _mark_dirty(self, node: Node, sign: int, brought: _Brought) -> None:
        """Queue the subnets whose sums a node's detach and attach moved (none when it brought back the same)."""
        if sign < 0:
            self._detached[node.name] = brought
            return
        taken = self._detached.pop(node.name, None)
        if taken is not None and taken[0] is brought[0] and taken[1:] == brought[1:]:
            return
        for subnet in (*(self._subnets_of(taken) if taken is not None else ()), *self._subnets_of(brought)):
            if not self._dirty or self._dirty[-1] is not subnet:
                self._dirty.append(subnet)

    def _subnets_of(self, brought: _Brought) -> Iterator[Subnet]:
        """The subnets whose sums a node's contribution moved: its pod subnet, and those its other ENIs are in."""
        if brought[0] is not None:
            yield brought[0]
        for part in brought[5]:
            other = self.subnets.get(part.subnet_id)
            if other is not None:
                yield other

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
        held_only: bool = False,
    ) -> None:
        """A fresh DescribeSubnets figure: what its nodes held until now is already outside `free_ips`.
        `held_only`: asked for only because nodes hold ENIs there (new ENIs and new nodes use other subnets)."""
        subnet = self.subnets.get(subnet_id)
        users: list[Node] = []
        if subnet is None or subnet.zone != zone:
            # Its nodes change how they count (known supply, or another zone): take them out and back in.
            users = [n for n in self.nodes.values() if self._uses(n, subnet_id)]
            for node in users:
                self._detach(node)
            if subnet is None:
                subnet = self.subnets[subnet_id] = Subnet(subnet_id, zone)
            else:
                self._set_supply_in_zone(subnet, None)
                self.zones[subnet.zone].discard_subnet(subnet_id)
                subnet.zone = zone
        subnet.cidr = cidr or subnet.cidr
        subnet.free_ips = max(0, free_ips)
        subnet.free_blocks = None if free_blocks is None else max(0, free_blocks)
        if tags is not None:
            subnet.tags = dict(tags)
        if launchable is not None:
            subnet.launchable = launchable
        subnet.held_only = held_only
        self._zone(zone).add_subnet(subnet_id, subnet.discoverable)
        for node in users:
            self._attach(node)
        subnet.demand_at_refresh = subnet.demand
        subnet.blocks_at_refresh = subnet.demand_blocks
        self._refresh_supply(subnet)
        self._changed()

    def remove_subnet(self, subnet_id: str) -> None:
        subnet = self.subnets.get(subnet_id)
        if subnet is None:
            return
        users = [n for n in self.nodes.values() if self._uses(n, subnet_id)]
        for node in users:
            self._detach(node)
        self._flush()
        self._set_supply_in_zone(subnet, None)
        del self.subnets[subnet_id]
        self.zones[subnet.zone].discard_subnet(subnet_id)
        for node in users:
            self._attach(node)  # their subnet is unknown again: not judged on it
        self._changed()

    def _supply(self, subnet: Subnet) -> tuple[int, int]:
        """Free addresses and whole free /28 blocks now: EC2's last figures less what the nodes drew since.
        Without a block count, assume no fragmentation."""
        grown_blocks = subnet.demand_blocks - subnet.blocks_at_refresh
        addresses = subnet.free_ips - (subnet.demand - subnet.demand_at_refresh) - PREFIX_SIZE * grown_blocks
        blocks = subnet.free_blocks if subnet.free_blocks is not None else subnet.free_ips // PREFIX_SIZE
        return addresses, min(blocks - grown_blocks, max(addresses, 0) // PREFIX_SIZE)

    def _new_node_figure(self, addresses: int, blocks: int) -> int:
        cost = self.new_node_cost()
        return new_node_ips(addresses, blocks, cost.addresses, cost.blocks)

    def new_node_cost(self) -> ipamd.GrowthCost:
        """What the cheapest node type in the cluster needs from a pod subnet before its first pod runs (the
        type a new node most likely has; with no node yet, its primary address and one IP)."""
        if self._new_node_cost is None:
            costs = [ipamd.new_node_cost(limits, self.cni) for limits in self._type_counts]
            default = ipamd.GrowthCost(1 if self.cni.custom_networking else 2, 0, 0)
            self._new_node_cost = min(costs, key=lambda c: c.whole, default=default)
        return self._new_node_cost

    def _count_type(self, node: Node, sign: int) -> None:
        if not node.known or node.limits is None:
            return
        count = self._type_counts.get(node.limits, 0) + sign
        if count:
            self._type_counts[node.limits] = count
        else:
            del self._type_counts[node.limits]

    def _types_changed(self) -> None:
        """The node types in the cluster changed: if the cheapest new node changed with them, every subnet's
        figure for new nodes moves (rare: a type's first node joined or its last one left)."""
        before = self._new_node_cost
        self._new_node_cost = None
        if before is not None and self.new_node_cost() != before:
            for subnet in self.subnets.values():
                self._refresh_supply(subnet)

    def _refresh_supply(self, subnet: Subnet) -> None:
        self._set_supply_in_zone(subnet, self._subnet_state(subnet))

    def _subnet_state(self, subnet: Subnet) -> tuple[int, int, Yield, int]:
        addresses, blocks = self._supply(subnet)
        served = subnet_yield(addresses, blocks, subnet.wants)
        if served.new_ips < -subnet.predicted_warm:
            # A shortfall takes back predicted warm IPs only: one beyond them is EC2's count of the subnet lagging
            # what its nodes drew (their warm IPs are in EC2's figures: certain), not IPs that are not there.
            served = replace(served, new_ips=-subnet.predicted_warm)
        # A subnet in the index by its discovery tag alone gives new nodes nothing when ipamd does not discover.
        discovery_only = subnet.discoverable and not subnet.nodes and not subnet.launchable
        # One that only holds ENIs attached before an ENIConfig change gives new nodes nothing either.
        held_only = subnet.held_only and not (subnet.nodes or subnet.launchable or subnet.discoverable)
        new_nodes = 0 if held_only or (discovery_only and not self.discovery_on()) else self._new_node_figure(
            served.addresses_left, served.blocks_left)
        return addresses, blocks, served, new_nodes

    def _set_supply_in_zone(self, subnet: Subnet, state: tuple[int, int, Yield, int] | None) -> None:
        """Replace the subnet's derived figures (None: zero them) and move its zone's sums by the change."""
        if state is None:
            supply, blocks, served, addresses = 0, 0, Yield(0, 0, 0, 0), 0
        else:
            supply, blocks, served, addresses = state
        zone = self._zone(subnet.zone)
        usable = self._usable_signed(subnet.nodes, supply, blocks, subnet.predicted_warm)
        zone.supply += usable - subnet.usable
        subnet.usable = usable
        loose = self._usable_signed(subnet.nodes, supply, None, subnet.predicted_warm)
        zone.loose_supply += loose - subnet.loose
        subnet.loose = loose
        zone.growth += served.new_ips - subnet.growth
        zone.waiting_served += served.waiting_served - subnet.waiting_served
        zone.addresses += addresses - subnet.addresses
        subnet.supply, subnet.supply_blocks = supply, blocks
        subnet.growth, subnet.waiting_served = served.new_ips, served.waiting_served
        subnet.left, subnet.left_blocks = served.addresses_left, served.blocks_left
        subnet.addresses = addresses
        subnet.unserved, subnet.spare = served.unserved, served.spare
        short = state is not None and subnet.topups > served.addresses_left
        zone.topups_short += short - subnet.topups_short
        subnet.topups_short = short
        if zone.discoverable or zone.discovery_growth or zone.discovery_waiting_served:
            self._discover(zone, self.subnets)

    def discovery_on(self) -> bool:
        """ipamd creates ENIs in discovery-tagged subnets of the node's zone: ENABLE_SUBNET_DISCOVERY (CNI 1.18+,
        default on), unless custom networking takes precedence (ENIConfig subnets only)."""
        return self.cni.subnet_discovery and not self.cni.custom_networking

    def _discover(self, zone: Zone, subnets: Mapping[str, Subnet]) -> None:
        """Fund from the zone's discovery-tagged subnets, most free first, the new ENIs its nodes' own subnets
        could not (O(subnets in the zone))."""
        served_waiting = served_new = 0
        if self.discovery_on() and zone.discoverable:
            members = [subnets[sid] for sid in zone.subnet_ids if sid in subnets]
            unserved = [entry for subnet in members for entry in subnet.unserved]
            # what each tagged subnet has once its own nodes' growth is funded
            pool = [(max(s.spare[0], 0), max(s.spare[1], 0)) for s in members if s.discoverable]
            if unserved and pool:
                served_waiting, served_new, _ = discovery_yield(unserved, pool)
        zone.waiting_served += served_waiting - zone.discovery_waiting_served
        zone.discovery_waiting_served = served_waiting
        zone.discovery_growth = served_new

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
        self._changed()

    def remove_pod(self, key: str) -> None:
        old = self.pods.pop(key, None)
        if old is not None:
            node_name, use, _ = old
            cooling = Cooling(node_name, use is PodUse.BRANCH) if node_name and use is not PodUse.NONE else None
            self._count(old, -1, cooling=(key, cooling) if cooling else None)
            self._changed()
        self.release(key)

    # ---- cooldown -------------------------------------------------------------------------------------

    def _start_cooling(self, key: str, cooling: Cooling) -> None:
        """A freed address stays taken through its cooldown: ipamd's IP_COOLDOWN_PERIOD (the datastore keeps the
        IP unassignable, while its pool counts it as available), the resource controller's for a branch ENI.
        Called between a detach and an attach of its node."""
        cache = self._branch_cooling if cooling.branch else self._cooling
        node = self.nodes[cooling.node]
        earlier = cache.pop(key, None)  # the same pod gone twice: pop does not go through the release hook
        if earlier is not None and earlier.node == cooling.node:
            node.cooling -= not earlier.branch
            node.branch_cooling -= earlier.branch
        elif earlier is not None:
            self._hold_cooling(earlier, -1)  # another node's record: its own detach and attach
        cache[key] = cooling
        node.branch_cooling += cooling.branch
        node.cooling += not cooling.branch

    def _cooled(self, cooling: Cooling) -> None:
        self._hold_cooling(cooling, -1)
        self._changed()

    def _hold_cooling(self, cooling: Cooling, sign: int) -> None:
        node = self.nodes.get(cooling.node)
        if node is None:
            node = self.nodes[cooling.node] = Node(cooling.node)
        self._detach(node)
        if cooling.branch:
            node.branch_cooling += sign
        else:
            node.cooling += sign
        self._attach(node)
        if node.idle:
            del self.nodes[node.name]

    def _expire_timers(self) -> None:
        self._reservations.expire()
        self._cooling.expire()
        self._branch_cooling.expire()

    def _apply(self, entry: PodEntry) -> None:
        self._count(entry, 1)

    def _unapply(self, entry: PodEntry) -> None:
        self._count(entry, -1)

    def _count(self, entry: PodEntry, sign: int, *, cooling: tuple[str, Cooling] | None = None) -> None:
        """Add or take out a pod's counts on its node (or its steered zone), with, for a pod going away, the
        cooldown its address starts, in the same change."""
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
        if cooling is not None:
            self._start_cooling(*cooling)
        self._attach(node)
        if node.idle:
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
        reservation = Reservation(key, zone, node if known and self.counted(known) else None)
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
        self.node_version += 1
        self._detach(node)
        node.reserved += sign
        self._attach(node)
        if node.idle:
            del self.nodes[node.name]

    def reservations(self) -> list[Reservation]:
        self._expire_timers()
        return list(self._reservations.values())

    def expire(self) -> None:
        """Drop reservations and cooldowns whose time has passed (also done by every query)."""
        self._expire_timers()

    # ---- queries --------------------------------------------------------------------------------------

    def zone_names(self) -> list[str]:
        """Zones with schedulable nodes."""
        return sorted(name for name, zone in self.zones.items() if zone.nodes > 0)

    def _changed(self) -> None:
        self.version += 1
        self.node_version += 1

    @property
    def memo(self) -> dict[Any, Any]:
        """Answers derived from the index as it is now, for callers to keep until it next changes (a burst of
        requests between two events then walks nodes once)."""
        if self._memo_version != self.version:
            self._memo.clear()
            self._memo_version = self.version
        return self._memo

    @property
    def node_memo(self) -> dict[Any, Any]:
        """Like `memo`, for answers that rest on node and subnet figures only: kept across reservations held
        against a zone (every admitted pod's), which move zone sums alone."""
        if self._node_memo_version != self.node_version:
            self._node_memo.clear()
            self._node_memo_version = self.node_version
        return self._node_memo

    def has_nodes(self) -> bool:
        return any(zone.nodes > 0 for zone in self.zones.values())

    def candidate_zones(self) -> list[str]:
        """Zones a pod could be placed in: with nodes, or with pod subnets new nodes could launch into
        (unordered: this runs per request)."""
        return [name for name, zone in self.zones.items() if zone.nodes > 0 or zone.subnet_ids]

    def zone_headroom(self, name: str) -> int:
        self._expire_timers()
        zone = self.zones.get(name)
        return zone.headroom if zone is not None else 0

    def node_room(self, name: str) -> int:
        self._expire_timers()
        node = self.nodes.get(name)
        return node.room if node is not None else 0

    def _ip_at_hand(self, node: Node) -> bool:
        """A warm IP on the node, or one ipamd would get it from its subnet: the node grows at all, and what the
        subnet has left once the pods already waiting are served funds the node's next step (one address on an
        attached ENI with a free slot, else a whole new ENI). With no subnet data we cannot tell the node is
        dry: do not call it exhausted."""
        if node.warm > 0:
            return True
        if node.no_eni_config and node.ec2_held is not None and node.limits is not None:
            # Free slots on ENIs attached before its ENIConfig went: ipamd fills them from those ENIs' subnets
            # (not modelled as growth), so never call such a node dry.
            return ipamd.free_attached_slots(node.held_addresses, node.limits, self.cni) > 0
        if not node.grows:
            return False
        subnet = self.subnets.get(node.pod_subnet) if node.pod_subnet else None
        if subnet is None:
            return True
        if any(part.free_slots for part in node.elsewhere):
            return self.placed_growth_funded(node)
        if node.limits is None:
            return subnet.left > 0
        return self.growth_funded(node, subnet) is True or self.discovery_funds(node)

    def placed_growth_funded(self, node: Node) -> bool:
        """`_ip_at_hand` for a node with free slots on ENIs in a subnet its new ENIs no longer come from. ipamd
        fills free slots on attached ENIs first, each from its own ENI's subnet, in no set order
        (`GetAllocatableENIs` walks a map): one free slot whose subnet has an address (a /28) left is enough.
        If every such subnet is out, `tryAssignIPs` / `tryAssignPrefixes` return the shortage error before any
        new ENI, unless subnet discovery lets them move on (`useSubnetDiscovery` and an insufficient-address
        error: `continue`); then `tryAllocateENI` creates one in the pod subnet (the ENIConfig's)."""
        limits = node.limits
        assert limits is not None
        blocks = 1 if ipamd.prefix_delegation_on(limits, self.cni) else 0
        slot = PREFIX_SIZE if blocks else 1
        own_free = ipamd.free_attached_slots(node.held_addresses, limits, self.cni) - sum(
            part.free_slots for part in node.elsewhere)
        with_free = [(node.pod_subnet, own_free)] + [(p.subnet_id, p.free_slots) for p in node.elsewhere]
        for subnet_id, free in with_free:
            subnet = self.subnets.get(subnet_id) if subnet_id else None
            if free <= 0:
                continue
            if subnet is None or (subnet.left >= slot and subnet.left_blocks >= blocks):
                return True  # no figures for it: not called dry
        if not self.cni.subnet_discovery:
            return False
        cost = node.eni_cost
        own = self.subnets.get(node.pod_subnet) if node.pod_subnet else None
        if cost is None:
            return False
        if own is None:
            return True
        return cost.fits(own.left, own.left_blocks) or self.discovery_funds(node)

    def discovery_funds(self, node: Node) -> bool:
        """A discovery-tagged subnet of the node's zone has what a new ENI on the node asks for (ipamd moves on
        to it when the node's own subnet cannot give even one IP)."""
        if not self.discovery_on() or node.limits is None or node.zone is None:
            return False
        zone = self.zones.get(node.zone)
        cost = node.eni_cost
        if zone is None or cost is None:
            return False
        return any(s.discoverable and cost.fits(s.left, s.left_blocks)
                   for s in (self.subnets[sid] for sid in zone.subnet_ids))

    def growth_funded(self, node: Node, subnet: Subnet) -> bool | None:
        """Whether the subnet funds one more IP on this node beyond the pods waiting there (None: no ENI slot
        could carry it)."""
        cost = node.next_cost
        if cost is None:
            return None
        addresses, blocks = subnet.left, subnet.left_blocks
        own = node.own_cost
        if own is not None and own.whole <= subnet.supply:
            # The node's own waiting pods were served from what is no longer left: that was its to spend.
            addresses += own.whole
            blocks += own.blocks
            cost = ipamd.GrowthCost(cost.addresses - own.addresses, cost.blocks - own.blocks, 0)
        return cost.fits(addresses, blocks)

    def node_has_address(self, node: Node) -> bool:
        """An IP slot free on the node (pods aside), and an IP at hand for it."""
        return node.capacity - node.assigned - node.reserved > self.node_reserve and self._ip_at_hand(node)

    def node_can_take(self, node: Node) -> bool:
        """Room for one more pod, and an IP at hand for it."""
        return node.room > self.node_reserve and self._ip_at_hand(node)

    def exhausted_nodes(self, zone_name: str) -> Iterator[str]:
        """Nodes in the zone that cannot give a pod an IP now but that the scheduler could still pick (a pod
        slot left): no IP room above the node reserve, or no warm IP and no way to get one. Walks only those
        with no warm IP."""
        zone = self.zones.get(zone_name)
        if zone is None:
            return
        yield from zone.full_nodes
        for _, node in self._dry_with_room(zone):
            if not self._ip_at_hand(node):
                yield node.name

    def _dry_with_room(self, zone: Zone) -> Iterator[tuple[str, Node]]:
        """The zone's nodes with no warm IP that have IP room above the node reserve and a pod slot (its full
        nodes aside), each with the subnet it depends on ("" for none known)."""
        for subnet_id, names in zone.dry_nodes.items():
            for name in names:
                node = self.nodes[name]
                if name not in zone.full_nodes and node.room > self.node_reserve:
                    yield subnet_id, node

    def uncertain_nodes(self, zone_name: str) -> Iterator[str]:
        """Nodes in the zone with no warm IP at the last count, a pod slot and no other way to an IP than their
        pod subnet, when that subnet cannot fund every node's top-up: ipamd on the other nodes may have taken its
        last addresses since (which nodes got them shows at the next EC2 refresh). Walks only such zones' dry
        nodes."""
        zone = self.zones.get(zone_name)
        if zone is None or not zone.topups_short:
            return
        for subnet_id, node in self._dry_with_room(zone):
            subnet = self.subnets.get(subnet_id)
            # (a node with no IP at hand is exhausted already)
            if (subnet is not None and subnet.topups_short and self._ip_at_hand(node)
                    and not self._funded_before_topups(node, subnet)):
                yield node.name

    def _funded_before_topups(self, node: Node, subnet: Subnet) -> bool:
        """The subnet funds the node's next IP even once every other node's top-up is paid."""
        cost = node.next_cost
        if cost is None or any(part.free_slots for part in node.elsewhere) or self.discovery_funds(node):
            return True
        return cost.fits(subnet.left - (subnet.topups - node.topup), subnet.left_blocks)

    def node_growth_hint(self, node: Node) -> str:
        """Why the node gets no IP from its subnet, in words (for a denial, not the request path's hot part)."""
        if node.no_eni_config:
            return "custom networking is on and no ENIConfig applies to the node"
        if node.cordoned and not self.cni.manage_enis_non_schedulable:
            return "the node is cordoned: ipamd adds no IP to it (AWS_MANAGE_ENIS_NON_SCHEDULABLE is off)"
        if node.limits is None:
            return ""
        if not node.grows:
            if self.cni.uses_ip_targets and not self.cni.warm_ip_target:
                return f"MINIMUM_IP_TARGET without WARM_IP_TARGET: ipamd holds {node.held} IPs and adds none"
            if node.allocatable_pods is not None and node.held >= node.allocatable_pods:
                return f"ipamd adds no IP once a node holds max-pods ({node.allocatable_pods}) IPs"
            lost = f" ({node.lost_enis} by ENIs that carry no pod IPs)" if node.lost_enis else ""
            return f"every ENI slot of {node.instance_type} is in use{lost}"
        subnet = self.subnets.get(node.pod_subnet) if node.pod_subnet else None
        placed = ", ".join(p.subnet_id for p in node.elsewhere if p.free_slots)
        if placed:
            stuck = (f"its free ENI slots are on ENIs in {placed} (attached before its ENIConfig changed), out of "
                     "addresses")
            if not self.cni.subnet_discovery:
                return f"{stuck}; without ENABLE_SUBNET_DISCOVERY ipamd then creates no new ENI"
            if subnet is not None and node.eni_cost is not None:
                return f"{stuck}; {_cost_phrase(node.instance_type or 'the node', node.eni_cost, subnet)}"
            return stuck
        limits = self._slot_limits(node)
        assert limits is not None
        cost = ipamd.growth_cost(node.waiting + 1, node.held_addresses, limits, self.cni)
        if subnet is None or cost is None:
            return ""
        return _cost_phrase(node.instance_type or "the node", cost, subnet)

    def launch_subnets(self, zone_name: str) -> tuple[tuple[str, int], ...]:
        """The zone's subnets an autoscaler launches new nodes into (Karpenter's EC2NodeClass status subnets),
        with the pod IPs new nodes could still get from each (for a denial: walks the zone's subnets)."""
        zone = self.zones.get(zone_name)
        if zone is None:
            return ()
        return tuple((sid, self.subnets[sid].addresses) for sid in zone.subnet_tuple if self.subnets[sid].launchable)

    def autoscaler_known(self) -> bool:
        """Some subnet is known as an autoscaler's launch target (for a denial: walks the subnets)."""
        return any(subnet.launchable for subnet in self.subnets.values())

    def growth_hint(self, zone_name: str) -> str:
        """Why a zone's free addresses are not pod IPs, in words: the cheapest step its nodes need next, and
        what a new node needs, against what is left (for a denial only: walks the zone's dry nodes)."""
        zone = self.zones.get(zone_name)
        if zone is None:
            return ""
        hints: list[str] = []
        for subnet_id in zone.subnet_tuple:
            subnet = self.subnets[subnet_id]
            if subnet.left <= 0:
                continue
            cheapest: tuple[int, str, ipamd.GrowthCost] | None = None
            for name in zone.dry_nodes.get(subnet_id, ()):
                node = self.nodes[name]
                limits = self._slot_limits(node)
                if limits is None or not node.grows or node.room <= 0:
                    continue
                cost = ipamd.growth_cost(node.waiting + 1, node.held_addresses, limits, self.cni)
                if cost is not None and (cheapest is None or cost.whole < cheapest[0]):
                    cheapest = (cost.whole, node.instance_type or name, cost)
            if cheapest is not None:
                hints.append(_cost_phrase(cheapest[1], cheapest[2], subnet))
            new = self.new_node_cost()
            hints.append(f"a new node needs {new.addresses} address(es)"
                         + (f" and {new.blocks} free /28 block(s)" if new.blocks else ""))
        return "; ".join(dict.fromkeys(hints))

    @staticmethod
    def pod_slot(node: Node) -> bool:
        """The scheduler could still bind a pod to the node: a pod slot left (allocatable pods)."""
        return node.allocatable_pods is None or node.allocatable_pods - node.pods - node.reserved > 0

    def nodes_that_can_take(self, zones: list[str], most: int) -> list[str]:
        """Up to `most` counted nodes in these zones that can take a pod now. Walks the nodes: only for the
        rare case where the nodes that cannot are too many to list."""
        wanted = set(zones)
        found: list[str] = []
        for node in self.nodes.values():
            if node.zone in wanted and self.counted(node) and self.node_can_take(node):
                found.append(node.name)
                if len(found) >= most:
                    break
        return found

    def zone_figures(self, name: str, *, expire: bool = True) -> ZoneFigures:
        """One zone's figures (`expire=False` when the caller has just expired reservations itself)."""
        if expire:
            self._expire_timers()
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
            waiting=zone.waiting,
            waiting_served=zone.waiting_served,
            new_node_ips=zone.addresses,
        )

    def node_figures(self, name: str) -> NodeFigures | None:
        self._expire_timers()
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
            held=node.held,
            enis=node.held_enis,
            waiting=node.waiting,
            grows=node.grows,
            cordoned=node.cordoned,
            no_eni_config=node.no_eni_config,
        )

    def subnet_figures(self) -> list[SubnetFigures]:
        self._expire_timers()
        return [
            SubnetFigures(s.subnet_id, s.zone, s.cidr, s.free_ips, s.free_blocks, self._usable(s), s.nodes,
                          s.waiting_served, max(0, s.left), s.addresses, s.topups, s.topups_short)
            for s in sorted(self.subnets.values(), key=lambda s: (s.zone, s.subnet_id))
        ]

    def _usable_signed(self, nodes: int, supply: int, blocks: int | None, predicted_warm: int) -> int:
        """What a subnet's schedulable nodes can still draw on: free addresses, in whole /28 blocks under
        prefix delegation (`blocks` None: single addresses all the same), none when no node draws on it; below
        zero when predicted warm IPs outran it (by no more than those: see `Subnet.predicted_warm`)."""
        if not nodes:
            return 0
        if self.cni.prefix_delegation and supply >= 0 and blocks is not None:
            return blocks * PREFIX_SIZE
        return max(supply, -predicted_warm)

    def _usable(self, subnet: Subnet) -> int:
        return max(0, subnet.usable)

    def snapshot(self) -> IndexSnapshot:
        """Every zone's and subnet's figures at one moment (one version of the index)."""
        self._expire_timers()
        return IndexSnapshot(
            version=self.version,
            zones=tuple(self.zone_figures(z) for z in sorted(self.zones) if self.zones[z].nodes > 0),
            subnets=tuple(self.subnet_figures()),
            pods=len(self.pods),
            nodes=sum(1 for n in self.nodes.values() if n.known),
            reservations=len(self._reservations),
            unknown_types=tuple(sorted(self.unknown_types)),
            waiting_nodes=tuple(sorted(
                (n.name, n.zone or "", n.waiting) for n in self.nodes.values() if n.known and n.waiting > 0
            )),
            ipv6=self.cni.ipv6,
        )

    # ---- checking -------------------------------------------------------------------------------------

    def recount(self) -> dict[str, Any]:
        """Aggregates recomputed from scratch, without the incremental path, to check it."""
        self._expire_timers()
        nodes = {
            name: Node(n.name, n.zone, n.instance_type, n.pod_subnet, n.allocatable_pods, n.schedulable,
                       n.limits, n.ec2_held, cordoned=n.cordoned, no_eni_config=n.no_eni_config,
                       ec2_enis=n.ec2_enis, ec2_subnets=n.ec2_subnets, lost_enis=n.lost_enis, known=n.known)
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
        for cache in (self._cooling, self._branch_cooling):
            for cooling in cache.values():
                node = nodes.setdefault(cooling.node, Node(cooling.node))
                node.branch_cooling += cooling.branch
                node.cooling += not cooling.branch
        for reservation in self._reservations.values():
            zone = zones.setdefault(reservation.zone, Zone(reservation.zone))
            zone.reservations += 1
            if reservation.node is None:
                zone.unbound_reservations += 1
            else:
                nodes.setdefault(reservation.node, Node(reservation.node)).reserved += 1
        subnets = {
            sid: Subnet(sid, s.zone, s.cidr, s.free_ips, s.free_blocks, s.demand_at_refresh, s.blocks_at_refresh,
                        tags=s.tags, launchable=s.launchable, held_only=s.held_only)
            for sid, s in self.subnets.items()
        }
        for node in nodes.values():
            self._derive(node)
            self._contribute(node, 1, zones, subnets)
        for subnet in subnets.values():
            supply, blocks, served, addresses = self._subnet_state(subnet)
            subnet.supply, subnet.growth, subnet.addresses = supply, served.new_ips, addresses
            subnet.waiting_served = served.waiting_served
            subnet.usable = self._usable_signed(subnet.nodes, supply, blocks, subnet.predicted_warm)
            subnet.loose = self._usable_signed(subnet.nodes, supply, None, subnet.predicted_warm)
            zone = zones.setdefault(subnet.zone, Zone(subnet.zone))
            zone.add_subnet(subnet.subnet_id, subnet.discoverable)
            zone.supply += subnet.usable
            zone.loose_supply += subnet.loose
            zone.growth += served.new_ips
            zone.waiting_served += served.waiting_served
            zone.addresses += addresses
            subnet.unserved, subnet.spare = served.unserved, served.spare
            subnet.left, subnet.left_blocks = served.addresses_left, served.blocks_left
            subnet.topups_short = subnet.topups > served.addresses_left
            zone.topups_short += subnet.topups_short
        for zone in zones.values():
            self._discover(zone, subnets)
        return _aggregates(zones, subnets, nodes)

    def aggregates(self) -> dict[str, Any]:
        """The incrementally kept aggregates, in the form `recount` gives."""
        self._expire_timers()
        return _aggregates(self.zones, self.subnets, self.nodes)


def _aggregates(zones: dict[str, Zone], subnets: dict[str, Subnet], nodes: dict[str, Node]) -> dict[str, Any]:
    return {
        "zones": {
            z.name: (
                z.nodes, z.room, z.branch_room, z.warm, z.warm_usable, z.growth, z.supply, z.loose_supply,
                z.reservations,
                z.unbound_reservations, z.pending, z.beyond_warm_unknown, z.unknown_subnet_nodes, z.addresses,
                z.waiting, z.waiting_served, z.no_config_nodes, z.discovery_growth, z.cooling, z.topups_short,
                sorted(z.full_nodes),
                sorted((sid, sorted(names)) for sid, names in z.dry_nodes.items() if names),
            )
            for z in zones.values()
            if z.nodes or z.supply or z.addresses or z.reservations or z.pending or z.growth
        },
        "subnets": {
            s.subnet_id: (s.nodes, s.demand, s.demand_blocks, s.supply, s.growth, s.waiting_served, s.addresses,
                          s.topups, s.topups_short,
                          {k: (d.wait_units, d.wait_ips, d.all_units, d.new_ips) for k, d in s.wants.items()})
            for s in subnets.values()
        },
        "nodes": {
            n.name: (n.known, n.pods, n.assigned, n.branch, n.reserved, n.room, n.branch_room, n.warm, n.demand,
                     n.waiting, n.grows, n.held, n.held_enis, n.cooling, n.branch_cooling, n.topup)
            for n in nodes.values()
            if not n.idle
        },
    }

def _attached_demand(gain: int, waiting: int, new: int) -> Demand:
    """Free attached slots of `gain` IPs each serving `waiting` pods with no IP and `new` pods."""
    return Demand(-(-waiting // gain), waiting, -(-(waiting + new) // gain), new)


def _cost_phrase(instance_type: str, cost: ipamd.GrowthCost, subnet: Subnet) -> str:
    left = max(subnet.left, 0)
    if cost.blocks:
        have = f"{subnet.subnet_id} has {max(subnet.left_blocks, 0)} free /28 block(s)"
        need = f"{cost.blocks} /28 block(s)" + (f" and {cost.addresses} address(es)" if cost.addresses else "")
    else:
        have = f"{subnet.subnet_id} has {left} free address(es)"
        need = f"{cost.addresses} address(es)"
    what = f"a new ENI on {instance_type}" if cost.new_enis else f"{instance_type}"
    return f"{have}; {what} needs {need} at once"


@dataclass(frozen=True, slots=True)
class IndexSnapshot:
    version: int
    zones: tuple[ZoneFigures, ...]
    subnets: tuple[SubnetFigures, ...]
    pods: int
    nodes: int
    reservations: int
    unknown_types: tuple[str, ...]
    waiting_nodes: tuple[tuple[str, str, int], ...] = ()  # (node, zone, pods on it waiting for an IP)
    ipv6: bool = False  # an IPv6 cluster: ipguard stands aside


def pod_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"

