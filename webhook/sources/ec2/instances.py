"""The cluster's VPC and EKS cluster name, read off the nodes' EC2 instances (DescribeInstances: their VpcId
and tags)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from webhook.sources.ec2.client import Call, Ec2

if TYPE_CHECKING:
    from mypy_boto3_ec2.type_defs import TagTypeDef

# Tags EKS, its node groups, Karpenter and eksctl put on a cluster's instances, in order of trust.
CLUSTER_NAME_TAGS = ("eks:cluster-name", "aws:eks:cluster-name", "eks:eks-cluster-name")
CLUSTER_OWNERSHIP_PREFIX = "kubernetes.io/cluster/"  # kubernetes.io/cluster/<name>: owned | shared


def cluster_name_from_tags(tags: Iterable[TagTypeDef]) -> str | None:
    """The EKS cluster an instance belongs to, by the tags its launcher puts on it; None when none says."""
    by_key = {t["Key"]: t.get("Value", "") for t in tags if "Key" in t}
    for key in CLUSTER_NAME_TAGS:
        if by_key.get(key):
            return by_key[key]
    owned = sorted(k.removeprefix(CLUSTER_OWNERSHIP_PREFIX) for k in by_key if k.startswith(CLUSTER_OWNERSHIP_PREFIX))
    return owned[0] if len(owned) == 1 and owned[0] else None  # several: not ours to pick


@dataclass(frozen=True, slots=True)
class ClusterFacts:
    vpc_id: str | None
    cluster_name: str | None


class VpcProvider:
    """The cluster's VPC and EKS cluster name: given, or read off the nodes' instances. While either is unknown,
    instances are asked about once each (a node that joins later may carry the tags the first ones lack)."""

    def __init__(self, ec2: Ec2, vpc_id: str | None = None, cluster_name: str | None = None) -> None:
        self.ec2 = ec2
        self.vpc_id = vpc_id
        self.cluster_name = cluster_name
        self._asked: set[str] = set()

    CHUNK = 20  # instances asked about per call

    @classmethod
    def chunk(cls, instance_ids: Iterable[str]) -> list[str]:
        """The instances one call asks about (a few: the first tagged one is enough)."""
        return sorted(set(instance_ids))[:cls.CHUNK]

    def fetch_cluster_facts(self, instance_ids: Iterable[str]) -> ClusterFacts:
        """The VPC of the first of the instances EC2 still knows, and the cluster name the first tagged one
        carries (blocking: thread pool only)."""
        paginator = self.ec2.client.get_paginator("describe_instances")
        chunk = self.chunk(instance_ids)
        vpc_id: str | None = None
        name: str | None = None
        for page in paginator.paginate(Filters=[{"Name": "instance-id", "Values": chunk}]) if chunk else ():
            for reservation in page.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    vpc_id = vpc_id or instance.get("VpcId")
                    name = name or cluster_name_from_tags(instance.get("Tags", []))
        return ClusterFacts(vpc_id, name)

    async def resolve(self, instance_ids: Iterable[str]) -> bool:
        """Ask EC2 for the VPC and cluster name while either is unknown; True when EC2 was asked. Raises
        CallFailed."""
        ids = self.chunk(frozenset(instance_ids) - self._asked)
        if (self.vpc_id is not None and self.cluster_name is not None) or not ids:
            return False
        facts = await self.ec2.call(Call.VPC, lambda: self.fetch_cluster_facts(ids))
        self._asked.update(ids)  # only those asked: the next call asks the next ones while a fact is missing
        self.vpc_id = self.vpc_id or facts.vpc_id
        self.cluster_name = self.cluster_name or facts.cluster_name
        return True
