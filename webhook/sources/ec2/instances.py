"""Nodes as EC2 instances: instance id, zone and region from a node's providerID, and the cluster's VPC
(DescribeInstances of the nodes' instances)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from webhook.sources.ec2.client import Call, Ec2

_PROVIDER_ID = re.compile(r"^aws://(?:/(?P<zone>[^/]*))?/(?P<rest>.+)$")
_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")
_REGION = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-\d+")


def instance_id_from_provider_id(provider_id: str) -> str | None:
    """`aws:///us-east-1a/i-0123456789abcdef0` -> `i-0123456789abcdef0`; None for anything else (Fargate...)."""
    match = _PROVIDER_ID.match(provider_id.strip())
    if match is None:
        return None
    last = match.group("rest").rsplit("/", 1)[-1]
    return last if _INSTANCE_ID.match(last) else None


def zone_from_provider_id(provider_id: str) -> str | None:
    match = _PROVIDER_ID.match(provider_id.strip())
    return (match.group("zone") or None) if match else None


def region_from_zone(zone: str) -> str | None:
    """`us-east-1a` -> `us-east-1`; local and Wavelength zones (`us-west-2-lax-1a`) -> their parent region."""
    match = _REGION.match(zone)
    return match.group(0) if match else None


def region_from_provider_id(provider_id: str) -> str | None:
    zone = zone_from_provider_id(provider_id)
    return region_from_zone(zone) if zone else None


def node_instances_from_provider_ids(provider_ids: Mapping[str, str]) -> dict[str, str]:
    """Node name -> instance id, for the nodes whose providerID names an EC2 instance."""
    out: dict[str, str] = {}
    for node, provider_id in provider_ids.items():
        instance_id = instance_id_from_provider_id(provider_id)
        if instance_id is not None:
            out[node] = instance_id
    return out


class VpcProvider:
    """The cluster's VPC: given, or that of the nodes' instances (asked once, then kept)."""

    def __init__(self, ec2: Ec2, vpc_id: str | None = None) -> None:
        self.ec2 = ec2
        self.vpc_id = vpc_id

    def fetch_vpc_id(self, instance_ids: Iterable[str]) -> str | None:
        """The VPC of the first of the instances EC2 still knows (blocking: thread pool only)."""
        paginator = self.ec2.client.get_paginator("describe_instances")
        chunk = sorted(set(instance_ids))[:20]
        if not chunk:
            return None
        for page in paginator.paginate(Filters=[{"Name": "instance-id", "Values": chunk}]):
            for reservation in page.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    if vpc := instance.get("VpcId"):
                        return vpc
        return None

    async def resolve(self, instance_ids: Iterable[str]) -> bool:
        """Ask EC2 for the VPC if it is not known yet; True when EC2 was asked. Raises CallFailed."""
        ids = frozenset(instance_ids)
        if self.vpc_id is not None or not ids:
            return False
        self.vpc_id = await self.ec2.call(Call.VPC, lambda: self.fetch_vpc_id(ids))
        return True
