"""Does the subnet math close? N pods per zone on nodes of one type, against each zone's pod subnet CIDR.

Pure arithmetic, no I/O. What a node holds is ipamd's rule (`ipamd.predict_held`: warm pools at the given
targets, a new ENI taking its primary address plus its whole request at once, growth stopping at max-pods
IPs); this module only lays the nodes into a subnet:
  - AWS reserves 5 addresses of every subnet: the first four and the last.
  - Nodes are packed: each takes as many pods as it can (pod IPs of its type, never above kubelet max-pods
    less the 2 host-network pods aws-node and kube-proxy), the last one takes the rest.
  - Each node takes its own primary address, one primary per further ENI, and the pod IPs its warm pool holds
    (idle ones included).
  - Under prefix delegation pod IPs come in aligned /28 blocks of 16 free addresses. A subnet's usable blocks
    are those inside its CIDR that hold no reserved address; node and ENI primaries go first into the
    addresses outside them, and each 16 more break one block (packed). Scattered primaries (EC2 picks them,
    unless a subnet CIDR reservation of type prefix keeps the blocks apart) can each break a block: the
    `scattered` figure says whether the plan survives that too.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from webhook.model import ipamd
from webhook.model.cni import CniSettings
from webhook.model.limits import HOST_NETWORK_PODS, PREFIX_SIZE, InstanceLimits, max_pods, pod_ip_capacity

AWS_RESERVED_PER_SUBNET = 5  # network address, VPC router, DNS, future use, and the last address
MIN_SUBNET_PREFIX = 16  # the sizes EC2 accepts for an IPv4 subnet: /16 to /28
MAX_SUBNET_PREFIX = 28

SECONDARY_IP = "secondary-ip"
PREFIX_DELEGATION = "prefix-delegation"


class PlanError(ValueError):
    """Input the plan cannot be worked out for; the message says which and why."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class SubnetSpace:
    """What one subnet CIDR offers pods."""

    cidr: str
    size: int  # every address in the CIDR
    available: int  # less AWS's 5 reserved
    blocks: int  # aligned /28 blocks holding no reserved address

    @property
    def outside_blocks(self) -> int:
        """Available addresses outside the usable /28 blocks: where primaries go without breaking a block."""
        return self.available - PREFIX_SIZE * self.blocks


def subnet_space(cidr: str) -> SubnetSpace:
    """A subnet CIDR's addresses, AWS's reserved ones taken out, and its /28 blocks that hold none of them (the
    first and last blocks hold the reserved addresses; in a /28 they are the same block)."""
    try:
        network = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise PlanError(f"{cidr!r} is not a subnet CIDR: {exc}") from None
    if not isinstance(network, ipaddress.IPv4Network):
        raise PlanError(f"{cidr}: only IPv4 pod subnets run out of addresses (IPv6 clusters use prefixes)")
    if not MIN_SUBNET_PREFIX <= network.prefixlen <= MAX_SUBNET_PREFIX:
        raise PlanError(f"{cidr}: EC2 subnets are /{MIN_SUBNET_PREFIX} to /{MAX_SUBNET_PREFIX}")
    size = network.num_addresses
    all_blocks = size // PREFIX_SIZE
    return SubnetSpace(str(network), size, size - AWS_RESERVED_PER_SUBNET, max(all_blocks - 2, 0))


@dataclass(frozen=True, slots=True)
class ModeNeed:
    """What N pods take from one subnet in one CNI mode."""

    mode: str  # SECONDARY_IP | PREFIX_DELEGATION
    pods: int
    pods_per_node: int  # pod IPs per node: the type's, capped by max-pods less the host-network pods
    max_pods: int  # kubelet max-pods, as the EKS AMI's calculator gives it
    nodes: int
    node_primaries: int
    eni_primaries: int  # primaries of the ENIs beyond each node's first
    pod_ips: int  # IPs the warm pools hold (16 per /28 under prefix delegation)
    idle: int  # of those, held with no pod on them
    blocks: int  # /28 blocks (prefix delegation)

    @property
    def loose(self) -> int:
        """Addresses taken one at a time: primaries, and secondary IPs outside prefix delegation."""
        primaries = self.node_primaries + self.eni_primaries
        return primaries if self.mode == PREFIX_DELEGATION else primaries + self.pod_ips

    @property
    def needed(self) -> int:
        return self.loose + PREFIX_SIZE * self.blocks

    def blocks_broken(self, space: SubnetSpace, *, scattered: bool) -> int:
        """Usable /28 blocks lost to loose addresses: none while they fit outside the blocks; then one per 16
        (packed), or one each (scattered)."""
        spill = max(self.loose - space.outside_blocks, 0)
        return spill if scattered else _ceil_div(spill, PREFIX_SIZE)

    def fits(self, space: SubnetSpace, *, scattered: bool = False) -> bool:
        if self.needed > space.available:
            return False
        if self.mode == SECONDARY_IP:
            return True  # loose addresses anywhere will do
        return self.blocks + self.blocks_broken(space, scattered=scattered) <= space.blocks


