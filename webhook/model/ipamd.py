"""ipamd's rules, one function each: what a node holds, whether it grows, and what growing asks of its subnet.

Each function is named after what it decides and cites the ipamd function (aws/amazon-vpc-cni-k8s,
`pkg/ipamd/ipamd.go` unless said otherwise) it follows, so the two can be read side by side. The index keeps
the bookkeeping; this module only answers questions about one node at a time.

Units: in secondary-IP mode a "slot" is one secondary IP; under prefix delegation it is one /28 prefix (16 IPs).
A new ENI also takes one address of its own (its primary IP) from the subnet, in every mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from webhook.model.cni import CniSettings
from webhook.model.limits import PREFIX_SIZE, InstanceLimits, usable_enis, uses_prefixes
from webhook.model.supply import Demand, UnitKind

K = TypeVar("K", bound=tuple[Any, ...])  # the arguments, as a tuple
V = TypeVar("V")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def prefix_delegation_on(limits: InstanceLimits, settings: CniSettings) -> bool:
    """Prefix delegation on this node: ipamd turns it off on types that cannot take prefixes (non-Nitro, not
    bare metal) and runs them on secondary IPs (`isConfigValid`)."""
    return uses_prefixes(limits, settings.mode)


def slots_per_eni(limits: InstanceLimits) -> int:
    """Secondary IPs, or prefixes, one ENI holds (`maxIPsPerENI` / `maxPrefixesPerENI`: IPv4 per ENI less the
    ENI's own primary address)."""
    return max(limits.ipv4_per_eni - 1, 0)


def max_pod_enis(limits: InstanceLimits, settings: CniSettings) -> int:
    """ENIs that may carry pod IPs (`hasRoomForEni`): MAX_ENI caps the type's limit, the trunk ENI takes a slot
    with ENABLE_POD_ENI on trunk-capable types, and under custom networking the primary ENI carries none."""
    return usable_enis(limits, settings.mode)


def slot_size(limits: InstanceLimits, settings: CniSettings) -> int:
    return PREFIX_SIZE if prefix_delegation_on(limits, settings) else 1


def ip_targets_defined(settings: CniSettings) -> bool:
    """`warmIPTargetsDefined`: WARM_IP_TARGET or MINIMUM_IP_TARGET above 0 (0 is the same as unset)."""
    return settings.uses_ip_targets


def ip_shortfall(total: int, assigned: int, settings: CniSettings) -> int:
    """`datastoreTargetState`'s short, in IPs: max(WARM_IP_TARGET - available, MINIMUM_IP_TARGET - total, 0)."""
    warm = settings.warm_ip_target or 0
    minimum = settings.minimum_ip_target or 0
    return max(warm - (total - assigned), minimum - total, 0)


def pool_too_low(total: int, assigned: int, limits: InstanceLimits, settings: CniSettings,
                 max_pods: int | None) -> bool:
    """Whether ipamd asks for more IPs (`isDatastorePoolTooLow`): never once the node holds max-pods IPs; with
    IP targets only while short of them (MINIMUM_IP_TARGET alone never grows a node past the minimum); else
    while fewer than WARM_ENI_TARGET ENIs' worth (WARM_PREFIX_TARGET prefixes' worth) of IPs are free, or none
    at all when that target is 0. `total` counts held IPs (16 per prefix), `assigned` those pods use."""
    if max_pods is not None and total >= max_pods:
        return False
    if ip_targets_defined(settings):
        return ip_shortfall(total, assigned, settings) > 0
    available = total - assigned
    if prefix_delegation_on(limits, settings):
        warm, unit = settings.warm_prefix_target, PREFIX_SIZE
    else:
        warm, unit = settings.warm_eni_target, slots_per_eni(limits)
    return available < unit * warm or (warm == 0 and available <= 0)


def attachment_allowed(cordoned: bool, settings: CniSettings) -> bool:
    """`isENIAttachmentAllowed`: no new IP or ENI on a node tainted `node.kubernetes.io/unschedulable` (a
    cordoned node) unless AWS_MANAGE_ENIS_NON_SCHEDULABLE is true."""
    return not cordoned or settings.manage_enis_non_schedulable


def new_eni_request(total: int, assigned: int, limits: InstanceLimits, settings: CniSettings) -> int:
    """Slots a new ENI asks for, all at once and with no fallback to fewer (`GetENIResourcesToAllocate`):
    a whole ENI's worth under WARM_ENI_TARGET, min(short, per ENI) under IP targets; under prefix delegation
    the prefixes needed (at least one)."""
    per_eni = slots_per_eni(limits)
    if prefix_delegation_on(limits, settings):
        return min(_prefixes_needed(total, assigned, settings), per_eni)
    if ip_targets_defined(settings):
        return min(ip_shortfall(total, assigned, settings), per_eni)
    return per_eni


def _prefixes_needed(total: int, assigned: int, settings: CniSettings) -> int:
    """`getPrefixesNeeded`: at least one; the IP targets' shortfall in prefixes, else WARM_PREFIX_TARGET less the
    prefixes with no IP in use."""
    if ip_targets_defined(settings):
        return max(1, _ceil_div(ip_shortfall(total, assigned, settings), PREFIX_SIZE))
    free_prefixes = max(total - assigned, 0) // PREFIX_SIZE
    return max(1, settings.warm_prefix_target - free_prefixes)


@dataclass(frozen=True, slots=True)
class HeldAddresses:
    """What a node holds from its subnet: IPs (16 per prefix), the /28 prefixes among them, and the ENIs that
    carry them (each of which took one more address, its primary)."""

    ips: int
    prefixes: int = 0
    enis: int = 0


def predict_held(assigned: int, limits: InstanceLimits, settings: CniSettings,
                 max_pods: int | None = None) -> HeldAddresses:
    """What ipamd holds on a node with `assigned` pod IPs in use once its pool manager has settled: it grows
    (`increaseDatastorePool`) while `pool_too_low`, filling attached ENIs before attaching new ones, and stops
    at max-pods IPs or when every ENI slot is full. Pods beyond what it holds wait for an IP."""
    per_eni = slots_per_eni(limits)
    enis_max = max_pod_enis(limits, settings)
    if per_eni == 0 or enis_max == 0:
        return HeldAddresses(0)
    size = slot_size(limits, settings)
    assigned = max(assigned, 0)
    if ip_targets_defined(settings):
        minimum = settings.minimum_ip_target or 0
        # With no WARM_IP_TARGET the pool only ever reaches the minimum: pods past it get no IP.
        target = max(assigned + settings.warm_ip_target, minimum) if settings.warm_ip_target else minimum
        slots = _ceil_div(target, size)
    elif size == PREFIX_SIZE:
        warm = settings.warm_prefix_target
        slots = _ceil_div(assigned, size) + warm if warm else assigned // size + 1
    else:
        # Attached ENIs are filled whole, so the pool grows an ENI at a time.
        warm = settings.warm_eni_target
        enis = _ceil_div(assigned, per_eni) + warm if warm else assigned // per_eni + 1
        slots = enis * per_eni
    if max_pods is not None:
        # Growth stops once the node holds max-pods IPs; the step that crossed it is kept whole (an ENI's worth
        # under WARM_ENI_TARGET, else one slot).
        step = per_eni if size == 1 and not ip_targets_defined(settings) else 1
        slots = min(slots, _ceil_div(_ceil_div(max_pods, size), step) * step)
    slots = min(slots, enis_max * per_eni)
    return HeldAddresses(slots * size, slots if size == PREFIX_SIZE else 0, _ceil_div(slots, per_eni))


def free_attached_slots(held: HeldAddresses, limits: InstanceLimits, settings: CniSettings) -> int:
    """Slots (IPs, or prefixes) still free on the ENIs the node has attached (`GetAllocatableENIs`)."""
    held_slots = held.prefixes if prefix_delegation_on(limits, settings) else held.ips
    return max(held.enis * slots_per_eni(limits) - held_slots, 0)


@dataclass(frozen=True, slots=True)
class GrowthCost:
    """What a node needs from its subnet to serve some more pod IPs beyond what it holds."""

    addresses: int  # loose addresses: secondary IPs and every new ENI's primary
    blocks: int  # aligned free /28 blocks (prefix delegation)
    new_enis: int

    @property
    def whole(self) -> int:
        """Every address it takes, its /28 blocks' included."""
        return self.addresses + PREFIX_SIZE * self.blocks

    def fits(self, addresses: int, blocks: int) -> bool:
        """A subnet with these free addresses and whole free /28 blocks can pay it."""
        return self.whole <= addresses and self.blocks <= blocks


def growth_cost(ips: int, held: HeldAddresses, limits: InstanceLimits, settings: CniSettings) -> GrowthCost | None:
    """What it takes from the subnet for ipamd to give this node `ips` more pod IPs, or None when it cannot
    (ENI slots full). Free slots on attached ENIs come first, one IP (one prefix) at a time if need be
    (`tryAssignIPs` / `tryAssignPrefixes` fall back to one); only then new ENIs, each asking for its primary
    address plus its whole request at once (`tryAllocateENI` -> `createENI`: no fallback to fewer)."""
    if ips <= 0:
        return GrowthCost(0, 0, 0)
    per_eni = slots_per_eni(limits)
    size = slot_size(limits, settings)
    slots_wanted = _ceil_div(ips, size)
    from_attached = min(free_attached_slots(held, limits, settings), slots_wanted)
    left = slots_wanted - from_attached
    new_enis = 0
    addresses = from_attached if size == 1 else 0
    blocks = from_attached if size == PREFIX_SIZE else 0
    enis, total = held.enis, held.ips + from_attached * size
    while left > 0:
        if enis >= max_pod_enis(limits, settings):
            return None
        request = new_eni_request(total, total, limits, settings)  # every held IP in use when it asks
        if request <= 0:
            return None
        new_enis += 1
        enis += 1
        if size == 1:
            # Created with its request at once, then filled one IP at a time as pods need (tryAssignIPs).
            take = max(request, min(left, per_eni))
            addresses += 1 + take
        else:
            take = request
            addresses += 1
            blocks += request
        total += take * size
        left -= take
    return GrowthCost(addresses, blocks, new_enis)


def new_eni_cost(held: HeldAddresses, limits: InstanceLimits, settings: CniSettings) -> GrowthCost | None:
    """What one more ENI takes from a subnet when every held IP is in use (`tryAllocateENI`), or None when no
    ENI slot is left. With subnet discovery this is what another subnet must have for the node to grow."""
    if held.enis >= max_pod_enis(limits, settings):
        return None
    request = new_eni_request(held.ips, held.ips, limits, settings)
    if request <= 0:
        return None
    if prefix_delegation_on(limits, settings):
        return GrowthCost(1, request, 1)
    return GrowthCost(1 + request, 0, 1)


def node_grows(held: HeldAddresses, assigned: int, limits: InstanceLimits, settings: CniSettings, *,
               max_pods: int | None, cordoned: bool, cooling: int = 0) -> bool:
    """Whether ipamd would try to give this node another IP when a pod on it has none: attachment allowed, the
    pool counts as too low with every held IP in use but those in cooldown (which its datastore counts as
    available: `AvailableAddresses` is total less assigned), and a slot or an ENI slot left."""
    if not attachment_allowed(cordoned, settings):
        return False
    in_use = max(assigned, held.ips - cooling)
    if not pool_too_low(held.ips, in_use, limits, settings, max_pods):
        return False
    return free_attached_slots(held, limits, settings) > 0 or held.enis < max_pod_enis(limits, settings)


def new_node_cost(limits: InstanceLimits, settings: CniSettings) -> GrowthCost:
    """What a new node of this type needs from the pod subnet before its first pod has an IP: its own primary
    address (it launches into that subnet unless custom networking puts pods elsewhere), then its first pod IP:
    on its primary ENI one IP (one prefix) is enough; under custom networking a whole new ENI's request."""
    empty = HeldAddresses(0, 0, 0 if settings.custom_networking else 1)
    cost = growth_cost(1, empty, limits, settings)
    if cost is None:
        return GrowthCost(1 << 30, 0, 0)  # no ENI can carry pods on this type: a new node gives none
    primary = 0 if settings.custom_networking else 1
    return GrowthCost(cost.addresses + primary, cost.blocks, cost.new_enis)


def growth_units(waiting: int, new: int, held: HeldAddresses, limits: InstanceLimits,
                 settings: CniSettings) -> tuple[tuple[UnitKind, Demand], ...]:
    """A node's growth as units a subnet must fund, for `waiting` pods already on it with no IP and `new` pods
    it has room for: free slots on its attached ENIs first (one address, or one /28, per slot), then whole new
    ENIs (`growth_cost`'s order). What no ENI slot can carry is left out."""
    if waiting + new <= 0:
        return ()
    per_eni = slots_per_eni(limits)
    size = slot_size(limits, settings)
    free_slots = free_attached_slots(held, limits, settings)
    parts: list[tuple[UnitKind, Demand]] = []
    wanted = waiting + new
    on_attached = min(wanted, free_slots * size)
    if on_attached:
        kind: UnitKind = (1, 0, 1, 1) if size == 1 else (0, 1, PREFIX_SIZE, PREFIX_SIZE)
        parts.append((kind, _demand(kind, min(waiting, on_attached), on_attached)))
    rest = wanted - on_attached
    eni_room = max_pod_enis(limits, settings) - held.enis
    if rest > 0 and eni_room > 0:
        total = held.ips + free_slots * size  # every held slot in use when the node asks for an ENI
        request = new_eni_request(total, total, limits, settings)
        if request > 0:
            # With secondary IPs the ENI is created with its request and filled one IP at a time after
            # (tryAssignIPs); with prefixes it holds what it was created with until the next step.
            gain = request * PREFIX_SIZE
            kind = (1 + per_eni, 0, per_eni, request) if size == 1 else (1, request, gain, gain)
            served = min(rest, eni_room * kind[2])
            parts.append((kind, _demand(kind, min(max(waiting - on_attached, 0), served), served)))
    return tuple(parts)


def _demand(kind: UnitKind, waiting: int, ips: int) -> Demand:
    gain = kind[2]
    return Demand(_ceil_div(waiting, gain), waiting, _ceil_div(ips, gain), ips - waiting)


class _Remembered(dict[K, V]):
    """Answers of `compute(*key)` by key, worked out on a miss only (`__missing__`: a hit is a plain dict lookup);
    past `limit` entries it starts afresh (a bound, never reached by real clusters)."""

    def __init__(self, compute: Callable[..., V], limit: int) -> None:
        super().__init__()
        self._compute = compute
        self._limit = limit

    def __missing__(self, key: K) -> V:
        if len(self) >= self._limit:
            self.clear()
        value = self[key] = self._compute(*key)
        return value


class Rules:
    """`predict_held`, `node_grows` and `growth_units` under one set of CNI settings, remembered by their
    arguments: a node's figures are recomputed at every pod event, and across a cluster they take few distinct
    values (one per instance type and pod count). Make a new one when the settings change."""

    LIMIT = 1 << 16  # entries per rule before it starts afresh

    def __init__(self, settings: CniSettings, limit: int = LIMIT) -> None:
        self.settings = settings
        self._held: _Remembered[tuple[int, InstanceLimits, int | None], HeldAddresses] = _Remembered(
            lambda assigned, limits, max_pods: predict_held(assigned, limits, settings, max_pods), limit)
        self._grows: _Remembered[tuple[HeldAddresses, int, InstanceLimits, int | None, bool, int], bool] = (
            _Remembered(lambda held, assigned, limits, max_pods, cordoned, cooling: node_grows(
                held, assigned, limits, settings, max_pods=max_pods, cordoned=cordoned, cooling=cooling), limit))
        self._units: _Remembered[tuple[int, int, HeldAddresses, InstanceLimits],
                                 tuple[tuple[UnitKind, Demand], ...]] = _Remembered(
            lambda waiting, new, held, limits: growth_units(waiting, new, held, limits, settings), limit)

    def predict_held(self, assigned: int, limits: InstanceLimits, max_pods: int | None) -> HeldAddresses:
        return self._held[assigned, limits, max_pods]

    def node_grows(self, held: HeldAddresses, assigned: int, limits: InstanceLimits, max_pods: int | None,
                   cordoned: bool, cooling: int) -> bool:
        return self._grows[held, assigned, limits, max_pods, cordoned, cooling]

    def growth_units(self, waiting: int, new: int, held: HeldAddresses,
                     limits: InstanceLimits) -> tuple[tuple[UnitKind, Demand], ...]:
        """The same units (shared, never changed in place: `add_demand` copies what it adds)."""
        return self._units[waiting, new, held, limits]
