"""Where the EKS control plane's network interfaces come from: the cross-account ENIs EKS places in the
cluster's subnets, described `Amazon EKS <cluster name>` (DescribeNetworkInterfaces in the VPC), with their
private addresses (webhook calls arrive from them) and their subnets' figures (a cluster version update needs
free addresses there for new ones)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cachetools import TTLCache

from webhook.sources.ec2.client import Call, Ec2, vpc_filter
from webhook.sources.ec2.enis import Eni, EniProvider, parse_eni
from webhook.sources.ec2.subnets import SubnetInfo, SubnetProvider

CONTROL_PLANE_DESCRIPTION = "Amazon EKS {cluster}"


@dataclass(frozen=True, slots=True)
class ControlPlane:
    """The control plane's ENIs as last fetched."""

    cluster_name: str
    enis: tuple[Eni, ...] = ()
    subnets: Mapping[str, SubnetInfo] = field(default_factory=dict)  # their subnets' figures

    @property
    def addresses(self) -> frozenset[str]:
        """Every private IPv4 address on the control plane's ENIs: where webhook calls come from."""
        return frozenset(address for eni in self.enis for address in eni.addresses())

    @property
    def subnet_ids(self) -> frozenset[str]:
        return frozenset(eni.subnet_id for eni in self.enis)


class ControlPlaneProvider:
    """The control plane's ENIs and their subnets, fetched once per period (they change on cluster version
    updates, when EKS creates new ones before it deletes the old)."""

    def __init__(self, ec2: Ec2, enis: EniProvider, subnets: SubnetProvider, period: float) -> None:
        self.ec2 = ec2
        self._enis = enis
        self._subnets = subnets
        self._cache: TTLCache[tuple[str | None, str], ControlPlane] = TTLCache(4, period, ec2.clock)
        self.current: ControlPlane | None = None  # last good

    def fetch_control_plane(self, cluster_name: str, vpc_id: str | None) -> ControlPlane:
        """Blocking: thread pool only."""
        description = CONTROL_PLANE_DESCRIPTION.format(cluster=cluster_name)
        raws = self._enis.describe([*vpc_filter(vpc_id), {"Name": "description", "Values": [description]}])
        enis = tuple(sorted((parse_eni(raw) for raw in raws), key=lambda e: e.eni_id))
        subnet_ids = {eni.subnet_id for eni in enis if eni.subnet_id}
        infos = self._subnets.fetch_subnets(subnet_ids) if subnet_ids else []
        return ControlPlane(cluster_name, enis, {info.subnet_id: info for info in infos})

    async def control_plane(self, cluster_name: str, vpc_id: str | None) -> ControlPlane | None:
        """Fresh when the period is up, else None (the cached view is current). Raises CallFailed."""
        key = (vpc_id, cluster_name)
        if key in self._cache:
            return None
        view = await self.ec2.call(Call.CONTROL_PLANE, lambda: self.fetch_control_plane(cluster_name, vpc_id))
        self._cache[key] = self.current = view
        return view
