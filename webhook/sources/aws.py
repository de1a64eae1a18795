"""The EC2 edge of ipguard: polls subnets, ENIs, instance types and security groups into the capacity index.

Everything here is slow and fallible, so none of it runs on an admission request path: a periodic loop
(`Ec2Poller.run`) fetches through boto3 in a small dedicated thread pool (boto3 blocks; the event loop must
not) and applies the results to the index in one synchronous step. On errors or throttling the index keeps
the last good figures, the error is counted per call kind, and the kind backs off exponentially.

Credentials come from the standard boto3 chain (IRSA / Pod Identity env, instance profile, ...); nothing here
reads or holds them.

What EC2 tells us, per node (instance) and per subnet:
  * DescribeNetworkInterfaces: the IPs each node really holds. The VPC CNI describes the ENIs it creates
    `aws-K8S-<instance-id>`; the node's primary ENI (device index 0) also carries pod IPs except under custom
    networking. A node holds its ENIs' secondary IPv4 addresses (never an ENI's primary IP) plus 16 per /28
    prefix. Branch ENIs (security groups for pods) hang off the node's trunk ENI and are counted apart.
  * DescribeSubnets: free addresses (AvailableIpAddressCount), zone and CIDR.
  * With prefix delegation, DescribeNetworkInterfaces by subnet: every address and prefix in use, from which
    the aligned /28 blocks still entirely free are counted (`free_prefix_blocks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from cachetools import TTLCache

from webhook.model.index import CapacityIndex
from webhook.model.instance_types import INSTANCE_TYPES
from webhook.model.limits import PREFIX_SIZE, InstanceLimits, UnknownInstanceType

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import (
        FilterTypeDef,
        InstanceTypeInfoTypeDef,
        ManagedPrefixListTypeDef,
        NetworkInterfaceTypeDef,
        PaginatorConfigTypeDef,
        SecurityGroupRuleTypeDef,
        SecurityGroupTypeDef,
        SubnetTypeDef,
    )

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]
RetryMode = Literal["standard", "adaptive", "legacy"]

CNI_ENI_PREFIX = "aws-K8S-"  # ipamd's description for the ENIs it creates: aws-K8S-<instance-id>
BRANCH_ENI_DESCRIPTION = "aws-k8s-branch-eni"  # vpc-resource-controller (security groups for pods)
TRUNK_ENI_DESCRIPTION = "aws-k8s-trunk-eni"
TRUNK_ENI_TAG = "vpcresources.k8s.aws/trunk-eni-id"  # on each branch ENI: the trunk it hangs off
# EC2 caps the values of one filter; larger id sets are asked in chunks.
FILTER_VALUES_MAX = 200
# First four addresses (network, VPC router, DNS, future use) and the last one of every subnet.
AWS_RESERVED_HEAD = 4
THROTTLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "SlowDown",
    }
)
DENIED_CODES = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "AuthFailure"})

_PROVIDER_ID = re.compile(r"^aws://(?:/(?P<zone>[^/]*))?/(?P<rest>.+)$")
_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")
_REGION = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-\d+")
_GROUP_ID = re.compile(r"^sg-[0-9a-f]{8,17}$")


class Call(enum.StrEnum):
    """A kind of EC2 call, as errors, backoff and `last_success` are tracked."""

    VPC = "vpc"  # DescribeInstances, to find the cluster's VPC
    ENIS = "enis"  # DescribeNetworkInterfaces of the nodes
    SUBNET_ENIS = "subnet_enis"  # DescribeNetworkInterfaces of the pod subnets (prefix delegation)
    SUBNETS = "subnets"
    INSTANCE_TYPES = "instance_types"
    SECURITY_GROUPS = "security_groups"


# ---- provider IDs -------------------------------------------------------------------------------------


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


# ---- instance types -----------------------------------------------------------------------------------


def _default_card_enis(info: InstanceTypeInfoTypeDef) -> int | None:
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
    enis = _default_card_enis(info)
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


# ---- ENIs ---------------------------------------------------------------------------------------------


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
        return self.instance_id is not None and self.device_index == 0

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
    trunk = next((t.get("Value") for t in raw.get("TagSet", []) if t.get("Key") == TRUNK_ENI_TAG), None)
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
        trunk_eni_id=trunk,
    )


@dataclass(frozen=True, slots=True)
class InstanceEnis:
    """What one instance holds, per DescribeNetworkInterfaces."""

    instance_id: str
    enis: int = 0  # ENIs whose secondary slots carry pod IPs: CNI ENIs and the primary ENI
    secondary_ips: int = 0  # secondary private IPv4 addresses on those ENIs (each ENI's primary excluded)
    prefixes: int = 0  # /28 prefixes on those ENIs
    primary_secondary_ips: int = 0  # the part of the two figures above on the primary ENI
    primary_prefixes: int = 0
    branch_enis: int = 0  # security groups for pods: branch ENIs on this instance's trunk
    trunk: bool = False
    primary_subnet: str | None = None  # the node's own subnet (its primary ENI's)

    def held_ips(self, *, custom_networking: bool = False) -> int:
        """Pod IPs held from the pod subnet: secondary IPs plus 16 per /28 (both, in case a node holds both
        while switching modes). Under custom networking the primary ENI stays in the node's own subnet and
        carries no pod IPs."""
        ips, prefixes = self.secondary_ips, self.prefixes
        if custom_networking:
            ips -= self.primary_secondary_ips
            prefixes -= self.primary_prefixes
        return ips + prefixes * PREFIX_SIZE

    def pod_enis(self, *, custom_networking: bool = False) -> int:
        """ENIs that carry pod IPs (under custom networking the primary ENI carries none)."""
        return max(self.enis - (1 if custom_networking and self.primary_subnet is not None else 0), 0)


@dataclass(slots=True)
class _Tally:
    enis: int = 0
    ips: int = 0
    prefixes: int = 0
    primary_ips: int = 0
    primary_prefixes: int = 0
    branch: int = 0
    trunk: bool = False
    primary_subnet: str | None = None


def summarize_instances(enis: Iterable[Eni], instance_ids: Iterable[str]) -> dict[str, InstanceEnis]:
    """Per wanted instance id: the IPs, prefixes and branch ENIs it holds. Instances with no ENI at all (gone,
    or in another VPC) are left out."""
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
        if eni.is_branch or not (eni.is_cni or eni.is_primary):
            continue  # ENIs attached by something else (EFA, other controllers) carry no CNI pod IPs
        t.enis += 1
        t.ips += len(eni.secondary_ips)
        t.prefixes += len(eni.prefixes)
        if eni.is_primary:
            t.primary_subnet = eni.subnet_id
            t.primary_ips += len(eni.secondary_ips)
            t.primary_prefixes += len(eni.prefixes)
    for eni in enis:
        # Branch ENIs are not attached to the instance: they hang off its trunk ENI.
        if eni.is_branch and eni.trunk_eni_id in trunks:
            tallies[trunks[eni.trunk_eni_id]].branch += 1
    return {
        instance_id: InstanceEnis(
            instance_id,
            enis=t.enis,
            secondary_ips=t.ips,
            prefixes=t.prefixes,
            primary_secondary_ips=t.primary_ips,
            primary_prefixes=t.primary_prefixes,
            branch_enis=t.branch,
            trunk=t.trunk,
            primary_subnet=t.primary_subnet,
        )
        for instance_id, t in tallies.items()
    }


# ---- free /28 blocks ----------------------------------------------------------------------------------

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


def subnet_usage(enis: Iterable[Eni]) -> dict[str, list[str]]:
    """Subnet id -> every address and prefix its ENIs take (input to `free_prefix_blocks`)."""
    out: dict[str, list[str]] = {}
    for eni in enis:
        bucket = out.setdefault(eni.subnet_id, [])
        bucket.extend(eni.addresses())
        bucket.extend(eni.prefixes)
    return out


# ---- subnets ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubnetInfo:
    subnet_id: str
    zone: str
    cidr: str  # "" for an IPv6-only subnet
    free_ips: int  # AvailableIpAddressCount
    vpc_id: str = ""
    free_blocks: int | None = None  # free aligned /28s, when computed (prefix delegation)


def parse_subnet(raw: SubnetTypeDef) -> SubnetInfo:
    return SubnetInfo(
        subnet_id=raw.get("SubnetId", ""),
        zone=raw.get("AvailabilityZone", ""),
        cidr=raw.get("CidrBlock", ""),
        free_ips=raw.get("AvailableIpAddressCount", 0),
        vpc_id=raw.get("VpcId", ""),
    )


# ---- security groups ----------------------------------------------------------------------------------


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


# ---- results and stats --------------------------------------------------------------------------------


@dataclass(slots=True)
class CallStats:
    """Per call kind, for metrics and /readyz."""

    attempts: int = 0
    errors: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    consecutive_errors: int = 0
    last_success: float | None = None  # clock (monotonic) time of the last good answer
    last_error: str | None = None
    next_attempt: float = 0.0  # backing off until then


@dataclass(frozen=True, slots=True)
class RefreshResult:
    fetched: frozenset[Call] = frozenset()  # asked EC2 and applied
    cached: frozenset[Call] = frozenset()  # fresh enough: not asked, not re-applied
    skipped: frozenset[Call] = frozenset()  # backing off after errors: the index keeps the last good data
    failed: Mapping[Call, str] = field(default_factory=dict)  # kind -> reason (throttled, unreachable, ...)
    nodes_updated: int = 0
    subnets_updated: int = 0
    subnets_missing: frozenset[str] = frozenset()  # asked for, but EC2 has no such subnet
    instances: Mapping[str, InstanceEnis] = field(default_factory=dict)  # this refresh's fresh ENI view
    subnets: Mapping[str, SubnetInfo] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def classify_error(exc: BaseException) -> str:
    """A short reason for metrics: throttled, unreachable, timeout, denied, credentials, config, server, client,
    other."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in THROTTLE_CODES:
            return "throttled"
        if code in DENIED_CODES or code.startswith("UnauthorizedOperation"):
            return "denied"
        return "server" if status >= 500 else "client"
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, EndpointConnectionError | ConnectionClosedError):
        return "unreachable"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return "credentials"
    if isinstance(exc, NoRegionError):
        return "config"
    return "other"


