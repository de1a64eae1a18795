"""What EC2 says about the cluster's VPC that SecurityGroupPolicy and ENIConfig checks read: its security groups
with their rule counts, its subnets, and the quotas in force. Fed by the EC2 source (or a snapshot file);
read by the decisions. No I/O here.

EC2 quotas (DESIGN.md "Security groups for pods"): security groups per network interface (default 5, up to
16; Service Quotas code L-2AFB9258) and inbound or outbound rules per security group (default 60 per
direction, IPv4 and IPv6 counted apart; L-0EA8095F). A rule naming another group counts once per family; a
customer prefix list counts its maximum size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

DEFAULT_GROUPS_PER_ENI = 5
DEFAULT_RULES_PER_GROUP = 60
GROUPS_PER_ENI_QUOTA_CODE = "L-2AFB9258"
RULES_PER_GROUP_QUOTA_CODE = "L-0EA8095F"


@dataclass(frozen=True, slots=True)
class GroupRules:
    """Rule counts of one security group, as the rules-per-group quota counts them."""

    group_id: str
    inbound_ipv4: int = 0
    inbound_ipv6: int = 0
    outbound_ipv4: int = 0
    outbound_ipv6: int = 0
    name: str = ""

    def counts(self) -> dict[str, int]:
        return {"inbound IPv4": self.inbound_ipv4, "inbound IPv6": self.inbound_ipv6,
                "outbound IPv4": self.outbound_ipv4, "outbound IPv6": self.outbound_ipv6}

    @property
    def most(self) -> tuple[str, int]:
        """The direction and family with the most rules (the one nearest the quota)."""
        return max(self.counts().items(), key=lambda item: (item[1], item[0]))


@dataclass(frozen=True, slots=True)
class VpcSubnet:
    subnet_id: str
    zone: str
    free_ips: int
    cidr: str = ""


@dataclass(frozen=True, slots=True)
class Quotas:
    groups_per_eni: int = DEFAULT_GROUPS_PER_ENI
    rules_per_group: int = DEFAULT_RULES_PER_GROUP
    source: str = "defaults"  # "Service Quotas", "settings" or "defaults": said in `report`

    def rules_near_quota(self, count: int) -> bool:
        """Within 10% of the rules-per-group quota (each rule is evaluated for every pod using the group)."""
        return count * 10 >= self.rules_per_group * 9


@dataclass(slots=True)
class VpcFacts:
    """The VPC as EC2 last described it. `groups`/`subnets` are complete for the VPC once `loaded`."""

    groups: dict[str, GroupRules] = field(default_factory=dict)
    subnets: dict[str, VpcSubnet] = field(default_factory=dict)
    vpc_id: str | None = None
    service_quotas: Quotas | None = None  # from the Service Quotas API, when the role may read it
    groups_updated: float | None = None  # clock() of the last complete security-group listing
    subnets_updated: float | None = None
    static: bool = False  # a snapshot file: as current as it will ever be
    clock: Callable[[], float] = time.monotonic

    def set_groups(self, groups: Mapping[str, GroupRules]) -> None:
        self.groups = dict(groups)
        self.groups_updated = self.clock()

    def set_subnets(self, subnets: Mapping[str, VpcSubnet]) -> None:
        self.subnets = dict(subnets)
        self.subnets_updated = self.clock()

    def groups_current(self, bound: float) -> bool:
        """Whether the group list is recent enough to say a group does not exist."""
        return self._current(self.groups_updated, bound)

    def subnets_current(self, bound: float) -> bool:
        return self._current(self.subnets_updated, bound)

    def _current(self, updated: float | None, bound: float) -> bool:
        if updated is None:
            return False
        return self.static or self.clock() - updated <= bound

    def quotas(self, groups_per_eni: int | None, rules_per_group: int | None) -> Quotas:
        """The quotas in force: Service Quotas' figures when read, else the settings, else EC2's defaults."""
        if self.service_quotas is not None:
            return self.service_quotas
        if groups_per_eni is not None or rules_per_group is not None:
            return Quotas(groups_per_eni or DEFAULT_GROUPS_PER_ENI, rules_per_group or DEFAULT_RULES_PER_GROUP,
                          "settings")
        return Quotas()
