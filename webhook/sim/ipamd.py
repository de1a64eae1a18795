"""ipamd, the VPC CNI's IP address manager, one per node: its datastore and its rules.

Each rule ipamd applies is one function here, named after what it decides, with the ipamd function it follows
(aws/amazon-vpc-cni-k8s, pkg/ipamd/ipamd.go and pkg/ipamd/datastore/data_store.go) in its docstring. This is
an independent model of that code: it does not use ipguard's capacity arithmetic.

Quantities are those of ipamd's datastore (`GetIPStats`): total = addresses held in the current mode (1 per
secondary IP, 16 per /28 prefix), assigned = addresses given to pods, available = total - assigned. Freed
addresses stay in the datastore for IP_COOLDOWN_PERIOD (30 s): they count as available in the pool math, yet
cannot be given to a pod until the cooldown ends.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from webhook.model.cni import CniSettings
from webhook.model.limits import InstanceLimits
from webhook.sim.addresses import BLOCK, INSUFFICIENT_ADDRESSES, INSUFFICIENT_BLOCKS, Ec2Error, Prefix
from webhook.sim.ec2 import CNI_ENI_PREFIX, CNI_TAG, IP_LIMIT, Ec2, SimSubnet

POOL_INTERVAL = 5.0  # ipPoolMonitorInterval: one updateIPPoolIfRequired per 5 s
DECREASE_INTERVAL = 30.0  # decreaseIPPoolInterval
INSUFFICIENT_CIDR_COOLDOWN = 120.0  # insufficientCidrErrorCooldown
MIN_ENI_LIFETIME = 60.0  # minENILifeTime
DEFAULT_COOLDOWN = 30.0  # IP_COOLDOWN_PERIOD
DEFAULT_MAX_PODS = 110  # when neither the node nor eni-max-pods.txt says


@dataclass(frozen=True, slots=True)
class IpamdSettings:
    """The aws-node env as ipamd reads it: ipguard's parser (CniSettings, with ipamd's defaults), plus the
    IP cooldown, which only the simulation needs."""

    cni: CniSettings
    cooldown: float = DEFAULT_COOLDOWN  # IP_COOLDOWN_PERIOD (getCooldownPeriod: 30 s, and on a parse error)

    @property
    def warm_prefix_target(self) -> int:
        return self.cni.warm_prefix_target  # getWarmPrefixTarget: unset -> 0

    @property
    def subnet_discovery(self) -> bool:
        return self.cni.subnet_discovery  # UseSubnetDiscovery: default true

    @property
    def manage_non_schedulable(self) -> bool:
        return self.cni.manage_enis_non_schedulable  # ManageENIsOnNonSchedulableNode: default false

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> IpamdSettings:
        try:
            cooldown = float(int((env.get("IP_COOLDOWN_PERIOD") or "").strip()))
        except ValueError:
            cooldown = DEFAULT_COOLDOWN
        return cls(CniSettings.from_env(env), cooldown)


@dataclass(slots=True)
class Cidr:
    """One datastore CIDR: a secondary IP (size 1) or a /28 prefix (size 16)."""

    base: int  # offset of its first address in the subnet
    size: int
    prefix: Prefix | None = None
    assigned: dict[int, str] = field(default_factory=dict)  # address offset -> pod
    freed: dict[int, float] = field(default_factory=dict)  # address offset -> when its pod let it go


@dataclass(slots=True)
class DsEni:
    eni_id: str
    subnet_id: str
    primary: bool
    created: float
    trunk: bool = False
    cidrs: list[Cidr] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """GetIPStats: addresses held, given to pods, cooling down; prefixes held and those with no pod at all."""

    total: int
    assigned: int
    cooldown: int
    prefixes: int
    free_prefixes: int

    @property
    def available(self) -> int:
        """AvailableAddresses: total - assigned (cooling addresses count as available)."""
        return self.total - self.assigned


@dataclass(slots=True)
class Ipamd:
    """One node's ipamd: its settings, limits and datastore."""

    node: str
    instance_id: str
    limits: InstanceLimits
    settings: IpamdSettings
    ec2: Ec2
    max_pods: int  # the kubelet's max-pods, read once at start (c.maxPods)
    primary_subnet: str
    eni_config_subnet: str | None = None  # custom networking: the node's ENIConfig subnet (None: no ENIConfig)
    rng: random.Random = field(default_factory=random.Random)
    enis: dict[str, DsEni] = field(default_factory=dict)
    schedulable: bool = True  # no node.kubernetes.io/unschedulable:NoSchedule taint
    last_insufficient: float = float("-inf")
    last_decrease: float = float("-inf")
    pods: dict[str, tuple[str, Cidr, int]] = field(default_factory=dict)  # pod -> (ENI, CIDR, offset)

    @property
    def prefix_mode(self) -> bool:
        """isConfigValid: prefix delegation falls back to secondary IPs on types that cannot take prefixes."""
        return self.settings.cni.prefix_delegation and self.limits.prefix_delegation

    @property
    def slots_per_eni(self) -> int:
        """GetENIIPv4Limit: the type's IPv4 addresses per ENI less the primary (maxIPsPerENI, maxPrefixesPerENI)."""
        return self.limits.ipv4_per_eni - 1

    @property
    def addresses_per_eni(self) -> int:
        """GetIPv4Limit's maxIPsPerENI: slots, times 16 under prefix delegation."""
        return self.slots_per_eni * (BLOCK if self.prefix_mode else 1)

    @property
    def has_trunk(self) -> bool:
        return any(e.trunk for e in self.enis.values())