def _chunks(values: Iterable[str], size: int = FILTER_VALUES_MAX) -> Iterator[list[str]]:
    ordered = sorted(set(values))
    for i in range(0, len(ordered), size):
        yield ordered[i : i + size]


class _Failed(Exception):
    """A call kind failed (or is backing off); the reason is already counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---- the poller ---------------------------------------------------------------------------------------


class Ec2Poller:
    """Polls EC2 into a CapacityIndex. Never call it from an admission request: it blocks on the network."""

    def __init__(
        self,
        *,
        region: str | None = None,
        vpc_id: str | None = None,
        endpoint_url: str | None = None,
        eni_period: float = 30.0,
        subnet_period: float = 30.0,
        instance_type_ttl: float = 6 * 3600.0,
        security_group_ttl: float = 300.0,
        retry_mode: RetryMode = "standard",
        max_attempts: int = 3,
        connect_timeout: float = 3.0,
        read_timeout: float = 15.0,
        page_size: int = 1000,
        all_vpc_subnets: bool = False,
        backoff_base: float | None = None,
        backoff_max: float = 300.0,
        max_workers: int = 2,
        clock: Clock = time.monotonic,
        session: boto3.session.Session | None = None,
    ) -> None:
        self.region = region
        self.vpc_id = vpc_id
        self.endpoint_url = endpoint_url
        self.eni_period = eni_period
        self.subnet_period = subnet_period
        self.page_size = page_size
        self.all_vpc_subnets = all_vpc_subnets
        # By default the first retry comes at the next regular refresh, then every 2, 4, ... periods.
        self.backoff_base = backoff_base if backoff_base is not None else min(eni_period, subnet_period)
        self.backoff_max = backoff_max
        self.clock = clock
        self._botocore_config = Config(
            retries={"mode": retry_mode, "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            user_agent_extra="ipguard",
        )
        self._session = session
        self._client: EC2Client | None = None
        self._client_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ipguard-ec2")
        self._refresh_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self.stats: dict[Call, CallStats] = {kind: CallStats() for kind in Call}
        self.loop_errors = 0  # unexpected errors caught by run()
        # TTL caches say what is fresh enough not to ask again; the key is what was asked for.
        self._eni_cache: TTLCache[tuple[object, ...], dict[str, InstanceEnis]] = TTLCache(8, eni_period, clock)
        self._eni_asked: set[str] = set()  # instance ids the cached ENI view covers
        self._subnet_cache: TTLCache[tuple[object, ...], dict[str, SubnetInfo]] = TTLCache(8, subnet_period, clock)
        self._type_cache: TTLCache[str, InstanceLimits | None] = TTLCache(4096, instance_type_ttl, clock)
        self._sg_cache: TTLCache[str, SecurityGroupInfo | None] = TTLCache(4096, security_group_ttl, clock)
        # Last good data, kept across errors (a TTL cache would drop it).
        self.instances: dict[str, InstanceEnis] = {}
        self.subnets: dict[str, SubnetInfo] = {}
        self.security_group_info: dict[str, SecurityGroupInfo | None] = {}  # None: EC2 has no such group
        self._free_blocks: dict[str, int] = {}
        self._held_nodes: set[str] = set()  # nodes whose held figure came from here
        self._applied_subnets: set[str] = set()

    # ---- plumbing -------------------------------------------------------------------------------------

    @property
    def client(self) -> EC2Client:
        """The boto3 EC2 client, created on first use (blocking: call it from the thread pool or tests)."""
        with self._client_lock:
            if self._client is None:
                session = self._session or boto3.session.Session()
                self._client = session.client(
                    "ec2", region_name=self.region, endpoint_url=self.endpoint_url, config=self._botocore_config
                )
            return self._client

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _due(self, kind: Call) -> bool:
        return self.clock() >= self.stats[kind].next_attempt

    async def _call(self, kind: Call, fn: Callable[[], T]) -> T:
        """Run one blocking fetch in the pool, counting the outcome; raise _Failed on any error."""
        stats = self.stats[kind]
        if not self._due(kind):
            raise _Failed("backoff")
        stats.attempts += 1
        try:
            result = await self._in_thread(fn)
        except Exception as exc:
            reason = classify_error(exc)
            stats.errors += 1
            stats.errors_by_reason[reason] = stats.errors_by_reason.get(reason, 0) + 1
            stats.consecutive_errors += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            delay = min(self.backoff_max, self.backoff_base * 2 ** (stats.consecutive_errors - 1))
            stats.next_attempt = self.clock() + delay
            if reason == "other" and not isinstance(exc, BotoCoreError):
                log.exception("EC2 %s: unexpected error; retrying in %.0fs", kind, delay)
            else:
                log.warning(
                    "EC2 %s failed (%s, %d in a row): %s; keeping the last good data, retrying in %.0fs",
                    kind, reason, stats.consecutive_errors, exc, delay,
                )  # fmt: skip
            raise _Failed(reason) from exc
        if stats.consecutive_errors:
            log.info("EC2 %s recovered after %d errors", kind, stats.consecutive_errors)
        stats.consecutive_errors = 0
        stats.next_attempt = 0.0
        stats.last_success = self.clock()
        return result

    # ---- blocking fetches (thread pool only) ----------------------------------------------------------

    def _describe_enis(self, filters: Sequence[FilterTypeDef]) -> list[NetworkInterfaceTypeDef]:
        paginator = self.client.get_paginator("describe_network_interfaces")
        out: list[NetworkInterfaceTypeDef] = []
        pages = paginator.paginate(Filters=list(filters), PaginationConfig={"PageSize": self._size(5, 1000)})
        for page in pages:
            out.extend(page.get("NetworkInterfaces", []))
        return out

    def _size(self, low: int, high: int) -> int:
        return max(low, min(high, self.page_size))

    def fetch_instance_enis(self, instance_ids: Iterable[str], *, by_description: bool = True) -> list[Eni]:
        """The nodes' ENIs: CNI and branch ENIs by description (VPC-wide), and every ENI attached to the
        instances. `by_description=False` asks by attachment only (nodes that just joined)."""
        vpc: list[FilterTypeDef] = [{"Name": "vpc-id", "Values": [self.vpc_id]}] if self.vpc_id else []
        seen: dict[str, Eni] = {}
        described: list[FilterTypeDef] = [
            *vpc,
            {"Name": "description", "Values": [f"{CNI_ENI_PREFIX}*", BRANCH_ENI_DESCRIPTION]},
        ]
        for raw in self._describe_enis(described) if by_description else ():
            eni = parse_eni(raw)
            seen[eni.eni_id] = eni
        for chunk in _chunks(instance_ids):
            # The primary (and trunk) ENIs are not described aws-K8S-*; ask for them by attachment.
            for raw in self._describe_enis([*vpc, {"Name": "attachment.instance-id", "Values": chunk}]):
                eni = parse_eni(raw)
                seen[eni.eni_id] = eni
        return list(seen.values())

    def fetch_subnet_enis(self, subnet_ids: Iterable[str]) -> list[Eni]:
        """Every ENI in the subnets, whoever owns it (load balancers, NAT gateways, Lambda, other clusters)."""
        out: list[Eni] = []
        for chunk in _chunks(subnet_ids):
            out.extend(parse_eni(raw) for raw in self._describe_enis([{"Name": "subnet-id", "Values": chunk}]))
        return out

    def fetch_subnets(self, subnet_ids: Iterable[str]) -> list[SubnetInfo]:
        """By subnet-id filter (an unknown id is simply absent, where SubnetIds would fail the whole call), or
        every subnet of the VPC with `all_vpc_subnets`."""
        paginator = self.client.get_paginator("describe_subnets")
        config: PaginatorConfigTypeDef = {"PageSize": self._size(5, 1000)}
        batches: list[list[FilterTypeDef]]
        if self.all_vpc_subnets and self.vpc_id:
            batches = [[{"Name": "vpc-id", "Values": [self.vpc_id]}]]
        else:
            batches = [[{"Name": "subnet-id", "Values": chunk}] for chunk in _chunks(subnet_ids)]
        out: list[SubnetInfo] = []
        for filters in batches:
            for page in paginator.paginate(Filters=filters, PaginationConfig=config):
                out.extend(parse_subnet(raw) for raw in page.get("Subnets", []))
        return out

    def fetch_instance_types(self, names: Iterable[str]) -> dict[str, InstanceLimits | None]:
        """Limits per type; None for a type EC2 does not know (by filter, so one bad name fails nothing)."""
        names = sorted(set(names))
        found: dict[str, InstanceLimits | None] = dict.fromkeys(names)
        paginator = self.client.get_paginator("describe_instance_types")
        for chunk in _chunks(names, 100):
            pages = paginator.paginate(
                Filters=[{"Name": "instance-type", "Values": chunk}],
                PaginationConfig={"PageSize": self._size(5, 100)},
            )
            for page in pages:
                for info in page.get("InstanceTypes", []):
                    name = info.get("InstanceType", "")
                    if name in found:
                        found[name] = instance_limits_from_ec2(info, bundled_branch_enis(name))
        return found

    def fetch_vpc_id(self, instance_ids: Iterable[str]) -> str | None:
        """The VPC of the first of the instances EC2 still knows."""
        paginator = self.client.get_paginator("describe_instances")
        chunk = sorted(set(instance_ids))[:20]
        if not chunk:
            return None
        for page in paginator.paginate(Filters=[{"Name": "instance-id", "Values": chunk}]):
            for reservation in page.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    if vpc := instance.get("VpcId"):
                        return vpc
        return None

    def fetch_security_groups(self, group_ids: Iterable[str]) -> dict[str, SecurityGroupInfo | None]:
        """Rule counts per group; None for a group EC2 does not have (or an id that is not a group id)."""
        ids = sorted(set(group_ids))
        out: dict[str, SecurityGroupInfo | None] = dict.fromkeys(ids)
        valid = [g for g in ids if _GROUP_ID.match(g)]  # a malformed id in a filter fails the whole call
        groups: dict[str, SecurityGroupTypeDef] = {}
        rules: dict[str, list[SecurityGroupRuleTypeDef]] = {}
        sg_pages = self.client.get_paginator("describe_security_groups")
        rule_pages = self.client.get_paginator("describe_security_group_rules")
        config: PaginatorConfigTypeDef = {"PageSize": self._size(5, 1000)}
        for chunk in _chunks(valid):
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
        paginator = self.client.get_paginator("describe_managed_prefix_lists")
        try:
            for chunk in _chunks(ids):
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

    # ---- refresh --------------------------------------------------------------------------------------

    def _resolve_region(self, index: CapacityIndex) -> None:
        if self.region is not None or self._client is not None:
            return
        # A node's zone is its providerID's zone; boto3's own chain (AWS_REGION) is the fallback.
        for node in index.nodes.values():
            region = region_from_zone(node.zone) if node.zone else None
            if region:
                self.region = region
                log.info("EC2 region %s (from node %s's zone)", region, node.name)
                return

    async def refresh(
        self,
        index: CapacityIndex,
        node_instances: Mapping[str, str],
        extra_subnets: AbstractSet[str] = frozenset(),
    ) -> RefreshResult:
        """Fetch what is due and apply it to the index. Never raises for EC2 errors: they are counted, and the
        index keeps the last good figures. `node_instances`: node name -> instance id (from providerIDs);
        `extra_subnets`: ENIConfig subnets and others to watch besides the nodes' pod subnets."""
        async with self._refresh_lock:
            return await self._refresh(index, node_instances, extra_subnets)

    async def _refresh(
        self, index: CapacityIndex, node_instances: Mapping[str, str], extra_subnets: AbstractSet[str]
    ) -> RefreshResult:
        self._resolve_region(index)
        fetched: set[Call] = set()
        cached: set[Call] = set()
        failed: dict[Call, str] = {}

        def failure(kind: Call, exc: _Failed) -> None:
            failed[kind] = exc.reason

        instance_ids = frozenset(node_instances.values())
        subnet_ids = frozenset(
            {n.pod_subnet for n in index.nodes.values() if n.known and n.pod_subnet} | set(extra_subnets)
        )
        prefix_mode = index.cni.prefix_delegation

        # VPC first: the ENI and subnet filters use it.
        if self.vpc_id is None and instance_ids:
            try:
                self.vpc_id = await self._call(Call.VPC, lambda: self.fetch_vpc_id(instance_ids))
                fetched.add(Call.VPC)
                if self.vpc_id:
                    log.info("EC2 VPC %s (from the nodes' instances)", self.vpc_id)
            except _Failed as exc:
                failure(Call.VPC, exc)

        # Instance types: only those not fetched within their (long) TTL.
        types = {n.instance_type for n in index.nodes.values() if n.known and n.instance_type}
        changed_limits: dict[str, InstanceLimits] = {}
        missing_types = sorted(t for t in types if t not in self._type_cache)
        if missing_types:
            try:
                new_limits = await self._call(Call.INSTANCE_TYPES, lambda: self.fetch_instance_types(missing_types))
                fetched.add(Call.INSTANCE_TYPES)
                self._type_cache.update(new_limits)
                changed_limits = self._changed_limits(index, new_limits)
            except _Failed as exc:
                failure(Call.INSTANCE_TYPES, exc)
        elif types:
            cached.add(Call.INSTANCE_TYPES)

        # ENIs before subnets: an IP assigned between the two calls is then debited twice (safe) rather than
        # credited twice. Subnets are only fetched right after fresh ENIs, so each subnet baseline in the index
        # pairs with held figures at least as new as it.
        vpc_key = self.vpc_id
        subnet_key = (vpc_key, subnet_ids, self.all_vpc_subnets, prefix_mode)
        # New limits make the index recompute every node and re-baseline every subnet on its last figure:
        # give it fresh figures in the same step.
        subnets_due = bool(subnet_ids) and (subnet_key not in self._subnet_cache or bool(changed_limits))
        # One full ENI refresh per period whatever the node churn: EC2's request quota is the account's, shared
        # with the CNI's own ipamd. Nodes that joined since are fetched on their own, by attachment only.
        eni_key = (vpc_key,)
        instances: dict[str, InstanceEnis] | None = None
        cached_instances = self._eni_cache.get(eni_key)
        new_ids = instance_ids - self._eni_asked
        if instance_ids and (subnets_due or cached_instances is None):
            try:
                enis = await self._call(Call.ENIS, lambda: self.fetch_instance_enis(instance_ids))
                instances = summarize_instances(enis, instance_ids)
                self._eni_cache[eni_key] = instances
                self._eni_asked = set(instance_ids)
                fetched.add(Call.ENIS)
            except _Failed as exc:
                failure(Call.ENIS, exc)
        elif new_ids and cached_instances is not None:
            try:
                enis = await self._call(Call.ENIS, lambda: self.fetch_instance_enis(new_ids, by_description=False))
                instances = {**cached_instances, **summarize_instances(enis, new_ids)}
                self._eni_cache[eni_key] = instances
                self._eni_asked |= new_ids
                fetched.add(Call.ENIS)
            except _Failed as exc:
                failure(Call.ENIS, exc)
        elif instance_ids:
            cached.add(Call.ENIS)

        subnet_used: dict[str, list[str]] | None = None
        subnets: list[SubnetInfo] | None = None
        # Without fresh ENIs a subnet figure would pair with stale held figures (growth debited twice): wait.
        if subnets_due and Call.ENIS not in failed:
            if prefix_mode:
                try:
                    subnet_enis = await self._call(Call.SUBNET_ENIS, lambda: self.fetch_subnet_enis(subnet_ids))
                    subnet_used = subnet_usage(subnet_enis)
                    fetched.add(Call.SUBNET_ENIS)
                except _Failed as exc:
                    failure(Call.SUBNET_ENIS, exc)
            try:
                subnets = await self._call(Call.SUBNETS, lambda: self.fetch_subnets(subnet_ids))
                fetched.add(Call.SUBNETS)
            except _Failed as exc:
                failure(Call.SUBNETS, exc)
        elif subnet_ids:
            cached.add(Call.SUBNETS)

        # Apply everything in one synchronous step: the request path never sees half a refresh.
        self._apply_limits(index, changed_limits)
        nodes_updated = 0
        if instances is not None:
            self.instances = instances
            nodes_updated = self._apply_held(index, node_instances, instances)
        subnets_updated = 0
        missing: frozenset[str] = frozenset()
        infos: dict[str, SubnetInfo] = {}
        if subnets is not None:
            infos, missing = self._apply_subnets(index, subnet_ids, subnets, prefix_mode, subnet_used)
            self._subnet_cache[subnet_key] = infos
            subnets_updated = len(infos)

        skipped = frozenset(k for k, reason in failed.items() if reason == "backoff")
        return RefreshResult(
            fetched=frozenset(fetched),
            cached=frozenset(cached),
            skipped=skipped,
            failed={k: r for k, r in failed.items() if k not in skipped},
            nodes_updated=nodes_updated,
            subnets_updated=subnets_updated,
            subnets_missing=missing,
            instances=instances or {},
            subnets=infos,
        )

    @staticmethod
    def _changed_limits(
        index: CapacityIndex, new_limits: Mapping[str, InstanceLimits | None]
    ) -> dict[str, InstanceLimits]:
        """Fetched limits that differ from what the index uses (types EC2 does not know keep the bundled row)."""
        changed: dict[str, InstanceLimits] = {}
        for name, limits in new_limits.items():
            if limits is None:
                continue
            try:
                current: InstanceLimits | None = index.limits.get(name)
            except UnknownInstanceType:
                current = None
            if current != limits:
                changed[name] = limits
        return changed

    @staticmethod
    def _apply_limits(index: CapacityIndex, changed: Mapping[str, InstanceLimits]) -> None:
        if not changed:
            return
        for name, limits in changed.items():
            index.limits.update(limits)
            index.unknown_types.discard(name)
        # Nodes cache their limits: re-setting the CNI settings is the index's "recompute every node".
        index.set_cni(index.cni)

    def _apply_held(
        self, index: CapacityIndex, node_instances: Mapping[str, str], instances: Mapping[str, InstanceEnis]
    ) -> int:
        custom = index.cni.custom_networking
        updated = 0
        held_now: set[str] = set()
        for node_name, instance_id in node_instances.items():
            node = index.nodes.get(node_name)
            if node is None:
                continue
            usage = instances.get(instance_id)
            # No ENI at all: the instance is gone (or elsewhere); let the index predict.
            held = usage.held_ips(custom_networking=custom) if usage is not None else None
            if held is not None:
                held_now.add(node_name)
            enis = usage.pod_enis(custom_networking=custom) if usage is not None else None
            if node.ec2_held != held or node.ec2_enis != enis:
                index.set_node_held(node_name, held, enis=enis)
                updated += 1
        for node_name in self._held_nodes - held_now:
            node = index.nodes.get(node_name)
            if node is not None and node_name not in node_instances and node.ec2_held is not None:
                index.set_node_held(node_name, None)  # no longer mapped to an instance: stale EC2 figure
                updated += 1
        self._held_nodes = held_now
        return updated

    def _apply_subnets(
        self,
        index: CapacityIndex,
        wanted: frozenset[str],
        subnets: Sequence[SubnetInfo],
        prefix_mode: bool,
        used: Mapping[str, list[str]] | None,
    ) -> tuple[dict[str, SubnetInfo], frozenset[str]]:
        infos: dict[str, SubnetInfo] = {}
        for info in subnets:
            blocks: int | None = None
            if prefix_mode and info.cidr:
                if used is not None and info.subnet_id in wanted:
                    blocks = free_prefix_blocks(info.cidr, used.get(info.subnet_id, ()))
                    self._free_blocks[info.subnet_id] = blocks
                else:
                    blocks = self._free_blocks.get(info.subnet_id)  # the last good count, if any
            info = SubnetInfo(info.subnet_id, info.zone, info.cidr, info.free_ips, info.vpc_id, blocks)
            infos[info.subnet_id] = info
            index.upsert_subnet(
                info.subnet_id, zone=info.zone, cidr=info.cidr, free_ips=info.free_ips, free_blocks=blocks
            )
        missing = frozenset(wanted - set(infos))
        for subnet_id in missing & self._applied_subnets:
            log.warning("EC2 has no subnet %s any more: dropping it from the index", subnet_id)
            index.remove_subnet(subnet_id)
            self._applied_subnets.discard(subnet_id)
            self._free_blocks.pop(subnet_id, None)
        self._applied_subnets |= set(infos)
        self.subnets.update(infos)
        for subnet_id in missing:
            self.subnets.pop(subnet_id, None)
        return infos, missing

    # ---- security groups ------------------------------------------------------------------------------

    async def security_groups(self, group_ids: Iterable[str]) -> dict[str, SecurityGroupInfo | None]:
        """Rule counts by group id (None: EC2 has no such group). Fresh within the TTL, else fetched; on errors
        the last good answers, and ids never fetched are left out."""
        ids = set(group_ids)
        due = sorted(g for g in ids if g not in self._sg_cache)
        if due:
            try:
                fresh = await self._call(Call.SECURITY_GROUPS, lambda: self.fetch_security_groups(due))
                self._sg_cache.update(fresh)
                self.security_group_info.update(fresh)
            except _Failed:
                pass  # counted; answer from the last good data
        return {g: self.security_group_info[g] for g in ids if g in self.security_group_info}

    # ---- the loop -------------------------------------------------------------------------------------

    def _next_wait(self) -> float:
        wait = min(self.eni_period, self.subnet_period)
        now = self.clock()
        for stats in self.stats.values():
            if stats.consecutive_errors and stats.next_attempt > now:
                wait = min(wait, stats.next_attempt - now)  # retry as soon as a backoff ends
        return max(wait, 0.05)

    async def run(
        self,
        index: CapacityIndex,
        node_instances: Callable[[], Mapping[str, str]],
        extra_subnets: Callable[[], AbstractSet[str]] | None = None,
        *,
        security_group_ids: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        """Refresh every period until `stop()`. Never raises (but for cancellation): errors are logged and
        counted. The callables give the current targets at each round."""
        while not self._stop.is_set():
            try:
                await self.refresh(index, node_instances(), extra_subnets() if extra_subnets else frozenset())
                if security_group_ids is not None:
                    await self.security_groups(security_group_ids())
            except asyncio.CancelledError:
                raise
            except Exception:
                self.loop_errors += 1
                log.exception("EC2 refresh round failed; the index keeps its last good data")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self._next_wait())

    def stop(self) -> None:
        """Make `run()` return after its current round (also when called before `run()` starts)."""
        self._stop.set()

    def close(self) -> None:
        """Stop and release the thread pool (a running boto3 call finishes in the background)."""
        self.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _prefix_list_size(pl: ManagedPrefixListTypeDef) -> PrefixListSize | None:
    entries = pl.get("MaxEntries")
    if not entries:
        return None
    return PrefixListSize(pl.get("AddressFamily", "IPv4"), entries)
