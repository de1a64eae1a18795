"""Where the IPs each node really holds come from: DescribeNetworkInterfaces, per node (instance) and per subnet.

The VPC CNI describes the ENIs it creates `aws-K8S-<instance-id>`; the node's primary ENI (device index 0) also
carries pod IPs except under custom networking. A node holds its ENIs' secondary IPv4 addresses (never an ENI's
primary IP) plus 16 per /28 prefix. Branch ENIs (security groups for pods) hang off the node's trunk ENI and are
counted apart.

Some attached ENIs take one of the node's ENI slots without ever carrying a pod IP (ipamd's `hasRoomForEni`
subtracts them from maxENI): ENIs tagged `node.k8s.amazonaws.com/no_manage=true` and EFA-only ENIs
(`filterUnmanagedENIs`), and, with subnet discovery on, ENIs in a subnet tagged `kubernetes.io/role/cni=0`
(`excludedENIBasedOnSubnetTags`, the node's primary ENI included). Only the default network card counts: without
multi-NIC ipamd manages no other.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from cachetools import TTLCache

from webhook.model.ipamd import HeldAddresses
from webhook.model.limits import PREFIX_SIZE
from webhook.sources.ec2.client import Call, Ec2, chunks, vpc_filter

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import FilterTypeDef, NetworkInterfaceTypeDef

CNI_ENI_PREFIX = "aws-K8S-"  # ipamd's description for the ENIs it creates: aws-K8S-<instance-id>
BRANCH_ENI_DESCRIPTION = "aws-k8s-branch-eni"  # vpc-resource-controller (security groups for pods)
TRUNK_ENI_DESCRIPTION = "aws-k8s-trunk-eni"
TRUNK_ENI_TAG = "vpcresources.k8s.aws/trunk-eni-id"  # on each branch ENI: the trunk it hangs off
NO_MANAGE_TAG = "node.k8s.amazonaws.com/no_manage"  # ipamd leaves an ENI tagged with the value "true" alone
EFA_ONLY = "efa-only"  # an InterfaceType with no IP address at all


@dataclass(frozen=True, slots=True)
class Eni:
    """The parts of one DescribeNetworkInterfaces entry ipguard uses."""

    eni_id: str
    subnet_id: str
    description: str
    interface_type: str
    instance_id: str | None  # attached to
    device_index: int | None
    primary_ip: str | None
    secondary_ips: tuple[str, ...]
    prefixes: tuple[str, ...]  # Ipv4Prefixes, e.g. 10.0.1.16/28
    trunk_eni_id: str | None = None  # branch ENIs: the trunk they hang off
    no_manage: bool = False  # tagged node.k8s.amazonaws.com/no_manage=true (exactly "true", as ipamd reads it)
    network_card: int = 0

    @property
    def is_branch(self) -> bool:
        return self.interface_type == "branch" or self.description == BRANCH_ENI_DESCRIPTION

    @property
    def is_trunk(self) -> bool:
        return self.interface_type == "trunk" or self.description == TRUNK_ENI_DESCRIPTION

    @property
    def is_cni(self) -> bool:
        return self.description.startswith(CNI_ENI_PREFIX)

    @property
    def is_primary(self) -> bool:
        return self.instance_id is not None and self.device_index == 0 and self.network_card == 0

    @property
    def is_unmanaged(self) -> bool:
        """ipamd never gives it pod IPs but it takes an ENI slot (`setUnmanagedENIs`: the primary ENI is always
        managed; `filterUnmanagedENIs` also leaves EFA-only ENIs out)."""
        return not self.is_primary and (self.no_manage or self.interface_type == EFA_ONLY)

    def addresses(self) -> Iterator[str]:
        if self.primary_ip:
            yield self.primary_ip
        yield from self.secondary_ips


def parse_eni(raw: NetworkInterfaceTypeDef) -> Eni:
    primary: str | None = raw.get("PrivateIpAddress")
    secondary: list[str] = []
    for entry in raw.get("PrivateIpAddresses", []):
        address = entry.get("PrivateIpAddress")
        if not address:
            continue
        if entry.get("Primary", False):
            primary = address
        else:
            secondary.append(address)
    attachment = raw.get("Attachment", {})
    tags = {t.get("Key"): t.get("Value") for t in raw.get("TagSet", [])}
    return Eni(
        eni_id=raw.get("NetworkInterfaceId", ""),
        subnet_id=raw.get("SubnetId", ""),
        description=raw.get("Description", ""),
        interface_type=raw.get("InterfaceType", "interface"),
        instance_id=attachment.get("InstanceId"),
        device_index=attachment.get("DeviceIndex"),
        primary_ip=primary,
        secondary_ips=tuple(secondary),
        prefixes=tuple(p["Ipv4Prefix"] for p in raw.get("Ipv4Prefixes", []) if p.get("Ipv4Prefix")),
        trunk_eni_id=tags.get(TRUNK_ENI_TAG),
        no_manage=tags.get(NO_MANAGE_TAG) == "true",
        network_card=attachment.get("NetworkCardIndex", 0),
    )


class EniHold(NamedTuple):
    """One ENI ipamd manages on a node: its subnet and the pod IPs it holds. (Named tuples: a worker process
    ships these per node, and tuples unpickle about ten times faster than slotted dataclasses.)"""

    subnet_id: str
    secondary_ips: int  # secondary private IPv4 addresses (the ENI's primary excluded)
    prefixes: int  # /28 prefixes
    primary: bool  # the node's primary ENI

    def excluded_by(self, excluded: AbstractSet[str]) -> bool:
        """In a subnet ipamd excludes, and holding no pod IP: an excluded ENI's free addresses go back to EC2
        (`checkAndHandleAllENIExclusion`, `deallocateEmptyCIDR`), so what one still holds are running pods'
        IPs, which ipamd's own counts leave out. Such an ENI is taken as a pod ENI until it is empty: its pods
        keep their addresses, and ipguard errs toward admitting rather than count them twice."""
        return self.subnet_id in excluded and not (self.secondary_ips or self.prefixes)


class InstanceEnis(NamedTuple):
    """What one instance holds, per DescribeNetworkInterfaces (a named tuple, as `EniHold`)."""

    instance_id: str
    holds: tuple[EniHold, ...] = ()  # the CNI ENIs and the primary ENI
    unmanaged_enis: int = 0  # ENI slots taken by no_manage and EFA-only ENIs
    branch_enis: int = 0  # security groups for pods: branch ENIs on this instance's trunk
    trunk: bool = False
    primary_subnet: str | None = None  # the node's own subnet (its primary ENI's)

    @property
    def enis(self) -> int:
        return len(self.holds)

    @property
    def secondary_ips(self) -> int:
        return sum(h.secondary_ips for h in self.holds)

    @property
    def prefixes(self) -> int:
        return sum(h.prefixes for h in self.holds)

    def _pod_holds(self, custom_networking: bool, excluded: AbstractSet[str]) -> Iterator[EniHold]:
        """The ENIs whose IPs are pod IPs: under custom networking not the primary ENI (it stays in the node's own
        subnet), and not those in subnets ipamd excludes (`IsExcludedForPodIPs`: left out of its IP counts)."""
        for hold in self.holds:
            if not (custom_networking and hold.primary) and not hold.excluded_by(excluded):
                yield hold

    def held_ips(self, *, custom_networking: bool = False, excluded: AbstractSet[str] = frozenset()) -> int:
        """Pod IPs held from the pod subnets: secondary IPs plus 16 per /28 (both, in case a node holds both
        while switching modes), on the ENIs that carry pod IPs. `excluded`: subnets ipamd excludes."""
        return sum(h.secondary_ips + h.prefixes * PREFIX_SIZE for h in self._pod_holds(custom_networking, excluded))

    def pod_enis(self, *, custom_networking: bool = False, excluded: AbstractSet[str] = frozenset()) -> int:
        """ENIs that carry pod IPs (under custom networking the primary ENI carries none)."""
        return sum(1 for _ in self._pod_holds(custom_networking, excluded))

    def held_by_subnet(self, *, custom_networking: bool = False,
                       excluded: AbstractSet[str] = frozenset()) -> dict[str, HeldAddresses]:
        """What the node holds in each subnet its pod ENIs are in: an ENI stays in the subnet it was created in
        (an ENIConfig change or subnet discovery leaves attached ENIs where they are). Only the ENIs that carry
        pod IPs (`held_ips`)."""
        sums: dict[str, list[int]] = {}
        for hold in self._pod_holds(custom_networking, excluded):
            here = sums.setdefault(hold.subnet_id, [0, 0, 0])
            here[0] += hold.secondary_ips
            here[1] += hold.prefixes
            here[2] += 1
        return {sid: HeldAddresses(ips + prefixes * PREFIX_SIZE, prefixes, enis)
                for sid, (ips, prefixes, enis) in sorted(sums.items())}

    def own_subnet_excluded_elsewhere(self, excluded: AbstractSet[str]) -> str | None:
        """With the node's own subnet excluded, the subnet of its pod ENIs elsewhere (the one holding most, when
        several): where ipamd finds free slots before it attaches another ENI. None when it has none yet."""
        holds = [h for h in self.holds if h.subnet_id not in excluded]
        if not holds:
            return None
        return max(holds, key=lambda h: (h.secondary_ips + h.prefixes, h.subnet_id)).subnet_id

    def lost_enis(self, *, custom_networking: bool = False, excluded: AbstractSet[str] = frozenset()) -> int:
        """ENI slots taken by attached ENIs that never carry pod IPs: unmanaged ones, and those in excluded
        subnets (`hasRoomForEni` takes both off maxENI). Under custom networking the primary ENI's slot is
        already outside the pod ENIs the type allows, excluded or not."""
        in_excluded = sum(1 for h in self.holds if h.excluded_by(excluded) and not (custom_networking and h.primary))
        return self.unmanaged_enis + in_excluded


@dataclass(slots=True)
class _Tally:
    holds: list[EniHold] = field(default_factory=list)
    unmanaged: int = 0
    branch: int = 0
    trunk: bool = False
    primary_subnet: str | None = None


def summarize_instances(enis: Iterable[Eni], instance_ids: Iterable[str]) -> dict[str, InstanceEnis]:
    """Per wanted instance id: the IPs, prefixes and branch ENIs it holds, and the ENI slots taken by ENIs that
    carry no pod IPs. Instances with no ENI at all (gone, or in another VPC) are left out."""
    wanted = set(instance_ids)
    enis = list(enis)
    tallies: dict[str, _Tally] = {}
    trunks: dict[str, str] = {}  # trunk ENI id -> instance id
    for eni in enis:
        if eni.instance_id is None or eni.instance_id not in wanted:
            continue  # unattached (being set up, or leaked by a deleted node): no node holds it
        t = tallies.setdefault(eni.instance_id, _Tally())
        if eni.is_trunk:
            trunks[eni.eni_id] = eni.instance_id
            t.trunk = True
            continue
        if eni.network_card != 0:
            continue  # ipamd manages the default network card only (ENABLE_MULTI_NIC off)
        if eni.is_unmanaged:
            t.unmanaged += 1
            continue
        if eni.is_branch or not (eni.is_cni or eni.is_primary):
            continue  # ENIs attached by something else (other controllers) carry no CNI pod IPs
        t.holds.append(EniHold(eni.subnet_id, len(eni.secondary_ips), len(eni.prefixes), eni.is_primary))
        if eni.is_primary:
            t.primary_subnet = eni.subnet_id
    for eni in enis:
        # Branch ENIs are not attached to the instance: they hang off its trunk ENI.
        if eni.is_branch and eni.trunk_eni_id in trunks:
            tallies[trunks[eni.trunk_eni_id]].branch += 1
    return {
        instance_id: InstanceEnis(
            instance_id,
            holds=tuple(t.holds),
            unmanaged_enis=t.unmanaged,
            branch_enis=t.branch,
            trunk=t.trunk,
            primary_subnet=t.primary_subnet,
        )
        for instance_id, t in tallies.items()
    }


def subnet_usage(enis: Iterable[Eni]) -> dict[str, list[str]]:
    """Subnet id -> every address and prefix its ENIs take (input to `free_prefix_blocks`)."""
    out: dict[str, list[str]] = {}
    for eni in enis:
        bucket = out.setdefault(eni.subnet_id, [])
        bucket.extend(eni.addresses())
        bucket.extend(eni.prefixes)
    return out


def describe(client: EC2Client, filters: Sequence[FilterTypeDef], page_size: int) -> list[NetworkInterfaceTypeDef]:
    """Every page of one DescribeNetworkInterfaces (blocking)."""
    paginator = client.get_paginator("describe_network_interfaces")
    out: list[NetworkInterfaceTypeDef] = []
    for page in paginator.paginate(Filters=list(filters), PaginationConfig={"PageSize": page_size}):
        out.extend(page.get("NetworkInterfaces", []))
    return out


def fetch_instance_enis(
    client: EC2Client, instance_ids: Iterable[str], vpc_id: str | None, page_size: int
) -> list[Eni]:
    """The nodes' ENIs (blocking): every ENI attached to the instances (primary, CNI, trunk and any other), then
    the branch ENIs hanging off the trunks among them, by their trunk tag. Only this cluster's ENIs, each
    asked for once: a VPC-wide query by description would also bring the other clusters' CNI ENIs in a shared
    VPC, and this cluster's again; unattached CNI ENIs (being set up, or leaked) are no node's anyway."""
    vpc = vpc_filter(vpc_id)
    seen: dict[str, Eni] = {}
    for chunk in chunks(instance_ids):
        for raw in describe(client, [*vpc, {"Name": "attachment.instance-id", "Values": chunk}], page_size):
            eni = parse_eni(raw)
            seen[eni.eni_id] = eni
    trunks = [eni.eni_id for eni in seen.values() if eni.is_trunk]
    for chunk in chunks(trunks):
        for raw in describe(client, [*vpc, {"Name": f"tag:{TRUNK_ENI_TAG}", "Values": chunk}], page_size):
            eni = parse_eni(raw)
            seen[eni.eni_id] = eni
    return list(seen.values())


def instance_summaries(
    client: EC2Client, instance_ids: frozenset[str], vpc_id: str | None, page_size: int
) -> dict[str, InstanceEnis]:
    """What each instance holds (blocking): fetched, parsed and summed where it runs, so that a worker process
    ships back a few figures per node instead of every ENI."""
    return summarize_instances(fetch_instance_enis(client, instance_ids, vpc_id, page_size), instance_ids)


class EniChanges(NamedTuple):
    """One answer about the nodes' ENIs, as the fetcher ships it: only the instances whose figures differ from
    what it shipped before (`base`), or every one asked when the asker holds nothing the fetcher knows of."""

    token: str  # names the view this answer leads to, for the next question's `base`
    changed: dict[str, InstanceEnis]  # instance id -> its figures: new, or not as last shipped
    gone: frozenset[str]  # asked, and no ENI attached any more (the instance is gone, or elsewhere)
    complete: bool  # every instance asked is in `changed` (no base in common)

    def merged(self, view: Mapping[str, InstanceEnis], asked: AbstractSet[str], whole: bool) -> dict[str, InstanceEnis]:
        """The view after this answer: `view` (the one `base` names) with the changes, and, for a `whole` question
        (every node), without the instances no longer asked about. The asker and the fetcher both call it, so
        they hold the same view."""
        kept = {iid: f for iid, f in view.items() if iid not in self.gone and (not whole or iid in asked)}
        kept.update(self.changed)
        return kept


class ShippedFigures:
    """What a fetcher shipped last, per instance, and the token naming that view: in the worker process,
    the one memory its poller's questions go to (in the thread pool, one per process: a second poller there
    gets whole answers, as after a restart). A question whose `base` is not the last token (the asker dropped
    an answer, or this memory is new: a restart of either side) gets every figure."""

    def __init__(self) -> None:
        self.token: str | None = None
        self.figures: dict[str, InstanceEnis] = {}
        self._lock = threading.Lock()  # the thread pool may run two questions at once

    def answer(self, fresh: Mapping[str, InstanceEnis], asked: AbstractSet[str], whole: bool,
               base: str | None) -> EniChanges:
        with self._lock:
            complete = base is None or base != self.token
            known = {} if complete else self.figures
            changed = {iid: f for iid, f in fresh.items() if known.get(iid) != f}
            answer = EniChanges(uuid.uuid4().hex, changed, frozenset(asked - fresh.keys()), complete)
            self.figures = answer.merged(known, asked, whole)
            self.token = answer.token
            return answer


_shipped = ShippedFigures()  # in the process that fetches (the worker process, or this one's thread pool)


def instance_changes(
    client: EC2Client, instance_ids: frozenset[str], vpc_id: str | None, page_size: int, base: str | None,
    whole: bool,
) -> EniChanges:
    """What each instance holds (blocking), as `instance_summaries`, but only the instances whose figures changed
    since the answer `base` names: most nodes' figures stay put from one period to the next, and each one
    shipped is one more to unpickle and compare on the event loop."""
    fresh = instance_summaries(client, instance_ids, vpc_id, page_size)
    return _shipped.answer(fresh, instance_ids, whole, base)


def fetch_subnet_enis(client: EC2Client, subnet_ids: Iterable[str], page_size: int) -> list[Eni]:
    """Every ENI in the subnets, whoever owns it (load balancers, NAT gateways, Lambda, other clusters)."""
    out: list[Eni] = []
    for chunk in chunks(subnet_ids):
        out.extend(parse_eni(raw) for raw in describe(client, [{"Name": "subnet-id", "Values": chunk}], page_size))
    return out


def subnet_usage_of(client: EC2Client, subnet_ids: frozenset[str], page_size: int) -> dict[str, list[str]]:
    """Subnet id -> every address and prefix in use there (blocking)."""
    return subnet_usage(fetch_subnet_enis(client, subnet_ids, page_size))


class EniProvider:
    """The nodes' ENIs, cached for one period: one full refresh per period whatever the node churn (EC2's
    request quota is the account's, shared with the CNI's own ipamd); nodes that joined since are fetched on
    their own. Fetching and parsing run where `Ec2.fetch` puts them (a worker process, or the thread pool), and
    only the instances whose figures changed come back (`instance_changes`): the view here keeps the same
    figure objects for the others."""

    def __init__(self, ec2: Ec2, period: float) -> None:
        self.ec2 = ec2
        self._fresh: TTLCache[tuple[object, ...], bool] = TTLCache(8, period, ec2.clock)  # fetched this period
        self._asked: frozenset[str] = frozenset()  # instance ids the view covers
        self._view: dict[str, InstanceEnis] = {}
        self._view_key: tuple[object, ...] | None = None
        self._token: str | None = None  # the fetcher's name for `_view`
        self.last_shipped = 0  # instance figures the last answer carried

    @property
    def page_size(self) -> int:
        return self.ec2.size(5, 1000)

    def describe(self, filters: Sequence[FilterTypeDef]) -> list[NetworkInterfaceTypeDef]:
        """Every page of one DescribeNetworkInterfaces (blocking: thread pool only)."""
        return describe(self.ec2.client, filters, self.page_size)

    def fetch_instance_enis(self, instance_ids: Iterable[str], vpc_id: str | None = None) -> list[Eni]:
        """The nodes' ENIs (blocking: thread pool only); see `fetch_instance_enis`."""
        return fetch_instance_enis(self.ec2.client, instance_ids, vpc_id, self.page_size)

    async def instances(
        self, instance_ids: frozenset[str], vpc_id: str | None, *, full: bool = False
    ) -> dict[str, InstanceEnis] | None:
        """What each instance holds: fetched when the period is up (or `full`), only the new instances when
        some joined since, else None (the cached view is current). Raises CallFailed."""
        key = (vpc_id,)
        if key != self._view_key:
            self._view, self._view_key, self._token, self._asked = {}, key, None, frozenset()
        new_ids = instance_ids - self._asked
        whole = full or key not in self._fresh
        if not whole and not new_ids:
            return None
        asked = instance_ids if whole else new_ids
        # An answer lost on the way (an error, a cancelled refresh) leaves this token behind the fetcher's, and
        # the next answer is whole.
        answer = await self.ec2.fetch(Call.ENIS, instance_changes, asked, vpc_id, self.page_size, self._token,
                                      whole)
        self._view = answer.merged(self._view, asked, whole)
        self._token = answer.token
        self.last_shipped = len(answer.changed)
        self._asked = instance_ids if whole else self._asked | new_ids
        self._fresh[key] = True
        return self._view

    async def subnet_usage(self, subnet_ids: frozenset[str]) -> dict[str, list[str]]:
        """Subnet id -> every address and prefix in use there. Raises CallFailed."""
        return await self.ec2.fetch(Call.SUBNET_ENIS, subnet_usage_of, subnet_ids, self.page_size)
