"""Nodes as EC2 instances: the instance id, zone and region a node's providerID names
(`aws:///us-east-1a/i-0123456789abcdef0`). Pure parsing, shared by the watches and the EC2 poller."""

from __future__ import annotations

import re
from collections.abc import Mapping

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
