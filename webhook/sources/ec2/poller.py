"""The EC2 poller: asks each provider for what is due, in the order the figures need, and applies the
answers to the capacity index: the nodes' figures in slices between requests, then the subnets' in one step.

Order matters: the VPC first (the ENI and subnet filters use it), then instance types, then the subnets (and
their ENIs under prefix delegation), then the nodes' ENIs: an address ipamd assigns between the two reads is
counted twice until the next refresh rather than gone from both. Subnet figures are applied only beside fresh
held figures, so each subnet baseline in the index pairs with held figures at least as new as it. On errors or
throttling the index keeps the last good figures.
Never called from an admission request: it blocks on the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, TypeVar, cast

import boto3

from webhook.model.index import CapacityIndex
from webhook.model.ipamd import HeldAddresses
from webhook.model.limits import InstanceLimits, UnknownInstanceType
from webhook.sources.ec2.client import Call, CallFailed, CallStats, Clock, Ec2, RetryMode
from webhook.sources.ec2.control_plane import ControlPlane, ControlPlaneProvider
from webhook.sources.ec2.enis import EniProvider, InstanceEnis
from webhook.sources.ec2.instance_types import InstanceTypeProvider
from webhook.sources.ec2.instances import VpcProvider
from webhook.sources.ec2.security_groups import SecurityGroupInfo, SecurityGroupProvider
from webhook.sources.ec2.subnets import SubnetInfo, SubnetProvider
from webhook.sources.provider_ids import region_from_zone

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long applying a refresh may hold the event loop at a time: a slice of node updates (about 25 us each at
# 5,000 nodes), then the requests waiting meanwhile.
APPLY_SLICE_SECONDS = 0.001


class NodeHeld(NamedTuple):
    """What a node's ENIs give the index (`CapacityIndex.set_node_held`'s arguments)."""

    ips: int | None
    enis: int | None
    by_subnet: dict[str, HeldAddresses] | None
    placed: tuple[tuple[str, HeldAddresses], ...] | None  # `by_subnet` as the index keeps it
    lost: int


NO_HELD = NodeHeld(None, None, None, None, 0)  # no ENI figure: the index predicts


class Slices:
    """Cuts a long synchronous job into slices of `seconds` (None: one slice): `over()` once the current slice
    has had its time, `start()` when the job resumes."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start()

    def start(self) -> None:
        self.until = math.inf if self.seconds is None else time.perf_counter() + self.seconds

    def over(self) -> bool:
        return time.perf_counter() >= self.until


def run_through(steps: Generator[None, None, T]) -> T:
    """A sliced job, in one synchronous step."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(T, done.value)


async def run_sliced(steps: Generator[None, None, T]) -> T:
    """A sliced job, letting the event loop run what is waiting between two slices."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(T, done.value)
        await asyncio.sleep(0)


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
    control_plane: ControlPlane | None = None  # fetched by this refresh (best effort: never in `failed`)

    @property
    def ok(self) -> bool:
        return not self.failed


