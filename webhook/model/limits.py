"""Instance-type network limits and the pod-IP capacity they give under each VPC CNI mode.

Formulas follow the VPC CNI and the EKS AMI's max-pods calculator:
  secondary IPs:      E x (I - 1) pod IPs, max-pods E x (I - 1) + 2 (aws-node and kube-proxy use the host network)
  prefix delegation:  every secondary slot holds a /28, so E x (I - 1) x 16 pod IPs
  custom networking:  the primary ENI carries no pod IPs, so E - 1 ENIs
  MAX_ENI caps E; ENABLE_POD_ENI takes one ENI slot for the trunk ENI on trunking-capable types.
The calculator caps max-pods at 110 (<= 30 vCPUs) or 250 unless asked for the maximum allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from webhook.model.instance_types import INSTANCE_TYPES

PREFIX_SIZE = 16  # a /28 prefix
HOST_NETWORK_PODS = 2  # aws-node and kube-proxy
MAX_PODS_CEILING_LOW_CPU = 110
MAX_PODS_CEILING_HIGH_CPU = 250
HIGH_CPU_THRESHOLD = 30
# Prefix delegation needs VPC CNI 1.9.0 or newer.
PREFIX_DELEGATION_MIN_CNI = (1, 9, 0)


class UnknownInstanceType(LookupError):
    """An instance type with no known network limits."""

    def __init__(self, instance_type: str, suggestions: list[str] | None = None) -> None:
        hint = f" (did you mean {', '.join(suggestions)}?)" if suggestions else ""
        super().__init__(
            f"unknown instance type {instance_type!r}: no network limits known for it{hint}; "
            "its limits come from EC2 DescribeInstanceTypes when ipguard runs with AWS access"
        )
        self.instance_type = instance_type


@dataclass(frozen=True, slots=True)
class InstanceLimits:
    instance_type: str
    max_enis: int  # on the default network card, as the VPC CNI counts them
    ipv4_per_eni: int
    prefix_delegation: bool  # Nitro or bare metal
    vcpus: int
    branch_enis: int  # security groups for pods; 0 where the type cannot trunk
    # Worked out once: every pod event looks ipamd's rules up by a node's limits. Only the numbers go in, whose
    # hashes are the same in every process (a str's is not), so a copy shipped from another process keeps a
    # right one; types with the same numbers share a hash and still compare unequal.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.max_enis, self.ipv4_per_eni, self.prefix_delegation,
                                                self.vcpus, self.branch_enis)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def trunking(self) -> bool:
        return self.branch_enis > 0


@dataclass(frozen=True, slots=True)
class CapacityMode:
    """The CNI settings that change how many pod IPs a node can hold."""

    prefix_delegation: bool = False
    custom_networking: bool = False
    max_eni: int | None = None  # MAX_ENI
    pod_eni: bool = False  # ENABLE_POD_ENI


class LimitsTable:
    """Instance limits by type: live values (from DescribeInstanceTypes) over the bundled table."""

    __slots__ = ("_bundled", "_live", "_made")

    def __init__(self, bundled: Mapping[str, tuple[int, int, bool, int, int]] = INSTANCE_TYPES) -> None:
        self._bundled = bundled
        self._live: dict[str, InstanceLimits] = {}
        self._made: dict[str, InstanceLimits] = {}  # one object per bundled type: equal keys are then identical

    def update(self, limits: InstanceLimits) -> None:
        self._live[limits.instance_type] = limits

    def known(self, instance_type: str) -> bool:
        return instance_type in self._live or instance_type in self._bundled

    def types(self) -> list[str]:
        return sorted(set(self._bundled) | set(self._live))

    def get(self, instance_type: str) -> InstanceLimits:
        live = self._live.get(instance_type) or self._made.get(instance_type)
        if live is not None:
            return live
        row = self._bundled.get(instance_type)
        if row is None:
            family = instance_type.split(".", 1)[0] + "."
            near = [t for t in self.types() if t.startswith(family)][:5]
            raise UnknownInstanceType(instance_type, near)
        enis, ips, pd, vcpus, branch = row
        made = self._made[instance_type] = InstanceLimits(instance_type, enis, ips, pd, vcpus, branch)
        return made


def usable_enis(limits: InstanceLimits, mode: CapacityMode) -> int:
    """ENIs whose secondary slots can hold pod IPs (or prefixes)."""
    enis = limits.max_enis
    if mode.max_eni is not None:
        enis = min(enis, mode.max_eni)
    if mode.pod_eni and limits.trunking:
        enis -= 1  # the trunk ENI takes one slot
    if mode.custom_networking:
        enis -= 1  # the primary ENI stays in the node's subnet and carries no pod IPs
    return max(enis, 0)


def without_lost_slots(limits: InstanceLimits, lost: int, mode: CapacityMode) -> InstanceLimits:
    """The limits of a node whose attached ENIs take `lost` slots without carrying pod IPs (ENIs tagged
    `node.k8s.amazonaws.com/no_manage=true`, EFA-only ones, ENIs in subnets ipamd excludes): ipamd's
    `hasRoomForEni` allows maxENI (the type's limit, capped by MAX_ENI) less those slots (and the trunk's)."""
    if lost <= 0:
        return limits
    enis = limits.max_enis if mode.max_eni is None else min(limits.max_enis, mode.max_eni)
    return replace(limits, max_enis=max(enis - lost, 0))


def uses_prefixes(limits: InstanceLimits, mode: CapacityMode) -> bool:
    # ipamd falls back to secondary IPs on types that cannot take prefixes.
    return mode.prefix_delegation and limits.prefix_delegation


def pod_ip_slots(limits: InstanceLimits, mode: CapacityMode) -> int:
    """Secondary slots (one IP, or one /28 under prefix delegation) available for pods."""
    return usable_enis(limits, mode) * max(limits.ipv4_per_eni - 1, 0)


def pod_ip_capacity(limits: InstanceLimits, mode: CapacityMode) -> int:
    """How many pod IPs a node of this type can hold in this mode (before any kubelet cap)."""
    slots = pod_ip_slots(limits, mode)
    return slots * PREFIX_SIZE if uses_prefixes(limits, mode) else slots


def max_pods_ceiling(limits: InstanceLimits) -> int:
    return MAX_PODS_CEILING_HIGH_CPU if limits.vcpus > HIGH_CPU_THRESHOLD else MAX_PODS_CEILING_LOW_CPU


def parse_cni_version(text: str) -> tuple[int, int, int]:
    """'v1.18.3-eksbuild.1' or '1.9' -> (1, 18, 3)."""
    core = text.strip().lstrip("vV").split("-", 1)[0].split("+", 1)[0]
    parts = core.split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"invalid CNI version {text!r}: expected MAJOR.MINOR[.PATCH], e.g. 1.18.3")
    nums = [int(p) for p in parts] + [0] * (3 - len(parts))
    return nums[0], nums[1], nums[2]


def max_pods(
    limits: InstanceLimits,
    mode: CapacityMode,
    *,
    cni_version: tuple[int, int, int] | None = None,
    show_max_allowed: bool = False,
) -> int:
    """The kubelet max-pods value the EKS max-pods calculator gives."""
    effective = mode
    if mode.prefix_delegation and cni_version is not None and cni_version < PREFIX_DELEGATION_MIN_CNI:
        effective = CapacityMode(False, mode.custom_networking, mode.max_eni, mode.pod_eni)
    figure = pod_ip_capacity(limits, effective) + HOST_NETWORK_PODS
    if show_max_allowed:
        return figure
    return min(figure, max_pods_ceiling(limits))