def start_ipamd(ec2: Ec2, node: str, instance_type: str, limits: InstanceLimits, subnet_id: str,
                settings: IpamdSettings, *, max_pods: int, eni_config_subnet: str | None = None,
                rng: random.Random | None = None, now: float = 0.0) -> Ipamd:
    """RunInstances, then nodeInit: the instance's primary ENI (its address from the node's subnet) joins the
    datastore; the pool manager grows it from there."""
    instance = ec2.run_instance(instance_type, limits, subnet_id)
    ipamd = Ipamd(node, instance.instance_id, limits, settings, ec2, max_pods, subnet_id, eni_config_subnet,
                  rng or random.Random(0))
    primary = ec2.enis[instance.enis[0]]
    ipamd.enis[primary.eni_id] = DsEni(primary.eni_id, subnet_id, primary=True, created=now)
    return ipamd


# ---- the datastore's figures ----------------------------------------------------------------------------


def pool_stats(node: Ipamd, now: float) -> PoolStats:
    """GetIPStats (data_store.go): over every ENI, the CIDRs of the current mode."""
    total = assigned = cooldown = prefixes = free_prefixes = 0
    period = node.settings.cooldown
    for eni in node.enis.values():
        for cidr in eni.cidrs:
            total += cidr.size
            assigned += len(cidr.assigned)
            cooldown += sum(1 for t in cidr.freed.values() if now - t <= period)
            if cidr.prefix is not None:
                prefixes += 1
                free_prefixes += not cidr.assigned
    return PoolStats(total, assigned, cooldown, prefixes, free_prefixes)


def max_enis(limits: InstanceLimits, cni: CniSettings) -> int:
    """getMaxENI: the type's ENI limit, or MAX_ENI when that is lower (MAX_ENI below 1 is ignored)."""
    if cni.max_eni is not None and 1 <= cni.max_eni < limits.max_enis:
        return cni.max_eni
    return limits.max_enis


def warm_ip_targets_defined(cni: CniSettings) -> bool:
    """warmIPTargetsDefined: WARM_IP_TARGET or MINIMUM_IP_TARGET above 0 (0 is the same as unset)."""
    return bool(cni.warm_ip_target) or bool(cni.minimum_ip_target)


