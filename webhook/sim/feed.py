"""One replica of ipguard, fed by the simulated cluster and EC2 the way the live sources feed the real one.

This is the only module that knows how ipguard's index is fed; when the live sources change what they tell the
index, this is the one place to follow them:
- the cluster side goes through the live watch handlers themselves (sources/cluster.py `ClusterFeed`: nodes,
  pods, ENIConfigs, the aws-node DaemonSet, ipguard's ConfigMap), each event delivered `watch_lag` seconds after
  it happened;
- the EC2 side is what `Ec2Poller.refresh` would fetch (DescribeNetworkInterfaces of the nodes' instances,
  DescribeSubnets, and under prefix delegation the subnets' ENIs for free /28s), summarised and applied by the
  poller's own code, once per refresh period, then the nodes' subnets as `Service.refresh_ec2` sets them;
- admission goes through `admission.handler.handle`, the code the HTTPS handler calls, on a parsed review.
"""

from __future__ import annotations

import base64
import copy
import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import jsonpatch
import orjson

from webhook.admission.handler import AdmissionState, Answer, handle
from webhook.admission.wire import parse_review
from webhook.apiserver import admission_review, as_created
from webhook.model.cni import CniSettings
from webhook.model.config import Settings
from webhook.model.index import CapacityIndex
from webhook.model.limits import LimitsTable
from webhook.sim.cluster import Cluster
from webhook.sim.ec2 import Ec2, SimEni
from webhook.sources.cluster import ClusterFeed, Handler
from webhook.sources.ec2.enis import Eni, subnet_usage, summarize_instances
from webhook.sources.ec2.poller import Ec2Poller
from webhook.sources.ec2.subnets import CNI_SUBNET_TAG, SubnetInfo

CONFIG_NAME = CONFIG_NAMESPACE = "ipguard"


@dataclass(frozen=True, slots=True)
class Admission:
    """What one pod's trip through mutate and validate came to."""

    pod: dict[str, Any]  # the pod as created (the mutation applied)
    allowed: bool
    steered: bool
    mutate: Answer
    validate: Answer


