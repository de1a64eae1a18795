"""The cluster VPC's security groups (with rule counts), its subnets, and the EC2 quotas, into `VpcFacts`.

SecurityGroupPolicy and ENIConfig checks need to know that a group or subnet does NOT exist, so this lists the
whole VPC (DescribeSecurityGroups and DescribeSubnets filtered by vpc-id), not only what the nodes use; rule
counts come from `SecurityGroupProvider.fetch_security_groups` (DescribeSecurityGroupRules, prefix lists sized). The
quotas come from the Service Quotas API when the role allows `servicequotas:GetServiceQuota`; when it does
not, the settings or EC2's defaults apply (said once in the log, and by `ipguard report`).

Runs beside the EC2 poller (its own task: a slow listing never holds back the ENI and subnet figures), every
`period` seconds; never on the request path. A failed listing keeps the last good one, whose age then tells the
checks to fail open. Quotas the role may not read leave the settings' or EC2's defaults in force; a failed read
keeps the last quotas read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from webhook.model.vpc import (
    GROUPS_PER_ENI_QUOTA_CODE,
    RULES_PER_GROUP_QUOTA_CODE,
    GroupRules,
    Quotas,
    VpcFacts,
    VpcSubnet,
)
from webhook.sources.ec2.client import DENIED_CODES
from webhook.sources.ec2.poller import Ec2Poller
from webhook.sources.ec2.security_groups import SecurityGroupInfo

log = logging.getLogger(__name__)

# Service Quotas is optional: a private cluster often has no endpoint for it. Short timeouts and one retry, so an
# unreachable endpoint costs seconds, not botocore's default minutes (60 s timeouts, three attempts).
QUOTAS_CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=3, read_timeout=10,
                              user_agent_extra="ipguard")


def group_rules(info: SecurityGroupInfo) -> GroupRules:
    return GroupRules(info.group_id, info.inbound.ipv4, info.inbound.ipv6, info.outbound.ipv4, info.outbound.ipv6,
                      info.name)


class VpcPoller:
    """Keeps `facts` current for the VPC the EC2 poller found (or was given)."""

    def __init__(self, ec2: Ec2Poller, facts: VpcFacts, *, period: float = 300.0, quotas: bool = True,
                 quotas_endpoint_url: str | None = None, clock: Callable[[], float] | None = None) -> None:
        self.ec2 = ec2
        self.facts = facts
        self.period = period
        self.quotas_wanted = quotas
        self.quotas_endpoint_url = quotas_endpoint_url
        self.clock = clock or ec2.clock
        self.next_at = 0.0
        self.errors = 0  # failed listings in a row (for the backoff)
        self.failures = 0  # failed listings since start (for the metrics)
        self.quota_failures = 0  # Service Quotas answers that failed, besides a denial
        self.last_error: str | None = None
        self._quotas_denied_said = False

    # ---- blocking fetches (a worker thread) ------------------------------------------------------------

    def fetch_group_ids(self, vpc_id: str) -> list[str]:
        paginator = self.ec2.client.get_paginator("describe_security_groups")
        ids: list[str] = []
        for page in paginator.paginate(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}],
                                       PaginationConfig={"PageSize": 1000}):
            ids.extend(g["GroupId"] for g in page.get("SecurityGroups", []) if g.get("GroupId"))
        return ids

    def fetch_groups(self, vpc_id: str) -> dict[str, GroupRules]:
        infos = self.ec2.security_group_provider.fetch_security_groups(self.fetch_group_ids(vpc_id))
        return {gid: group_rules(info) for gid, info in infos.items() if info is not None}

    def fetch_subnets(self, vpc_id: str) -> dict[str, VpcSubnet]:
        paginator = self.ec2.client.get_paginator("describe_subnets")
        found: dict[str, VpcSubnet] = {}
        for page in paginator.paginate(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}],
                                       PaginationConfig={"PageSize": 1000}):
            for raw in page.get("Subnets", []):
                subnet_id = raw.get("SubnetId", "")
                found[subnet_id] = VpcSubnet(subnet_id, raw.get("AvailabilityZone", ""),
                                             raw.get("AvailableIpAddressCount", 0), raw.get("CidrBlock", ""))
        return found

    def fetch_quotas(self) -> Quotas | None:
        """Both quotas from Service Quotas; None when the role may not read them (the settings or EC2's defaults
        then apply); the last good ones on any other failure (no endpoint, throttling, a timeout). Never fails
        the listing of groups and subnets."""
        client: Any = boto3.session.Session().client(
            "service-quotas", region_name=self.ec2.region, endpoint_url=self.quotas_endpoint_url,
            config=QUOTAS_CLIENT_CONFIG,
        )
        values = {}
        try:
            for code in (GROUPS_PER_ENI_QUOTA_CODE, RULES_PER_GROUP_QUOTA_CODE):
                answer = client.get_service_quota(ServiceCode="vpc", QuotaCode=code)
                values[code] = int(answer["Quota"]["Value"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in DENIED_CODES:
                if not self._quotas_denied_said:
                    log.info("Service Quotas not readable (%s): security-group quotas from the settings or EC2's "
                             "defaults", exc.response["Error"].get("Code"))
                    self._quotas_denied_said = True
                return None
            self._quotas_failed(exc)
            return self.facts.service_quotas
        except (BotoCoreError, KeyError, TypeError, ValueError) as exc:
            self._quotas_failed(exc)
            return self.facts.service_quotas
        return Quotas(values[GROUPS_PER_ENI_QUOTA_CODE], values[RULES_PER_GROUP_QUOTA_CODE], "Service Quotas")

    def _quotas_failed(self, exc: Exception) -> None:
        self.quota_failures += 1
        if self.quota_failures in (1, 10) or self.quota_failures % 100 == 0:  # every 5 min would flood the log
            log.warning("Service Quotas unreachable or failing (%s: %s): the last quotas read stay in force (the "
                        "settings' or EC2's defaults if none was)", type(exc).__name__, exc,
                        extra={"fields": {"failures": self.quota_failures}})

    # ---- refresh ---------------------------------------------------------------------------------------

    def due(self) -> bool:
        return self.clock() >= self.next_at

    async def refresh(self) -> bool:
        """Fetch groups, subnets and quotas (when due and the VPC is known) and apply them; True on success."""
        vpc_id = self.ec2.vpc_id
        if vpc_id is None or not self.due():
            return False
        try:
            groups = await asyncio.to_thread(self.fetch_groups, vpc_id)
            subnets = await asyncio.to_thread(self.fetch_subnets, vpc_id)
            quotas = await asyncio.to_thread(self.fetch_quotas) if self.quotas_wanted else None
        except (BotoCoreError, ClientError) as exc:
            self.errors += 1
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.next_at = self.clock() + min(self.period, 30.0 * 2 ** min(self.errors, 4))
            log.warning("EC2 VPC listing failed: %s; keeping the last good data", exc)
            return False
        # One synchronous step: a check never sees the groups of one listing with the subnets of another.
        self.facts.vpc_id = vpc_id
        self.facts.set_groups(groups)
        self.facts.set_subnets(subnets)
        self.facts.service_quotas = quotas
        self.errors = 0
        self.next_at = self.clock() + self.period
        return True
