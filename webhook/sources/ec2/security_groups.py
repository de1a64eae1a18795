"""Where security-group rule counts come from: DescribeSecurityGroups / DescribeSecurityGroupRules, with
customer prefix lists weighted by their size (DescribeManagedPrefixLists), as the rules-per-group quota
counts them."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError
from cachetools import TTLCache

from webhook.sources.ec2.client import Call, CallFailed, Ec2, chunks

if TYPE_CHECKING:
    from mypy_boto3_ec2.type_defs import (
        FilterTypeDef,
        ManagedPrefixListTypeDef,
        PaginatorConfigTypeDef,
        SecurityGroupRuleTypeDef,
        SecurityGroupTypeDef,
    )

log = logging.getLogger(__name__)

_GROUP_ID = re.compile(r"^sg-[0-9a-f]{8,17}$")


@dataclass(frozen=True, slots=True)
class RuleCounts:
    """One direction of one security group's rules, as the rules-per-group quota counts them."""

    cidr_ipv4: int = 0
    cidr_ipv6: int = 0
    group_refs: int = 0
    prefix_list_ipv4: int = 0  # weighted by each list's MaxEntries (1 when unknown)
    prefix_list_ipv6: int = 0

    @property
    def ipv4(self) -> int:
        # A rule naming another group is family-agnostic: count it against both quotas.
        return self.cidr_ipv4 + self.prefix_list_ipv4 + self.group_refs

    @property
    def ipv6(self) -> int:
        return self.cidr_ipv6 + self.prefix_list_ipv6 + self.group_refs


@dataclass(frozen=True, slots=True)
class SecurityGroupInfo:
    group_id: str
    name: str
    vpc_id: str
    inbound: RuleCounts
    outbound: RuleCounts
    prefix_lists_sized: bool = True  # False when some referenced prefix list's size was unknown (counted 1)


@dataclass(frozen=True, slots=True)
class PrefixListSize:
    family: str  # "IPv4" or "IPv6"
    max_entries: int


def count_rules(
    rules: Iterable[SecurityGroupRuleTypeDef], prefix_lists: Mapping[str, PrefixListSize]
) -> tuple[RuleCounts, RuleCounts, bool]:
    """DescribeSecurityGroupRules entries of one group -> (inbound, outbound, every prefix list sized)."""
    tallies = {False: [0, 0, 0, 0, 0], True: [0, 0, 0, 0, 0]}  # keyed by IsEgress
    sized = True
    for rule in rules:
        t = tallies[bool(rule.get("IsEgress", False))]
        if rule.get("CidrIpv4"):
            t[0] += 1
        elif rule.get("CidrIpv6"):
            t[1] += 1
        elif rule.get("ReferencedGroupInfo"):
            t[2] += 1
        elif pl := rule.get("PrefixListId"):
            size = prefix_lists.get(pl)
            if size is None:
                sized = False
                t[3] += 1
                t[4] += 1
            elif size.family == "IPv6":
                t[4] += size.max_entries
            else:
                t[3] += size.max_entries
    inbound, outbound = (RuleCounts(*tallies[egress]) for egress in (False, True))
    return inbound, outbound, sized


def _prefix_list_size(pl: ManagedPrefixListTypeDef) -> PrefixListSize | None:
    entries = pl.get("MaxEntries")
    if not entries:
        return None
    return PrefixListSize(pl.get("AddressFamily", "IPv4"), entries)


class SecurityGroupProvider:
    """Rule counts per group, fresh within a TTL; on errors the last good answers."""

    def __init__(self, ec2: Ec2, ttl: float) -> None:
        self.ec2 = ec2
        self._cache: TTLCache[str, SecurityGroupInfo | None] = TTLCache(4096, ttl, ec2.clock)
        self.info: dict[str, SecurityGroupInfo | None] = {}  # last good; None: EC2 has no such group

    async def security_groups(self, group_ids: Iterable[str]) -> dict[str, SecurityGroupInfo | None]:
        """Rule counts by group id (None: EC2 has no such group). Fresh within the TTL, else fetched; on errors
        the last good answers, and ids never fetched are left out."""
        ids = set(group_ids)
        due = sorted(g for g in ids if g not in self._cache)
        if due:
            try:
                fresh = await self.ec2.call(Call.SECURITY_GROUPS, lambda: self.fetch_security_groups(due))
                self._cache.update(fresh)
                self.info.update(fresh)
            except CallFailed:
                pass  # counted; answer from the last good data
        return {g: self.info[g] for g in ids if g in self.info}

    def fetch_security_groups(self, group_ids: Iterable[str]) -> dict[str, SecurityGroupInfo | None]:
        """Rule counts per group; None for a group EC2 does not have (or an id that is not a group id)."""
        ids = sorted(set(group_ids))
        out: dict[str, SecurityGroupInfo | None] = dict.fromkeys(ids)
        valid = [g for g in ids if _GROUP_ID.match(g)]  # a malformed id in a filter fails the whole call
        groups: dict[str, SecurityGroupTypeDef] = {}
        rules: dict[str, list[SecurityGroupRuleTypeDef]] = {}
        client = self.ec2.client
        sg_pages = client.get_paginator("describe_security_groups")
        rule_pages = client.get_paginator("describe_security_group_rules")
        config: PaginatorConfigTypeDef = {"PageSize": self.ec2.size(5, 1000)}
        for chunk in chunks(valid):
            for page in sg_pages.paginate(Filters=[{"Name": "group-id", "Values": chunk}], PaginationConfig=config):
                for group in page.get("SecurityGroups", []):
                    groups[group.get("GroupId", "")] = group
            existing = [g for g in chunk if g in groups]
            if not existing:
                continue
            filters: list[FilterTypeDef] = [{"Name": "group-id", "Values": existing}]
            for rule_page in rule_pages.paginate(Filters=filters, PaginationConfig=config):
                for rule in rule_page.get("SecurityGroupRules", []):
                    rules.setdefault(rule.get("GroupId", ""), []).append(rule)
        referenced = {r["PrefixListId"] for rs in rules.values() for r in rs if r.get("PrefixListId")}
        sizes = self._prefix_list_sizes(referenced)
        for group_id, group in groups.items():
            inbound, outbound, sized = count_rules(rules.get(group_id, []), sizes)
            out[group_id] = SecurityGroupInfo(
                group_id, group.get("GroupName", ""), group.get("VpcId", ""), inbound, outbound, sized
            )
        return out

    def _prefix_list_sizes(self, ids: Iterable[str]) -> dict[str, PrefixListSize]:
        sizes: dict[str, PrefixListSize] = {}
        paginator = self.ec2.client.get_paginator("describe_managed_prefix_lists")
        try:
            for chunk in chunks(ids):
                pages = paginator.paginate(
                    Filters=[{"Name": "prefix-list-id", "Values": chunk}], PaginationConfig={"PageSize": 100}
                )
                for page in pages:
                    for pl in page.get("PrefixLists", []):
                        size = _prefix_list_size(pl)
                        if size is not None:
                            sizes[pl.get("PrefixListId", "")] = size
        except (BotoCoreError, ClientError) as exc:
            # Best effort (another IAM permission): unsized lists count 1 and the info says so.
            log.warning("EC2 DescribeManagedPrefixLists failed: %s; counting each prefix list as 1 rule", exc)
        return sizes
