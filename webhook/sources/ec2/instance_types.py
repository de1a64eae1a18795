"""Where live instance-type limits come from: DescribeInstanceTypes, read as scripts/gen_instance_limits.py
reads it for the bundled table, cached for hours per type."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from cachetools import TTLCache

from webhook.model.instance_types import INSTANCE_TYPES, IPAMD_ENI_LIMITS
from webhook.model.limits import InstanceLimits
from webhook.sources.ec2.client import Call, Ec2, chunks

if TYPE_CHECKING:
    from mypy_boto3_ec2.type_defs import InstanceTypeInfoTypeDef


def _max_enis(info: InstanceTypeInfoTypeDef) -> int | None:
    """Max ENIs as ipamd counts them: its own table's figure for the types it lists with another one
    (`IPAMD_ENI_LIMITS`; ipamd never asks EC2 about those), else the default network card's."""
    listed = IPAMD_ENI_LIMITS.get(info.get("InstanceType", ""))
    if listed is not None:
        return listed
    network = info.get("NetworkInfo")
    if network is None:
        return None
    cards = network.get("NetworkCards")
    if not cards:
        return network.get("MaximumNetworkInterfaces")
    # The VPC CNI attaches ENIs on the default network card only.
    default_index = network.get("DefaultNetworkCardIndex", 0)
    for card in cards:
        if card.get("NetworkCardIndex", 0) == default_index:
            return card.get("MaximumNetworkInterfaces")
    return None


def instance_limits_from_ec2(info: InstanceTypeInfoTypeDef, branch_enis: int = 0) -> InstanceLimits | None:
    """One DescribeInstanceTypes entry -> InstanceLimits (as scripts/gen_instance_limits.py reads it).

    None when the entry lacks network or vCPU figures. Branch ENIs are not in DescribeInstanceTypes (they come
    from the VPC resource controller's table), so the caller passes them.
    """
    name = info.get("InstanceType")
    enis = _max_enis(info)
    ipv4 = info.get("NetworkInfo", {}).get("Ipv4AddressesPerInterface")
    vcpus = info.get("VCpuInfo", {}).get("DefaultVCpus")
    if not name or not enis or not ipv4 or not vcpus or enis <= 0 or ipv4 <= 0 or vcpus <= 0:
        return None
    # Prefix delegation needs a Nitro instance; bare metal counts as Nitro (the VPC CNI's own test).
    prefix_delegation = info.get("Hypervisor") == "nitro" or bool(info.get("BareMetal", False))
    return InstanceLimits(name, enis, ipv4, prefix_delegation, vcpus, branch_enis)


def bundled_branch_enis(instance_type: str) -> int:
    row = INSTANCE_TYPES.get(instance_type)
    return row[4] if row is not None else 0


class InstanceTypeProvider:
    """Limits per instance type, each fetched once per TTL (types change rarely)."""

    def __init__(self, ec2: Ec2, ttl: float) -> None:
        self.ec2 = ec2
        self._cache: TTLCache[str, InstanceLimits | None] = TTLCache(4096, ttl, ec2.clock)

    def missing(self, names: Iterable[str]) -> list[str]:
        """The types not fetched within the TTL."""
        return sorted(n for n in set(names) if n not in self._cache)

    def fetch_instance_types(self, names: Iterable[str]) -> dict[str, InstanceLimits | None]:
        """Limits per type; None for a type EC2 does not know (by filter, so one bad name fails nothing)."""
        names = sorted(set(names))
        found: dict[str, InstanceLimits | None] = dict.fromkeys(names)
        paginator = self.ec2.client.get_paginator("describe_instance_types")
        for chunk in chunks(names, 100):
            pages = paginator.paginate(
                Filters=[{"Name": "instance-type", "Values": chunk}],
                PaginationConfig={"PageSize": self.ec2.size(5, 100)},
            )
            for page in pages:
                for info in page.get("InstanceTypes", []):
                    name = info.get("InstanceType", "")
                    if name in found:
                        found[name] = instance_limits_from_ec2(info, bundled_branch_enis(name))
        return found

    async def limits(self, names: Iterable[str]) -> dict[str, InstanceLimits | None]:
        """Fetch the given types and cache them. Raises CallFailed."""
        wanted = sorted(set(names))
        fresh = await self.ec2.call(Call.INSTANCE_TYPES, lambda: self.fetch_instance_types(wanted))
        self._cache.update(fresh)
        return fresh