def target_shortfall(node: Ipamd, stats: PoolStats) -> tuple[int, int, bool]:
    """datastoreTargetState: (short, over, defined) against WARM_IP_TARGET / MINIMUM_IP_TARGET; in prefixes
    under prefix delegation. With MINIMUM_IP_TARGET alone, short is 0 as soon as total reaches the minimum."""
    cni = node.settings.cni
    if not warm_ip_targets_defined(cni):
        return 0, 0, False
    warm = cni.warm_ip_target or 0
    minimum = cni.minimum_ip_target or 0
    short = max(warm - stats.available, 0)
    short = max(short, minimum - stats.total)
    over = max(stats.available - warm, 0)
    over = max(min(over, stats.total - minimum), 0)
    if node.prefix_mode:
        short_prefixes = -(-short // BLOCK)
        needed_for_warm = -(-(stats.assigned + warm) // BLOCK)
        needed_for_min = -(-minimum // BLOCK)
        over_prefixes = max(min(stats.free_prefixes, stats.prefixes - needed_for_warm), 0)
        over_prefixes = max(min(over_prefixes, stats.prefixes - needed_for_min), 0)
        return short_prefixes, over_prefixes, True
    return short, over, True


def warm_prefix_target_defined(node: Ipamd) -> bool:
    """warmPrefixTargetDefined: always under prefix delegation (the target is at least 0)."""
    return node.prefix_mode and node.settings.warm_prefix_target >= 0


def prefix_shortfall(node: Ipamd, stats: PoolStats) -> tuple[int, bool]:
    """datastorePrefixTargetState: WARM_PREFIX_TARGET less the prefixes with no pod at all."""
    if not warm_prefix_target_defined(node):
        return 0, False
    return max(node.settings.warm_prefix_target - stats.free_prefixes, 0), True


def pool_too_low(node: Ipamd, stats: PoolStats) -> bool:
    """isDatastorePoolTooLow: never once total reaches max pods; else short of the IP targets when defined;
    else fewer available than WARM_ENI_TARGET ENIs' worth (WARM_PREFIX_TARGET prefixes' worth under prefix
    delegation), or nothing available with a target of 0."""
    if stats.total >= node.max_pods:
        return False
    short, _, defined = target_shortfall(node, stats)
    if defined:
        return short > 0
    if node.prefix_mode:
        warm_target, per_unit = node.settings.warm_prefix_target, BLOCK
    else:
        warm_target, per_unit = node.settings.cni.warm_eni_target, node.slots_per_eni
    return stats.available < per_unit * warm_target or (warm_target == 0 and stats.available == 0)


def pool_too_high(node: Ipamd, stats: PoolStats) -> bool:
    """isDatastorePoolTooHigh: over the IP targets when defined; else (prefix delegation) more prefixes with no pod
    than WARM_PREFIX_TARGET. WARM_ENI_TARGET alone never releases single IPs."""
    _, over, defined = target_shortfall(node, stats)
    if defined:
        return over > 0
    if warm_prefix_target_defined(node):
        return stats.free_prefixes > node.settings.warm_prefix_target
    return False


def eni_attachment_allowed(node: Ipamd) -> bool:
    """isENIAttachmentAllowed: not on a node tainted unschedulable (cordoned) unless
    AWS_MANAGE_ENIS_NON_SCHEDULABLE; a cordoned node gets no new IP and no new ENI."""
    return node.settings.manage_non_schedulable or node.schedulable


def in_insufficient_cidr_cooldown(node: Ipamd, now: float) -> bool:
    """inInsufficientCidrCoolingPeriod: 120 s without growing after the subnet said it was short."""
    return now - node.last_insufficient <= INSUFFICIENT_CIDR_COOLDOWN


def room_for_eni(node: Ipamd) -> bool:
    """hasRoomForEni: ENIs attached below the limit, less a slot kept for the trunk ENI while it is still to come
    (ENABLE_POD_ENI on a trunking type)."""
    trunk_to_come = node.settings.cni.pod_eni and node.limits.trunking and not node.has_trunk
    return len(node.enis) < max_enis(node.limits, node.settings.cni) - int(trunk_to_come)


def prefixes_needed(node: Ipamd, stats: PoolStats) -> int:
    """getPrefixesNeeded: at least 1; the IP targets' shortfall when defined, else WARM_PREFIX_TARGET's."""
    short, _, defined = target_shortfall(node, stats)
    if defined:
        return max(1, short)
    short_prefixes, prefix_defined = prefix_shortfall(node, stats)
    return max(1, short_prefixes) if prefix_defined else 1


def new_eni_request(node: Ipamd, stats: PoolStats) -> int:
    """GetENIResourcesToAllocate: what a new ENI asks for at creation, all at once: a whole ENI's secondaries under
    WARM_ENI_TARGET, min(short, per ENI) under the IP targets, the prefixes needed under prefix delegation."""
    if node.prefix_mode:
        return min(prefixes_needed(node, stats), node.slots_per_eni)
    short, _, defined = target_shortfall(node, stats)
    return min(short, node.slots_per_eni) if defined else node.slots_per_eni


def allocatable_enis(node: Ipamd, *, shuffle: bool = True) -> list[DsEni]:
    """GetAllocatableENIs: ENIs with free slots, in no set order (a Go map); never the trunk, nor the primary ENI
    under custom networking."""
    enis = [
        e for e in node.enis.values()
        if not e.trunk and not (e.primary and node.settings.cni.custom_networking) and len(e.cidrs) < node.slots_per_eni
    ]
    if shuffle:
        node.rng.shuffle(enis)
    return enis


def _short_of_addresses(error: Ec2Error) -> bool:
    """containsInsufficientCIDRsOrSubnetIPs."""
    return error.code in (INSUFFICIENT_ADDRESSES, INSUFFICIENT_BLOCKS)


def _add_cidrs(node: Ipamd, eni: DsEni, offsets: list[int], prefixes: list[Prefix]) -> None:
    eni.cidrs.extend(Cidr(o, 1) for o in offsets)
    eni.cidrs.extend(Cidr(p.offset, BLOCK, p) for p in prefixes)


def fill_attached_enis(node: Ipamd, stats: PoolStats) -> bool:
    """tryAssignIPs / tryAssignPrefixes: ask an attached ENI with free slots for what is wanted (a whole ENI's
    worth without IP targets, the shortfall with them, the prefixes needed under prefix delegation), falling back to
    one IP (one prefix) on failure. Under subnet discovery a subnet short of addresses moves on to the next ENI;
    otherwise the error stops the step. True when the pool grew."""
    if node.prefix_mode:
        wanted = prefixes_needed(node, stats)
    else:
        short, _, defined = target_shortfall(node, stats)
        if defined and short == 0:
            return False
        wanted = short if defined else node.slots_per_eni
    for eni in allocatable_enis(node):
        ask = min(node.slots_per_eni - len(eni.cidrs), wanted)
        try:
            _assign(node, eni, ask)
        except Ec2Error as first:
            if first.code != IP_LIMIT:
                try:
                    _assign(node, eni, 1)
                except Ec2Error as error:
                    if error.code == IP_LIMIT:
                        return True
                    if node.settings.subnet_discovery and _short_of_addresses(error):
                        continue
                    raise
        return True
    return False


def _assign(node: Ipamd, eni: DsEni, count: int) -> None:
    """One AssignPrivateIpAddresses call for `count` secondary IPs or prefixes; the new CIDRs join the datastore."""
    if node.prefix_mode:
        _add_cidrs(node, eni, [], node.ec2.assign_prefixes(eni.eni_id, count))
    else:
        _add_cidrs(node, eni, node.ec2.assign_private_ips(eni.eni_id, count), [])


def subnets_for_new_eni(node: Ipamd) -> list[SimSubnet]:
    """createENI's choice of subnet: the ENIConfig's under custom networking (one attempt, none without an
    ENIConfig); under subnet discovery every subnet of the node's zone fit for ENIs (`isSubnetValidForENICreation`:
    the node's own unless tagged kubernetes.io/role/cni=0, others only when tagged with another value), most free
    addresses first; else the node's own subnet, unless tagged 0."""
    ec2 = node.ec2
    if node.settings.cni.custom_networking:
        return [ec2.subnets[node.eni_config_subnet]] if node.eni_config_subnet in ec2.subnets else []
    own = ec2.subnets[node.primary_subnet]
    if not node.settings.subnet_discovery:
        return [] if own.tags.get(CNI_TAG) == "0" else [own]
    fit = []
    for subnet in ec2.zone_subnets(own.zone):
        tag = subnet.tags.get(CNI_TAG, "")
        if tag == "0" or (not tag and subnet.subnet_id != own.subnet_id):
            continue
        fit.append(subnet)
    return sorted(fit, key=lambda s: -s.free)  # sort.SliceStable by AvailableIpAddressCount, descending


def allocate_eni(node: Ipamd, stats: PoolStats, now: float) -> bool:
    """tryAllocateENI / createENI: one CreateNetworkInterface asking for the primary address plus everything wanted
    at once, in each candidate subnet in turn, with no fallback to fewer; then attach it. Raises the last EC2 error
    when every subnet refused."""
    request = new_eni_request(node, stats)
    if request <= 0:
        return False
    candidates = subnets_for_new_eni(node)
    if not candidates:
        return False
    error: Ec2Error | None = None
    for subnet in candidates:
        try:
            if node.prefix_mode:
                eni = node.ec2.create_network_interface(subnet.subnet_id, CNI_ENI_PREFIX + node.instance_id,
                                                        prefix_count=request)
            else:
                eni = node.ec2.create_network_interface(subnet.subnet_id, CNI_ENI_PREFIX + node.instance_id,
                                                        secondary_count=request)
        except Ec2Error as exc:
            error = exc
            continue
        node.ec2.attach_network_interface(eni.eni_id, node.instance_id, node.ec2.free_device_index(node.instance_id))
        ds = DsEni(eni.eni_id, subnet.subnet_id, primary=False, created=now)
        _add_cidrs(node, ds, list(eni.secondaries), list(eni.prefixes))
        node.enis[ds.eni_id] = ds
        return True
    assert error is not None
    raise error


def increase_pool(node: Ipamd, now: float) -> bool:
    """increaseDatastorePool: nothing on a cordoned node or within 120 s of a subnet shortage; fill attached ENIs
    first; only when none grew (and no error) create an ENI, if there is room for one. A subnet shortage starts
    the 120 s cooldown. True when the pool grew."""
    if not eni_attachment_allowed(node) or in_insufficient_cidr_cooldown(node, now):
        return False
    stats = pool_stats(node, now)
    try:
        if fill_attached_enis(node, stats):
            return True
    except Ec2Error as error:
        if _short_of_addresses(error):
            node.last_insufficient = now
        return False
    if not room_for_eni(node):
        return False
    try:
        return allocate_eni(node, stats, now)
    except Ec2Error as error:
        if _short_of_addresses(error):
            node.last_insufficient = now
        return False


def release_over_target(node: Ipamd, stats: PoolStats) -> int:
    """tryUnassignCidrsFromAll (decreaseDatastorePool): give back to EC2 up to `over` CIDRs with no pod (cooling
    ones included). Returns how many went."""
    _, over, defined = target_shortfall(node, stats)
    if not defined:
        over = max(stats.free_prefixes - node.settings.warm_prefix_target, 0) if warm_prefix_target_defined(node) else 0
    released = 0
    enis = list(node.enis.values())
    node.rng.shuffle(enis)  # ENIs and their CIDRs are Go maps: no set order
    for eni in enis:
        if over <= 0:
            break
        freeable = [c for c in eni.cidrs if not c.assigned]  # FindFreeableCidrs: cooling ones too
        node.rng.shuffle(freeable)
        freeable = freeable[:over]
        if not freeable:
            continue
        for cidr in freeable:
            eni.cidrs.remove(cidr)
        node.ec2.unassign_private_ip_addresses(
            eni.eni_id,
            offsets=[c.base for c in freeable if c.prefix is None],
            prefixes=[c.prefix for c in freeable if c.prefix is not None],
        )
        released += len(freeable)
        over -= len(freeable)
    return released


def should_remove_extra_enis(node: Ipamd, stats: PoolStats) -> bool:
    """shouldRemoveExtraENIs: always with IP targets (getDeletableENI checks them); else available addresses of
    (target + 1) ENIs."""
    if warm_ip_targets_defined(node.settings.cni):
        return True
    target = (node.settings.warm_prefix_target if node.prefix_mode else node.settings.cni.warm_eni_target) + 1
    return stats.available >= target * node.addresses_per_eni


def deletable_eni(node: Ipamd, stats: PoolStats, now: float) -> DsEni | None:
    """getDeletableENI: never the primary or trunk ENI, an ENI younger than a minute, one with a cooling address or
    a pod, nor one the IP or prefix targets still need."""
    cni = node.settings.cni
    for eni in node.enis.values():
        if eni.primary or eni.trunk or now - eni.created < MIN_ENI_LIFETIME:
            continue
        if any(c.assigned for c in eni.cidrs):
            continue
        if any(now - t <= node.settings.cooldown for c in eni.cidrs for t in c.freed.values()):
            continue
        size = sum(c.size for c in eni.cidrs)
        warm = cni.warm_ip_target or 0
        minimum = cni.minimum_ip_target or 0
        if node.prefix_mode:
            warm, minimum = -(-warm // BLOCK) * BLOCK, -(-minimum // BLOCK) * BLOCK
        if warm and stats.available - size < warm:
            continue  # isRequiredForWarmIPTarget
        if minimum and stats.total - size < minimum:
            continue  # isRequiredForMinimumIPTarget
        if (not warm_ip_targets_defined(cni) and node.prefix_mode
                and stats.free_prefixes - len(eni.cidrs) < node.settings.warm_prefix_target):
            continue  # isRequiredForWarmPrefixTarget
        return eni
    return None


def free_eni(node: Ipamd, now: float) -> bool:
    """tryFreeENI: at most one ENI per step, never on a cordoned node."""
    if not eni_attachment_allowed(node):
        return False
    stats = pool_stats(node, now)
    eni = deletable_eni(node, stats, now)
    if eni is None:
        return False
    del node.enis[eni.eni_id]
    node.ec2.delete_network_interface(eni.eni_id)
    return True


def update_pool(node: Ipamd, now: float) -> None:
    """updateIPPoolIfRequired: grow when too low, else shrink when too high (at most every 30 s); then maybe free
    an ENI."""
    stats = pool_stats(node, now)
    if pool_too_low(node, stats):
        increase_pool(node, now)
    elif pool_too_high(node, stats) and now - node.last_decrease > DECREASE_INTERVAL:
        release_over_target(node, stats)
        node.last_decrease = now
    stats = pool_stats(node, now)
    if should_remove_extra_enis(node, stats):
        free_eni(node, now)


# ---- pods ---------------------------------------------------------------------------------------------------


def assign_pod_address(node: Ipamd, pod: str, now: float) -> int | None:
    """AssignPodIPv4Address: the first address out of cooldown found on any ENI (in no set order), or None
    ("no available IP/Prefix addresses": the CNI ADD fails)."""
    if pod in node.pods:
        return node.pods[pod][2]
    enis = list(node.enis.values())
    node.rng.shuffle(enis)
    period = node.settings.cooldown
    for eni in enis:
        cidrs = list(eni.cidrs)
        node.rng.shuffle(cidrs)  # AvailableIPv4Cidrs is a Go map too: pods are not packed into used prefixes
        for cidr in cidrs:
            offset = _unused_address(cidr, now, period)
            if offset is not None:
                cidr.freed.pop(offset, None)
                cidr.assigned[offset] = pod
                node.pods[pod] = (eni.eni_id, cidr, offset)
                return offset
    return None


def _unused_address(cidr: Cidr, now: float, period: float) -> int | None:
    """getUnusedIP: a freed address out of cooldown, else one never used."""
    for offset, freed in cidr.freed.items():
        if now - freed > period:
            return offset
    for offset in range(cidr.base, cidr.base + cidr.size):
        if offset not in cidr.assigned and offset not in cidr.freed:
            return offset
    return None


def unassign_pod_address(node: Ipamd, pod: str, now: float) -> None:
    """UnassignPodIPAddress: the address stays in the datastore, cooling down."""
    entry = node.pods.pop(pod, None)
    if entry is None:
        return
    _, cidr, offset = entry
    del cidr.assigned[offset]
    cidr.freed[offset] = now


# ---- what the simulator asks of a node's ipamd (not ipamd rules) ---------------------------------------------


def has_free_address(node: Ipamd, now: float) -> bool:
    period = node.settings.cooldown
    return any(_unused_address(c, now, period) is not None for e in node.enis.values() for c in e.cidrs)


def holds_unassigned(node: Ipamd) -> bool:
    """An address held but given to no pod (cooling or not): a pod gets it within the cooldown at most."""
    return any(len(c.assigned) < c.size for e in node.enis.values() for c in e.cidrs)


def _subnet_can_give(node: Ipamd, subnet: SimSubnet, singles: int, prefixes: int) -> bool:
    return subnet.space.free_count >= singles + prefixes * BLOCK and subnet.space.free_block_count >= prefixes


def growth_possible(node: Ipamd, now: float, *, ignore_timers: bool = False) -> bool:
    """Whether ipamd's next pool step would add an address, by the same rules as `increase_pool` but reading EC2
    instead of calling it. `ignore_timers`: as if the 120 s shortage cooldown were over (what the node could do
    given a little time)."""
    stats = pool_stats(node, now)
    if not pool_too_low(node, stats):
        return False
    if not eni_attachment_allowed(node) or (not ignore_timers and in_insufficient_cidr_cooldown(node, now)):
        return False
    singles, prefixes = (0, 1) if node.prefix_mode else (1, 0)
    attached = allocatable_enis(node, shuffle=False)
    for eni in attached:
        if _subnet_can_give(node, node.ec2.subnets[eni.subnet_id], singles, prefixes):
            return True
    if attached and not node.settings.subnet_discovery:
        return False  # the shortage error stops the step before any new ENI
    if not room_for_eni(node):
        return False
    request = max(new_eni_request(node, stats), 1)
    need_singles, need_prefixes = (1, request) if node.prefix_mode else (1 + request, 0)
    return any(_subnet_can_give(node, s, need_singles, need_prefixes) for s in subnets_for_new_eni(node))