@dataclass(slots=True)
class Replica:
    """ipguard's state as one replica holds it, and its lagging view of the cluster."""

    cluster: Cluster
    settings_data: dict[str, str]
    watch_lag: float = 1.0
    ec2_period: float = 30.0
    ec2_phase: float = 0.0
    index: CapacityIndex = field(init=False)
    feed: ClusterFeed = field(init=False)
    state: AdmissionState = field(init=False)
    poller: Ec2Poller = field(init=False)
    handlers: dict[str, Handler] = field(init=False)
    now: float = 0.0
    reviews: int = 0  # admission reviews answered, and the wall time they took (for bench/replay.py)
    review_seconds: float = 0.0
    _queue: list[tuple[float, int, str, str, dict[str, Any]]] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)
    _next_ec2: float = 0.0

    def __post_init__(self) -> None:
        settings = Settings.from_configmap(self.settings_data)
        self.index = CapacityIndex(LimitsTable(), CniSettings(), node_reserve=settings.node_reserve,
                                   reservation_ttl=settings.reservation_ttl, clock=lambda: self.now)
        self.state = AdmissionState(self.index, settings)
        self.feed = ClusterFeed(self.index, self._apply_settings, CONFIG_NAME, CONFIG_NAMESPACE)
        self.handlers = self.feed.handlers()
        self.poller = Ec2Poller(region="us-east-1", clock=lambda: self.now)
        self._next_ec2 = self.ec2_phase
        self._list()
        self.cluster.listeners.append(self._event)

    def _apply_settings(self, settings: Settings) -> None:
        self.state.settings = settings
        self.index.set_node_reserve(settings.node_reserve)
        self.index.set_reservation_ttl(settings.reservation_ttl)

    def _list(self) -> None:
        """The initial list of every watched resource, as the reflectors do on start."""
        env = [{"name": k, "value": v} for k, v in sorted(self.cluster.env.items())]
        self.handlers["daemonsets"].upsert({
            "metadata": {"name": "aws-node", "namespace": "kube-system"},
            "spec": {"template": {"spec": {"containers": [{"name": "aws-node", "env": env}]}}},
        })
        self.handlers["configmaps"].upsert({"metadata": {"name": CONFIG_NAME, "namespace": CONFIG_NAMESPACE},
                                            "data": dict(self.settings_data)})
        for name, subnet in self.cluster.eni_configs.items():
            self.handlers["eniconfigs"].upsert({"metadata": {"name": name}, "spec": {"subnet": subnet}})
        for node in self.cluster.nodes.values():
            self.handlers["nodes"].upsert(node.obj)
        for pod in self.cluster.pods.values():
            self.handlers["pods"].upsert(self.cluster.pod_object(pod))
        self.refresh_ec2()

    def _event(self, resource: str, op: str, obj: dict[str, Any]) -> None:
        heapq.heappush(self._queue, (self.cluster.now + self.watch_lag, next(self._order), resource, op, obj))

    def advance(self, now: float) -> None:
        """Deliver the watch events due by `now`, and refresh EC2 figures when the period comes round."""
        self.now = now
        while self._queue and self._queue[0][0] <= now:
            _, _, resource, op, obj = heapq.heappop(self._queue)
            handler = self.handlers[resource]
            if op == "delete":
                handler.delete(obj)
            else:
                handler.upsert(obj)
        if now >= self._next_ec2:
            self._next_ec2 = now + self.ec2_period
            self.refresh_ec2()

    # ---- EC2 --------------------------------------------------------------------------------------------

    def refresh_ec2(self) -> None:
        """What one Ec2Poller.refresh applies, in its order: held IPs and ENIs per instance, the nodes' own
        subnets (as Service.refresh_ec2 sets them), then the pod subnets and those tagged for subnet discovery
        (DescribeSubnets), with free /28s counted from every ENI in them under prefix delegation."""
        ec2 = self.cluster.ec2
        poller = self.poller
        node_instances = self.feed.node_instances()
        instance_ids = set(node_instances.values())
        enis = [_eni(e, ec2) for e in ec2.enis.values()]
        attached = [e for e in enis if e.instance_id in instance_ids or e.trunk_eni_id is not None]
        instances = summarize_instances(attached, instance_ids)
        poller._apply_held(self.index, node_instances, instances)
        by_instance = {iid: inst.primary_subnet for iid, inst in instances.items() if inst.primary_subnet}
        self.feed.set_ec2_node_subnets(
            {node: by_instance[iid] for node, iid in node_instances.items() if iid in by_instance})
        named = ({n.pod_subnet for n in self.index.nodes.values() if n.known and n.pod_subnet}
                 | set(self.feed.eni_configs.values()))
        held_only = frozenset(self.index.held_subnets() - named)
        wanted = frozenset(named | held_only)
        discover = not self.index.cni.custom_networking  # custom networking takes precedence over discovery
        found = [
            SubnetInfo(s.subnet_id, s.zone, s.cidr, s.free, tags=dict(s.tags))
            for s in ec2.subnets.values()
            if s.subnet_id in wanted or (discover and CNI_SUBNET_TAG in s.tags)
        ]
        subnets = [s for s in found if s.subnet_id in wanted or poller._kept(self.index, s)]
        pod_subnets = frozenset(s.subnet_id for s in subnets)
        prefix_mode = self.index.cni.prefix_delegation
        used = subnet_usage(e for e in enis if e.subnet_id in pod_subnets) if prefix_mode else None
        counted = poller.subnet_provider.with_free_blocks(subnets, pod_subnets, prefix_mode, used, {})
        poller._apply_subnets(self.index, wanted, counted, held_only=held_only)

    # ---- admission --------------------------------------------------------------------------------------

    def review(self, stage: str, pod: dict[str, Any], name: str | None) -> Answer:
        started = time.perf_counter()
        namespace = pod["metadata"]["namespace"]
        body = orjson.dumps(admission_review(pod, namespace, name))
        answer = handle(parse_review(body), "mutate" if stage == "mutate" else "validate", self.state)
        self.reviews += 1
        self.review_seconds += time.perf_counter() - started
        return answer


def admit(mutating: Replica, validating: Replica, template: dict[str, Any], name: str) -> Admission:
    """The apiserver's part: mutate (the pod has no name yet), apply the patch, name the pod, validate."""
    mutated = mutating.review("mutate", template, None)
    pod = copy.deepcopy(template)
    patch = mutated.response.get("patch")
    steered = False
    if patch:
        ops = orjson.loads(base64.b64decode(patch))
        pod = jsonpatch.apply_patch(pod, ops)
        steered = bool(ops)
    pod = as_created(pod, name)
    validated = validating.review("validate", pod, name)
    return Admission(pod, validated.response["allowed"], steered and validated.response["allowed"], mutated,
                     validated)


def _eni(eni: SimEni, ec2: Ec2) -> Eni:
    """A simulated ENI as DescribeNetworkInterfaces lists it (what `parse_eni` makes of the real answer)."""
    space = ec2.subnets[eni.subnet_id].space
    return Eni(
        eni_id=eni.eni_id,
        subnet_id=eni.subnet_id,
        description=eni.description,
        interface_type=eni.interface_type,
        instance_id=eni.instance_id,
        device_index=eni.device_index,
        primary_ip=space.address(eni.primary) if eni.primary is not None else None,
        secondary_ips=tuple(space.address(o) for o in eni.secondaries),
        prefixes=tuple(space.prefix_text(p) for p in eni.prefixes),
        trunk_eni_id=eni.trunk_eni_id,
    )