class Ec2Poller:
    """Polls EC2 into a CapacityIndex through one provider per resource, sharing one `Ec2` connection."""

    def __init__(
        self,
        *,
        region: str | None = None,
        vpc_id: str | None = None,
        cluster_name: str | None = None,
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
        fetch_in_process: bool = False,
    ) -> None:
        self.eni_period = eni_period
        self.subnet_period = subnet_period
        self.ec2 = Ec2(
            region=region,
            endpoint_url=endpoint_url,
            retry_mode=retry_mode,
            max_attempts=max_attempts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            page_size=page_size,
            # By default the first retry comes at the next regular refresh, then every 2, 4, ... periods.
            backoff_base=backoff_base if backoff_base is not None else min(eni_period, subnet_period),
            backoff_max=backoff_max,
            max_workers=max_workers,
            clock=clock,
            session=session,
            fetch_in_process=fetch_in_process,
        )
        self.vpc = VpcProvider(self.ec2, vpc_id, cluster_name)
        self.instance_types = InstanceTypeProvider(self.ec2, instance_type_ttl)
        self.enis = EniProvider(self.ec2, eni_period)
        self.subnet_provider = SubnetProvider(self.ec2, subnet_period, all_vpc_subnets=all_vpc_subnets)
        self.security_group_provider = SecurityGroupProvider(self.ec2, security_group_ttl)
        self.control_plane_provider = ControlPlaneProvider(self.ec2, self.enis, self.subnet_provider, eni_period)
        self.clock = clock
        self._refresh_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self.loop_errors = 0  # unexpected errors caught by run()
        # Last good data, kept across errors (a TTL cache would drop it).
        self.instances: dict[str, InstanceEnis] = {}
        self.subnets: dict[str, SubnetInfo] = {}
        self._held_nodes: set[str] = set()  # nodes whose held figure came from here
        self._applied_subnets: set[str] = set()
        self._discovered: set[str] = set()  # subnets in the index by their discovery tag alone
        self._launch_targets: set[str] = set()  # subnets in the index as an autoscaler's launch targets
        self.excluded_subnets: frozenset[str] = frozenset()  # tagged kubernetes.io/role/cni=0, as last fetched
        self.apply_slice: float | None = APPLY_SLICE_SECONDS  # None: in one step
        # Per instance: the figures last worked out for it, with the ENI figures they came from.
        self._figures: dict[str, tuple[InstanceEnis, NodeHeld]] = {}
        self._figures_key: tuple[bool, frozenset[str]] | None = None  # (custom networking, excluded subnets)

    # ---- the shared connection, as callers and tests see it -------------------------------------------

    @property
    def client(self) -> EC2Client:
        return self.ec2.client

    @property
    def stats(self) -> dict[Call, CallStats]:
        return self.ec2.stats

    @property
    def region(self) -> str | None:
        return self.ec2.region

    @property
    def vpc_id(self) -> str | None:
        return self.vpc.vpc_id

    @property
    def cluster_name(self) -> str | None:
        """The EKS cluster's name: given, or read off the nodes' instances' tags."""
        return self.vpc.cluster_name

    @property
    def control_plane(self) -> ControlPlane | None:
        """The control plane's ENIs, addresses and subnets as last fetched (None until the cluster name is
        known and they were fetched once)."""
        return self.control_plane_provider.current

    @property
    def backoff_base(self) -> float:
        return self.ec2.backoff_base

    @backoff_base.setter
    def backoff_base(self, seconds: float) -> None:
        self.ec2.backoff_base = seconds

    @property
    def backoff_max(self) -> float:
        return self.ec2.backoff_max

    @backoff_max.setter
    def backoff_max(self, seconds: float) -> None:
        self.ec2.backoff_max = seconds

    @property
    def security_group_info(self) -> dict[str, SecurityGroupInfo | None]:
        return self.security_group_provider.info

    async def security_groups(self, group_ids: Iterable[str]) -> dict[str, SecurityGroupInfo | None]:
        """Rule counts by group id: see `SecurityGroupProvider.security_groups`."""
        return await self.security_group_provider.security_groups(group_ids)

    # ---- refresh --------------------------------------------------------------------------------------

    def _resolve_region(self, index: CapacityIndex) -> None:
        if self.ec2.region is not None or self.ec2.connected:
            return
        # A node's zone is its providerID's zone; boto3's own chain (AWS_REGION) is the fallback.
        for node in index.nodes.values():
            region = region_from_zone(node.zone) if node.zone else None
            if region:
                self.ec2.region = region
                log.info("EC2 region %s (from node %s's zone)", region, node.name)
                return

    async def refresh(
        self,
        index: CapacityIndex,
        node_instances: Mapping[str, str],
        extra_subnets: AbstractSet[str] = frozenset(),
        launch_subnets: AbstractSet[str] = frozenset(),
    ) -> RefreshResult:
        """Fetch what is due and apply it to the index. Never raises for EC2 errors: they are counted, and the
        index keeps the last good figures. `node_instances`: node name -> instance id (from providerIDs);
        `extra_subnets`: ENIConfig subnets and others to watch besides the nodes' pod subnets;
        `launch_subnets`: subnets an autoscaler can launch new nodes into (Karpenter's EC2NodeClasses)."""
        async with self._refresh_lock:
            return await self._refresh(index, node_instances, extra_subnets, frozenset(launch_subnets))

    async def _refresh(
        self,
        index: CapacityIndex,
        node_instances: Mapping[str, str],
        extra_subnets: AbstractSet[str],
        launch_subnets: frozenset[str],
    ) -> RefreshResult:
        self._resolve_region(index)
        fetched: set[Call] = set()
        cached: set[Call] = set()
        failed: dict[Call, str] = {}

        instance_ids = frozenset(node_instances.values())
        named = {n.pod_subnet for n in index.nodes.values() if n.known and n.pod_subnet} | set(extra_subnets)
        # Subnets only the nodes' attached ENIs are in (an ENIConfig changed since): still debited for them.
        held_only = frozenset(index.held_subnets() - named - launch_subnets)
        subnet_ids = frozenset(named | launch_subnets | held_only)
        prefix_mode = index.cni.prefix_delegation
        await asyncio.sleep(0)  # each of these walks every node: not all of them in one step of the loop

        # VPC first: the ENI and subnet filters use it.
        try:
            if await self.vpc.resolve(instance_ids):
                fetched.add(Call.VPC)
                log.info("EC2 VPC %s, EKS cluster %s (from the nodes' instances)", self.vpc.vpc_id,
                         self.vpc.cluster_name or "not named by their tags")  # fmt: skip
        except CallFailed as exc:
            failed[Call.VPC] = exc.reason

        # Instance types: only those not fetched within their (long) TTL.
        types = {n.instance_type for n in index.nodes.values() if n.known and n.instance_type}
        changed_limits: dict[str, InstanceLimits] = {}
        missing_types = self.instance_types.missing(types)
        if missing_types:
            try:
                changed_limits = self._changed_limits(index, await self.instance_types.limits(missing_types))
                fetched.add(Call.INSTANCE_TYPES)
            except CallFailed as exc:
                failed[Call.INSTANCE_TYPES] = exc.reason
        elif types:
            cached.add(Call.INSTANCE_TYPES)

        # Subnets before ENIs: an IP ipamd assigns between the two calls is then counted both free in its subnet and
        # held on its node until the next refresh (credited twice: a few more pods admitted), rather than gone from
        # both (debited twice: a denial while the IP sits warm on its node, which must never happen).
        vpc_id = self.vpc.vpc_id
        subnet_key = (*self.subnet_provider.key(vpc_id, subnet_ids, prefix_mode), launch_subnets)
        # New limits make the index recompute every node and re-baseline every subnet on its last figure:
        # give it fresh figures in the same step.
        subnets_due = bool(subnet_ids) and (not self.subnet_provider.fresh(subnet_key) or bool(changed_limits))
        subnets: list[SubnetInfo] | None = None
        counted: list[SubnetInfo] = []
        # A subnet figure is of no use without fresh held figures beside it: not asked while ENIs back off.
        if subnets_due and (not instance_ids or self.ec2.due(Call.ENIS)):
            # Custom networking takes precedence over subnet discovery: ENIConfig subnets only.
            discover = not index.cni.custom_networking
            try:
                subnets = await self.subnet_provider.subnets(subnet_ids, vpc_id, discover=discover)
                fetched.add(Call.SUBNETS)
            except CallFailed as exc:
                failed[Call.SUBNETS] = exc.reason
        elif subnet_ids:
            cached.add(Call.SUBNETS)
        # The subnets' own ENIs (free /28s under prefix delegation) before the nodes' too, for the same reason.
        if subnets is not None:
            self.excluded_subnets = frozenset(s.subnet_id for s in subnets if s.cni_excluded)
            subnets = [s for s in subnets if s.subnet_id in subnet_ids or self._kept(index, s)]
            pod_subnets = frozenset(s.subnet_id for s in subnets)
            used: dict[str, list[str]] | None = None
            reserved: Mapping[str, tuple[str, ...]] | None = None
            if prefix_mode:
                try:
                    used = await self.enis.subnet_usage(pod_subnets)
                    fetched.add(Call.SUBNET_ENIS)
                except CallFailed as exc:
                    failed[Call.SUBNET_ENIS] = exc.reason
                reserved = await self.subnet_provider.reservations(pod_subnets)
            counted = self.subnet_provider.with_free_blocks(subnets, pod_subnets, prefix_mode, used, reserved)
        instances: dict[str, InstanceEnis] | None = None
        if instance_ids:
            try:
                instances = await self.enis.instances(instance_ids, vpc_id, full=subnets_due)
                (fetched if instances is not None else cached).add(Call.ENIS)
            except CallFailed as exc:
                failed[Call.ENIS] = exc.reason
        if Call.ENIS in failed and subnets is not None:
            # A subnet figure pairs only with fresh held figures (what nodes drew since would count against it
            # twice): it waits for the next refresh, its free /28 counts with it.
            subnets = None
            counted = []
            fetched.discard(Call.SUBNETS)
            fetched.discard(Call.SUBNET_ENIS)

        # The control plane's ENIs feed no capacity figure: best effort, counted in the stats only.
        control_plane: ControlPlane | None = None
        if self.vpc.cluster_name:
            try:
                control_plane = await self.control_plane_provider.control_plane(self.vpc.cluster_name, vpc_id)
                if control_plane is not None:
                    fetched.add(Call.CONTROL_PLANE)
            except CallFailed:
                pass

        # Applied in slices of at most `apply_slice` seconds, each node's figures whole, so that requests are
        # answered in between. A decision between two slices sees some nodes with this refresh's figures and the
        # others with the last one's, against the subnets' last baselines. That is no less sound than the last
        # refresh: a subnet's supply is its EC2 baseline less what its nodes drew since (`_supply`: demand
        # against `demand_at_refresh`), so a node's new held figure moves its subnets exactly as a node that
        # grew or shrank between two refreshes does, and every node and subnet sum stays whole. The new subnet
        # baselines must pair with every node's new figure (else what a node drew since would be counted in
        # both): they come after the last held slice, in one step.
        self._apply_limits(index, changed_limits)
        nodes_updated = 0
        if instances is not None:
            self.instances = instances
            nodes_updated = await run_sliced(self._held_steps(
                index, node_instances, instances, self.excluded_subnets, self.apply_slice))
        missing: frozenset[str] = frozenset()
        infos: dict[str, SubnetInfo] = {}
        if subnets is not None:
            infos, missing = self._apply_subnets(index, subnet_ids, counted, launch_subnets, held_only)
            self.subnet_provider.remember(subnet_key, infos)

        skipped = frozenset(k for k, reason in failed.items() if reason == "backoff")
        return RefreshResult(
            fetched=frozenset(fetched),
            cached=frozenset(cached),
            skipped=skipped,
            failed={k: r for k, r in failed.items() if k not in skipped},
            nodes_updated=nodes_updated,
            subnets_updated=len(infos),
            subnets_missing=missing,
            instances=instances or {},
            subnets=infos,
            control_plane=control_plane,
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
        self,
        index: CapacityIndex,
        node_instances: Mapping[str, str],
        instances: Mapping[str, InstanceEnis],
        excluded_subnets: AbstractSet[str] = frozenset(),
    ) -> int:
        """Each node's held IPs, pod ENIs and lost ENI slots, in one synchronous step (see `_held_steps`)."""
        return run_through(self._held_steps(index, node_instances, instances, excluded_subnets, None))

    def _held_steps(
        self,
        index: CapacityIndex,
        node_instances: Mapping[str, str],
        instances: Mapping[str, InstanceEnis],
        excluded_subnets: AbstractSet[str],
        slice_seconds: float | None,
    ) -> Generator[None, None, int]:
        """Each node's held IPs, pod ENIs and lost ENI slots; returns how many nodes changed. `excluded_subnets`
        (tagged `kubernetes.io/role/cni=0`) count only with subnet discovery on: ipamd marks ENIs there excluded
        in `setupENI` only then (`excludedENIBasedOnSubnetTags`). With `slice_seconds`, yields whenever that
        long has gone by, always between two nodes (see `_refresh` for why a decision between two slices is
        sound)."""
        custom = index.cni.custom_networking
        excluded = frozenset(excluded_subnets) if index.cni.subnet_discovery else frozenset()
        if self._figures_key != (custom, excluded):
            self._figures_key = (custom, excluded)
            self._figures.clear()
        updated = 0
        held_now: set[str] = set()
        slices = Slices(slice_seconds)
        for node_name, instance_id in node_instances.items():
            if slices.over():
                yield
                slices.start()
            node = index.nodes.get(node_name)
            if node is None:
                continue
            usage = instances.get(instance_id)
            # No ENI at all: the instance is gone (or elsewhere); let the index predict.
            held: NodeHeld = NO_HELD
            if usage is not None:
                held_now.add(node_name)
                held = self._node_held(instance_id, usage, custom, excluded)
            if (node.ec2_held != held.ips or node.ec2_enis != held.enis or node.ec2_subnets != held.placed
                    or node.lost_enis != held.lost):
                index.set_node_held(node_name, held.ips, enis=held.enis, subnets=held.by_subnet, lost_enis=held.lost)
                updated += 1
        for node_name in self._held_nodes - held_now:
            if slices.over():
                yield
                slices.start()
            node = index.nodes.get(node_name)
            if node is not None and node_name not in node_instances and node.ec2_held is not None:
                index.set_node_held(node_name, None)  # no longer mapped to an instance: stale EC2 figure
                updated += 1
        self._held_nodes = held_now
        for instance_id in self._figures.keys() - instances.keys():
            del self._figures[instance_id]
        return updated

    def _node_held(self, instance_id: str, usage: InstanceEnis, custom: bool, excluded: frozenset[str]) -> NodeHeld:
        """What a node's ENIs give the index, worked out again only when they changed: on most nodes they do not
        from one period to the next."""
        known = self._figures.get(instance_id)
        if known is not None and known[0] == usage:
            return known[1]
        by_subnet = usage.held_by_subnet(custom_networking=custom, excluded=excluded)
        held = NodeHeld(
            usage.held_ips(custom_networking=custom, excluded=excluded),
            usage.pod_enis(custom_networking=custom, excluded=excluded),
            by_subnet,
            tuple(sorted(by_subnet.items())),
            usage.lost_enis(custom_networking=custom, excluded=excluded),
        )
        self._figures[instance_id] = (usage, held)
        return held

    def pod_subnets(
        self, instances: Mapping[str, InstanceEnis], zones: Mapping[str, str | None], *, discovery: bool
    ) -> dict[str, str]:
        """Instance id -> the subnet its pod IPs come from: its own (its primary ENI's). With subnet discovery on
        and that subnet tagged kubernetes.io/role/cni=0, ipamd keeps the primary ENI from pods
        (`excludedENIBasedOnSubnetTags`) and creates ENIs only in the zone's other tagged subnets
        (`createENI` skips it: `isSubnetValidForENICreation`): then the subnet of its pod ENIs elsewhere, else
        the zone's tagged subnet with most free addresses (`GetVpcSubnets`' order), where its next ENI goes.
        `zones`: instance id -> its node's zone."""
        excluded = self.excluded_subnets if discovery else frozenset()
        out: dict[str, str] = {}
        for instance_id, usage in instances.items():
            own = usage.primary_subnet
            if own is None:
                continue
            if own not in excluded:
                out[instance_id] = own
                continue
            elsewhere = usage.own_subnet_excluded_elsewhere(excluded)
            if elsewhere is None:
                zone = zones.get(instance_id)
                tagged = [s for s in self.subnets.values() if s.zone == zone and s.cni_discoverable]
                elsewhere = max(tagged, key=lambda s: (s.free_ips, s.subnet_id)).subnet_id if tagged else None
            # No tagged subnet: ipamd creates no ENI at all ("no valid subnets"); the own subnet stays named.
            out[instance_id] = elsewhere or own
        return out

    def _kept(self, index: CapacityIndex, info: SubnetInfo) -> bool:
        """Whether a subnet not asked for by id feeds the index: every one with `all_vpc_subnets`; one found by
        its discovery tag when ipamd may use it: tagged other than `0`, and in a zone with nodes (ipamd picks
        discovered subnets in the node's own zone; in a zone without nodes they give nothing until one joins,
        and counting them would make that zone look like a launch target)."""
        zone = index.zones.get(info.zone)
        discoverable = info.cni_discoverable and zone is not None and zone.nodes > 0
        return discoverable or self.subnet_provider.all_vpc_subnets

    def _apply_subnets(
        self,
        index: CapacityIndex,
        wanted: frozenset[str],
        subnets: Iterable[SubnetInfo],
        launch_subnets: frozenset[str] = frozenset(),
        held_only: frozenset[str] = frozenset(),
    ) -> tuple[dict[str, SubnetInfo], frozenset[str]]:
        infos: dict[str, SubnetInfo] = {}
        for info in subnets:
            infos[info.subnet_id] = info
            index.upsert_subnet(
                info.subnet_id, zone=info.zone, cidr=info.cidr, free_ips=info.free_ips, free_blocks=info.free_blocks,
                tags=info.tags, launchable=info.subnet_id in launch_subnets, held_only=info.subnet_id in held_only,
            )  # fmt: skip
        missing = frozenset(wanted - set(infos))
        discovered = frozenset(set(infos) - wanted)
        for subnet_id in missing & self._applied_subnets:
            log.warning("EC2 has no subnet %s any more: dropping it from the index", subnet_id)
            self._drop_subnet(index, subnet_id)
        for subnet_id in self._discovered - discovered - wanted:
            log.info("subnet %s no longer counts for subnet discovery: dropping it from the index", subnet_id)
            self._drop_subnet(index, subnet_id)
        self._discovered = set(discovered)
        for subnet_id in self._launch_targets - wanted:
            log.info("subnet %s is no longer a launch target: dropping it from the index", subnet_id)
            self._drop_subnet(index, subnet_id)
        self._launch_targets = set(launch_subnets)
        self._applied_subnets |= set(infos)
        self.subnets.update(infos)
        for subnet_id in missing:
            self.subnets.pop(subnet_id, None)
        return infos, missing

    def _drop_subnet(self, index: CapacityIndex, subnet_id: str) -> None:
        index.remove_subnet(subnet_id)
        self._applied_subnets.discard(subnet_id)
        self.subnets.pop(subnet_id, None)
        self.subnet_provider.forget(subnet_id)

    # ---- the loop -------------------------------------------------------------------------------------

    def _next_wait(self) -> float:
        wait = min(self.eni_period, self.subnet_period)
        retry = self.ec2.next_retry_in()
        if retry is not None:
            wait = min(wait, retry)  # retry as soon as a backoff ends
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
        self.ec2.close()
