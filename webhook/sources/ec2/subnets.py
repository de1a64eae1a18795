"""Where subnet figures come from: DescribeSubnets (free addresses, zone, CIDR, tags) and, under prefix
delegation, the aligned /28 blocks still entirely free, counted from every address and prefix in use in the
subnet and its explicit CIDR reservations (GetSubnetCidrReservations).

Besides the subnets asked for by id, the subnets of the cluster's VPC tagged `kubernetes.io/role/cni` are
fetched in the same round: with enhanced subnet discovery (VPC CNI 1.18+, on by default) ipamd creates
secondary ENIs in them for nodes of the same zone (`DescribeSubnets` filtered by tag-key in the VPC).
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from cachetools import TTLCache

from webhook.model.index import CNI_SUBNET_TAG as CNI_SUBNET_TAG  # the tag, defined once; sources read it here
from webhook.model.limits import PREFIX_SIZE
from webhook.sources.ec2.client import Call, CallFailed, Ec2, chunks, vpc_filter

if TYPE_CHECKING:
    from mypy_boto3_ec2.type_defs import FilterTypeDef, PaginatorConfigTypeDef, SubnetTypeDef

EXPLICIT_RESERVATION = "explicit"  # EC2 hands these addresses out only when asked for them by address
# First four addresses (network, VPC router, DNS, future use) and the last one of every subnet.
AWS_RESERVED_HEAD = 4

Used = str | ipaddress.IPv4Address | ipaddress.IPv4Network


def free_prefix_blocks(cidr: str | ipaddress.IPv4Network, used: Iterable[Used]) -> int:
    """Aligned /28 blocks of `cidr` that are entirely free: what prefix delegation can still get.

    `used` holds the addresses (every ENI's primary and secondary IPs) and prefixes (`10.0.1.16/28`, or any
    network) taken in the subnet. AWS reserves the first four addresses and the last one of every subnet, so
    the first and last blocks are never free; a subnet smaller than a /28 has no block at all. Items outside
    the subnet (and IPv6 ones) are ignored. A subnet with one used address in every block has 0 free blocks
    however many free addresses it has left (EC2 then fails with InsufficientCidrBlocks).
    """
    net = cidr if isinstance(cidr, ipaddress.IPv4Network) else ipaddress.IPv4Network(cidr, strict=False)
    if net.prefixlen > 28:
        return 0
    base = int(net.network_address)
    size = net.num_addresses
    blocks = size // PREFIX_SIZE
    blocked: set[int] = set()

    def mark(first: int, last: int) -> None:
        first, last = max(first, base), min(last, base + size - 1)
        if first <= last:
            blocked.update(range((first - base) // PREFIX_SIZE, (last - base) // PREFIX_SIZE + 1))

    mark(base, base + AWS_RESERVED_HEAD - 1)
    mark(base + size - 1, base + size - 1)
    for item in used:
        if isinstance(item, str):
            try:
                parsed: ipaddress.IPv4Address | ipaddress.IPv4Network = (
                    ipaddress.IPv4Network(item, strict=False) if "/" in item else ipaddress.IPv4Address(item)
                )
            except ValueError:
                continue  # IPv6 or junk: not an IPv4 address of this subnet
        else:
            parsed = item
        if isinstance(parsed, ipaddress.IPv4Network):
            mark(int(parsed.network_address), int(parsed.broadcast_address))
        else:
            mark(int(parsed), int(parsed))
    return blocks - len(blocked)


@dataclass(frozen=True, slots=True)
class SubnetInfo:
    subnet_id: str
    zone: str
    cidr: str  # "" for an IPv6-only subnet
    free_ips: int  # AvailableIpAddressCount
    vpc_id: str = ""
    free_blocks: int | None = None  # free aligned /28s, when computed (prefix delegation)
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def cni_discoverable(self) -> bool:
        """Tagged for enhanced subnet discovery as ipamd reads the tag (`isSubnetValidForENICreation`, as the
        index's `Subnet.discoverable`): a value other than `0`; an empty value counts as no tag. (ipamd also
        skips subnets tagged for other clusters only, when aws-node has CLUSTER_NAME set; that is not known
        here, so such subnets are kept.)"""
        return self.tags.get(CNI_SUBNET_TAG, "") not in ("", "0")

    @property
    def cni_excluded(self) -> bool:
        """Tagged `kubernetes.io/role/cni=0`: with subnet discovery on, ipamd creates no ENI here and its ENIs
        here carry no pod IPs (`IsSubnetExcluded`; its other case, tags for other clusters only, needs aws-node's
        CLUSTER_NAME, which is not known here: such subnets are not taken as excluded)."""
        return self.tags.get(CNI_SUBNET_TAG) == "0"


def parse_subnet(raw: SubnetTypeDef) -> SubnetInfo:
    return SubnetInfo(
        subnet_id=raw.get("SubnetId", ""),
        zone=raw.get("AvailabilityZone", ""),
        cidr=raw.get("CidrBlock", ""),
        free_ips=raw.get("AvailableIpAddressCount", 0),
        vpc_id=raw.get("VpcId", ""),
        tags={t["Key"]: t.get("Value", "") for t in raw.get("Tags", []) if "Key" in t},
    )


class SubnetProvider:
    """Subnet figures, cached for one period per question asked (which subnets, in which VPC, in which mode).
    Free /28 counts keep their last good value when the subnet's ENIs could not be read, for `blocks_max_age`
    seconds (then unknown: the free addresses alone count, as if unfragmented, which never denies), and
    reservations theirs when they could not be read (a missing permission, for one)."""

    blocks_max_age = 120.0  # as the default staleness bound: an older count could deny on what is gone

    def __init__(
        self, ec2: Ec2, period: float, *, all_vpc_subnets: bool = False, reservation_ttl: float = 300.0
    ) -> None:
        self.ec2 = ec2
        self.all_vpc_subnets = all_vpc_subnets
        self._cache: TTLCache[tuple[object, ...], dict[str, SubnetInfo]] = TTLCache(8, period, ec2.clock)
        self._free_blocks: dict[str, tuple[int, float]] = {}  # subnet id -> (free /28s, when counted)
        self._reserved: dict[str, tuple[str, ...]] = {}  # subnet id -> explicitly reserved CIDRs, last good
        # Reservations change rarely and the call takes one subnet at a time: asked once per TTL per subnet.
        self._reservations_fresh: TTLCache[str, tuple[str, ...]] = TTLCache(4096, reservation_ttl, ec2.clock)

    def key(self, vpc_id: str | None, subnet_ids: frozenset[str], prefix_mode: bool) -> tuple[object, ...]:
        return (vpc_id, subnet_ids, self.all_vpc_subnets, prefix_mode)

    def fresh(self, key: tuple[object, ...]) -> bool:
        return key in self._cache

    def remember(self, key: tuple[object, ...], infos: dict[str, SubnetInfo]) -> None:
        self._cache[key] = infos

    def fetch_subnets(
        self, subnet_ids: Iterable[str], vpc_id: str | None = None, *, discover: bool = False
    ) -> list[SubnetInfo]:
        """By subnet-id filter (an unknown id is simply absent, where SubnetIds would fail the whole call), or
        every subnet of the VPC with `all_vpc_subnets`; with `discover` (and a known VPC) also the VPC's
        subnets tagged for enhanced subnet discovery, whatever the tag's value (blocking: thread pool only)."""
        paginator = self.ec2.client.get_paginator("describe_subnets")
        config: PaginatorConfigTypeDef = {"PageSize": self.ec2.size(5, 1000)}
        batches: list[list[FilterTypeDef]]
        if self.all_vpc_subnets and vpc_id:
            batches = [vpc_filter(vpc_id)]
        else:
            batches = [[{"Name": "subnet-id", "Values": chunk}] for chunk in chunks(subnet_ids)]
            if discover and vpc_id:
                batches.append([*vpc_filter(vpc_id), {"Name": "tag-key", "Values": [CNI_SUBNET_TAG]}])
        out: dict[str, SubnetInfo] = {}
        for filters in batches:
            for page in paginator.paginate(Filters=filters, PaginationConfig=config):
                for raw in page.get("Subnets", []):
                    info = parse_subnet(raw)
                    out[info.subnet_id] = info
        return list(out.values())

    async def subnets(
        self, subnet_ids: frozenset[str], vpc_id: str | None, *, discover: bool = False
    ) -> list[SubnetInfo]:
        """Raises CallFailed."""
        return await self.ec2.call(Call.SUBNETS, lambda: self.fetch_subnets(subnet_ids, vpc_id, discover=discover))

    def fetch_reservations(self, subnet_ids: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """Subnet id -> its explicit IPv4 CIDR reservations (blocking: thread pool only). `prefix` reservations
        are left in: EC2 assigns /28 prefixes from them, which is what the free blocks are counted for."""
        out: dict[str, tuple[str, ...]] = {}
        for subnet_id in sorted(set(subnet_ids)):  # the operation takes one subnet per call
            reserved: list[str] = []
            token: str | None = None
            while True:
                answer = (
                    self.ec2.client.get_subnet_cidr_reservations(SubnetId=subnet_id, NextToken=token)
                    if token
                    else self.ec2.client.get_subnet_cidr_reservations(SubnetId=subnet_id)
                )
                reserved.extend(
                    r["Cidr"]
                    for r in answer.get("SubnetIpv4CidrReservations", [])
                    if r.get("Cidr") and r.get("ReservationType") == EXPLICIT_RESERVATION
                )
                token = answer.get("NextToken")
                if not token:
                    break
            out[subnet_id] = tuple(reserved)
        return out

    async def reservations(self, subnet_ids: frozenset[str]) -> Mapping[str, tuple[str, ...]]:
        """Explicit reservations per subnet, fresh or (on errors, counted under their own call kind) the last
        good ones. Never raises: free /28 counts stand without them."""
        due = frozenset(s for s in subnet_ids if s not in self._reservations_fresh)
        if due:
            with contextlib.suppress(CallFailed):
                fresh = await self.ec2.call(Call.CIDR_RESERVATIONS, lambda: self.fetch_reservations(due))
                self._reservations_fresh.update(fresh)
                self._reserved.update(fresh)
        return self._reserved

    def with_free_blocks(
        self,
        subnets: Sequence[SubnetInfo],
        wanted: frozenset[str],
        prefix_mode: bool,
        used: Mapping[str, list[str]] | None,
        reserved: Mapping[str, tuple[str, ...]] | None = None,
    ) -> list[SubnetInfo]:
        """The subnets with their free /28 counts under prefix delegation: from `used` (every address and
        prefix in use per subnet) and `reserved` (explicit CIDR reservations: EC2 never picks a prefix there)
        when the usage was read, else the last good count."""
        out: list[SubnetInfo] = []
        for info in subnets:
            blocks: int | None = None
            if prefix_mode and info.cidr:
                if used is not None and info.subnet_id in wanted:
                    taken = [*used.get(info.subnet_id, ()), *(reserved or {}).get(info.subnet_id, ())]
                    blocks = free_prefix_blocks(info.cidr, taken)
                    self._free_blocks[info.subnet_id] = (blocks, self.ec2.clock())
                else:
                    last = self._free_blocks.get(info.subnet_id)
                    if last is not None and self.ec2.clock() - last[1] <= self.blocks_max_age:
                        blocks = last[0]
            out.append(replace(info, free_blocks=blocks))
        return out

    def forget(self, subnet_id: str) -> None:
        self._free_blocks.pop(subnet_id, None)
        self._reserved.pop(subnet_id, None)