def mode_settings(settings: CniSettings, prefix_delegation: bool) -> CniSettings:
    return CniSettings(
        prefix_delegation=prefix_delegation,
        warm_eni_target=settings.warm_eni_target,
        warm_ip_target=settings.warm_ip_target,
        minimum_ip_target=settings.minimum_ip_target,
        warm_prefix_target=settings.warm_prefix_target,
        max_eni=settings.max_eni,
    )


def mode_need(pods: int, limits: InstanceLimits, settings: CniSettings) -> ModeNeed:
    """The addresses `pods` pods take on nodes of this type, packed, under these CNI settings (ipamd's warm
    pools: `ipamd.predict_held` per node)."""
    if pods < 0:
        raise PlanError("the pod count must not be negative")
    prefixes = ipamd.prefix_delegation_on(limits, settings)
    kubelet = max_pods(limits, settings.mode)
    per_node = min(pod_ip_capacity(limits, settings.mode), kubelet - HOST_NETWORK_PODS)
    mode = PREFIX_DELEGATION if prefixes else SECONDARY_IP
    if per_node <= 0:
        raise PlanError(f"{limits.instance_type} holds no pod IPs under these settings")
    if pods == 0:
        return ModeNeed(mode, 0, per_node, kubelet, 0, 0, 0, 0, 0, 0)
    full, rest = divmod(pods, per_node)
    shapes = [(full, per_node)] + ([(1, rest)] if rest else [])
    nodes = enis = ips = blocks = 0
    for count, assigned in shapes:
        held = ipamd.predict_held(assigned, limits, settings, kubelet)
        if held.ips < assigned:
            raise PlanError(f"ipamd would hold {held.ips} IPs for {assigned} pods on {limits.instance_type} "
                            "under these targets (MINIMUM_IP_TARGET without WARM_IP_TARGET?): pods would wait")
        nodes += count
        enis += count * max(held.enis - 1, 0)
        ips += count * held.ips
        blocks += count * held.prefixes
    return ModeNeed(mode, pods, per_node, kubelet, nodes, nodes, enis, ips, ips - pods, blocks)


def largest_fit(space: SubnetSpace, limits: InstanceLimits, settings: CniSettings) -> int:
    """The most pods the subnet holds in this mode (packed primaries). Needs grow with the pod count, so a
    binary search over 0 .. the subnet's addresses."""
    low, high = 0, space.available
    while low < high:
        middle = (low + high + 1) // 2
        if mode_need(middle, limits, settings).fits(space):
            low = middle
        else:
            high = middle - 1
    return low


@dataclass(frozen=True, slots=True)
class ModePlan:
    need: ModeNeed
    fits: bool
    fits_scattered: bool  # also when every primary beyond the blocks' outside breaks a /28 of its own
    largest: int  # most pods that fit in this mode


@dataclass(frozen=True, slots=True)
class SubnetPlan:
    space: SubnetSpace
    secondary: ModePlan
    prefix: ModePlan | None  # None: the type cannot take prefixes (not Nitro)


FITS = "fits"
FITS_WITH_PREFIX_DELEGATION = "fits only with prefix delegation"
FITS_WITHOUT_PREFIX_DELEGATION = "fits only without prefix delegation"
DOES_NOT_FIT = "does not fit"


@dataclass(frozen=True, slots=True)
class Plan:
    pods: int
    instance_type: str
    prefix_delegation: bool  # as asked
    subnets: tuple[SubnetPlan, ...]

    def asked(self, subnet: SubnetPlan) -> ModePlan:
        if self.prefix_delegation and subnet.prefix is not None:
            return subnet.prefix
        return subnet.secondary

    @property
    def fits(self) -> bool:
        """Every subnet holds the pods in the mode asked for."""
        return all(self.asked(s).fits for s in self.subnets)

    @property
    def verdict(self) -> str:
        if self.fits:
            return FITS
        if all(s.prefix is not None and s.prefix.fits for s in self.subnets):
            return FITS_WITH_PREFIX_DELEGATION
        if self.prefix_delegation and all(s.secondary.fits for s in self.subnets):
            return FITS_WITHOUT_PREFIX_DELEGATION
        return DOES_NOT_FIT


def make_plan(cidrs: list[str], pods: int, limits: InstanceLimits, settings: CniSettings) -> Plan:
    """N pods per zone, one pod subnet per zone, in both modes; `settings.prefix_delegation` is the mode asked
    for."""
    if not cidrs:
        raise PlanError("give at least one pod subnet CIDR")
    secondary_settings = mode_settings(settings, False)
    prefix_settings = mode_settings(settings, True)
    can_prefix = ipamd.prefix_delegation_on(limits, prefix_settings)
    plans = []
    for cidr in cidrs:
        space = subnet_space(cidr)
        plans.append(SubnetPlan(
            space,
            _mode_plan(space, pods, limits, secondary_settings),
            _mode_plan(space, pods, limits, prefix_settings) if can_prefix else None,
        ))
    return Plan(pods, limits.instance_type, settings.prefix_delegation, tuple(plans))


def _mode_plan(space: SubnetSpace, pods: int, limits: InstanceLimits, settings: CniSettings) -> ModePlan:
    need = mode_need(pods, limits, settings)
    return ModePlan(need, need.fits(space), need.fits(space, scattered=True), largest_fit(space, limits, settings))
