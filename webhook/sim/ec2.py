"""Simulated EC2: subnets (address spaces), instances and network interfaces, with EC2's all-or-nothing calls.

Only the calls the VPC CNI and the VPC resource controller make, with the errors they react to:
CreateNetworkInterface (primary address plus every secondary IP or /28 prefix asked for, in one call),
AssignPrivateIpAddresses, UnassignPrivateIpAddresses, AttachNetworkInterface (the instance's ENI limit),
DeleteNetworkInterface, RunInstances (the node's own address) and TerminateInstances.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from webhook.model.limits import InstanceLimits
from webhook.sim.addresses import AddressSpace, Ec2Error, Prefix

ATTACHMENT_LIMIT = "AttachmentLimitExceeded"
IP_LIMIT = "PrivateIpAddressLimitExceeded"
CNI_TAG = "kubernetes.io/role/cni"
CNI_ENI_PREFIX = "aws-K8S-"  # what the CNI writes in its ENIs' description, followed by the instance id
TRUNK_DESCRIPTION = "trunk-eni"
BRANCH_DESCRIPTION = "aws-k8s-branch-eni"


@dataclass(slots=True)
class SimSubnet:
    subnet_id: str
    zone: str
    cidr: str
    space: AddressSpace
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.space.free_count


@dataclass(slots=True)
class SimEni:
    eni_id: str
    subnet_id: str
    description: str
    interface_type: str = "interface"  # interface | trunk | branch
    primary: int | None = None  # offset of its primary address in the subnet
    secondaries: list[int] = field(default_factory=list)
    prefixes: list[Prefix] = field(default_factory=list)
    instance_id: str | None = None
    device_index: int | None = None
    trunk_eni_id: str | None = None  # branch ENIs: the trunk they hang off
    groups: tuple[str, ...] = ()


@dataclass(slots=True)
class SimInstance:
    instance_id: str
    instance_type: str
    limits: InstanceLimits
    zone: str
    subnet_id: str
    enis: dict[int, str] = field(default_factory=dict)  # device index -> ENI id


class Ec2:
    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.subnets: dict[str, SimSubnet] = {}
        self.enis: dict[str, SimEni] = {}
        self.instances: dict[str, SimInstance] = {}
        self._ids = itertools.count(1)

    def _id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):017x}"

    # ---- subnets ----------------------------------------------------------------------------------------

    def add_subnet(self, subnet_id: str, zone: str, cidr: str, tags: dict[str, str] | None = None) -> SimSubnet:
        subnet = SimSubnet(subnet_id, zone, cidr, AddressSpace(cidr, random.Random(self.rng.random())), tags or {})
        self.subnets[subnet_id] = subnet
        return subnet

    def occupy(self, subnet_id: str, free: int, free_blocks: int | None = None) -> None:
        """Addresses used outside the cluster (other workloads, load balancers), as one unattached ENI that
        DescribeNetworkInterfaces shows, until the subnet has `free` left (`free_blocks` of them whole /28s)."""
        taken = self.subnets[subnet_id].space.occupy_to(free, free_blocks)
        if taken:
            eni = SimEni(self._id("eni"), subnet_id, "other workloads", primary=taken[0], secondaries=taken[1:])
            self.enis[eni.eni_id] = eni

    def zone_subnets(self, zone: str) -> list[SimSubnet]:
        """DescribeSubnets filtered by the zone (the VPC is the simulation's one VPC)."""
        return [s for s in self.subnets.values() if s.zone == zone]

    # ---- instances --------------------------------------------------------------------------------------

    def run_instance(self, instance_type: str, limits: InstanceLimits, subnet_id: str) -> SimInstance:
        """An instance with its primary ENI (device 0) and that ENI's primary address from `subnet_id`."""
        subnet = self.subnets[subnet_id]
        eni = self._create(subnet, "Primary network interface", 0, 0)
        instance = SimInstance(self._id("i"), instance_type, limits, subnet.zone, subnet_id)
        self.instances[instance.instance_id] = instance
        self.attach_network_interface(eni.eni_id, instance.instance_id, 0)
        return instance

    def terminate_instance(self, instance_id: str) -> None:
        instance = self.instances.pop(instance_id)
        for eni_id in list(instance.enis.values()):
            self._delete(self.enis[eni_id])

    # ---- network interfaces -----------------------------------------------------------------------------

    def _create(self, subnet: SimSubnet, description: str, secondaries: int, prefixes: int,
                interface_type: str = "interface") -> SimEni:
        space = subnet.space
        taken_prefixes = space.allocate_prefixes(prefixes) if prefixes else []
        try:
            taken = space.allocate(1 + secondaries)
        except Ec2Error:
            for prefix in taken_prefixes:
                space.release_prefix(prefix)
            raise
        eni = SimEni(self._id("eni"), subnet.subnet_id, description, interface_type, taken[0], taken[1:],
                     taken_prefixes)
        self.enis[eni.eni_id] = eni
        return eni

    def create_network_interface(self, subnet_id: str, description: str, *, secondary_count: int = 0,
                                 prefix_count: int = 0, interface_type: str = "interface") -> SimEni:
        """CreateNetworkInterface: the primary address and everything asked for, or nothing at all."""
        return self._create(self.subnets[subnet_id], description, secondary_count, prefix_count, interface_type)

    def attach_network_interface(self, eni_id: str, instance_id: str, device_index: int) -> None:
        instance = self.instances[instance_id]
        if len(instance.enis) >= instance.limits.max_enis or device_index in instance.enis:
            raise Ec2Error(ATTACHMENT_LIMIT, f"{instance_id} has {len(instance.enis)} ENIs attached")
        eni = self.enis[eni_id]
        eni.instance_id, eni.device_index = instance_id, device_index
        instance.enis[device_index] = eni_id

    def free_device_index(self, instance_id: str) -> int:
        used = self.instances[instance_id].enis
        return next(i for i in itertools.count() if i not in used)

    def delete_network_interface(self, eni_id: str) -> None:
        eni = self.enis[eni_id]
        if eni.instance_id is not None:
            instance = self.instances.get(eni.instance_id)
            if instance is not None and eni.device_index is not None:
                instance.enis.pop(eni.device_index, None)
        self._delete(eni)

    def _delete(self, eni: SimEni) -> None:
        space = self.subnets[eni.subnet_id].space
        for offset in ([eni.primary] if eni.primary is not None else []) + eni.secondaries:
            space.give_back(offset)
        for prefix in eni.prefixes:
            space.release_prefix(prefix)
        del self.enis[eni.eni_id]

    def _check_slots(self, eni: SimEni, wanted: int) -> None:
        instance = self.instances[eni.instance_id] if eni.instance_id else None
        left = (instance.limits.ipv4_per_eni if instance else 0) - 1 - len(eni.secondaries) - len(eni.prefixes)
        if wanted > left:
            raise Ec2Error(IP_LIMIT, f"{eni.eni_id} has {left} slots left")

    def assign_private_ips(self, eni_id: str, count: int) -> list[int]:
        """AssignPrivateIpAddresses with SecondaryPrivateIpAddressCount: all or none."""
        eni = self.enis[eni_id]
        self._check_slots(eni, count)
        offsets = self.subnets[eni.subnet_id].space.allocate(count)
        eni.secondaries.extend(offsets)
        return offsets

    def assign_prefixes(self, eni_id: str, count: int) -> list[Prefix]:
        """AssignPrivateIpAddresses with Ipv4PrefixCount: all or none."""
        eni = self.enis[eni_id]
        self._check_slots(eni, count)
        prefixes = self.subnets[eni.subnet_id].space.allocate_prefixes(count)
        eni.prefixes.extend(prefixes)
        return prefixes

    def unassign_private_ip_addresses(self, eni_id: str, offsets: Sequence[int], prefixes: Sequence[Prefix]) -> None:
        """UnassignPrivateIpAddresses: secondary IPs and prefixes back to the subnet."""
        eni = self.enis[eni_id]
        space = self.subnets[eni.subnet_id].space
        for offset in offsets:
            eni.secondaries.remove(offset)
            space.give_back(offset)
        for prefix in prefixes:
            eni.prefixes.remove(prefix)
            space.release_prefix(prefix)

    def instance_enis(self, instance_id: str) -> list[SimEni]:
        instance = self.instances[instance_id]
        return [self.enis[instance.enis[i]] for i in sorted(instance.enis)]
