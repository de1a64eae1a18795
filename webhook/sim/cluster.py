"""The simulated cluster: nodes with their ipamd, pods, the kubelet's sandbox attempts, the VPC resource
controller's branch ENIs, the scheduler and an autoscaler stand-in, on simulated time.

Every change a watch would show (nodes, pods) is told to the listeners, which is how replicas of ipguard learn
about the cluster. A pod's sandbox fails, and is counted, exactly when its node cannot give it an address and has
no way to get one: no free address (cooling addresses are not free), and ipamd's next step would not add one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from webhook.model.limits import InstanceLimits, LimitsTable, max_pods
from webhook.sim import ipamd as ip
from webhook.sim.addresses import BLOCK, Ec2Error
from webhook.sim.ec2 import BRANCH_DESCRIPTION, TRUNK_DESCRIPTION, Ec2
from webhook.sim.scheduler import (
    POD_ENI,
    UNSCHEDULABLE_TAINT,
    NodeView,
    affinity_matches,
    app_of,
    pick_node,
    wants_pod_eni,
)

ZONE_LABEL = "topology.kubernetes.io/zone"
BRANCH_COOLDOWN = 60.0  # the VPC resource controller's branch ENI cooldown
SECURITY_GROUPS_PER_ENI = 5  # EC2's default quota
KUBELET_RETRY = 1.0

Listener = Callable[[str, str, dict[str, Any]], None]  # (resource, "upsert" | "delete", object)


@dataclass(slots=True)
class SimPod:
    key: str
    obj: dict[str, Any]
    created: float
    branch: bool
    host_network: bool = False
    groups: int = 1  # security groups its branch ENI would carry
    runs_for: float | None = None  # Job pods: completes this long after it starts
    node: str | None = None
    phase: str = "Pending"  # Pending | Running | Succeeded | Deleted
    started: float | None = None
    sandbox_failed: bool = False  # a sandbox failure for want of an address
    failure_cause: str | None = None
    waited: bool = False  # a sandbox attempt failed while ipamd was still growing (not counted as a failure)
    unschedulable: bool = False
    owner: str = ""


@dataclass(slots=True)
class SimNode:
    view: NodeView
    ipamd: ip.Ipamd
    instance_type: str
    subnet_id: str
    branch_subnet: str
    obj: dict[str, Any]
    offset: float  # phase of its ipamd loop
    trunk: str | None = None
    branches: dict[str, str] = field(default_factory=dict)  # pod -> branch ENI
    cooling_branches: list[tuple[str, float]] = field(default_factory=list)  # (ENI, deleted at)
    eni_config: str | None = None  # custom networking: the ENIConfig it selects


@dataclass(frozen=True, slots=True)
class AutoscalerConfig:
    instance_type: str
    subnets: dict[str, str]  # zone -> the subnet new nodes launch into
    pending_for: float = 30.0
    boot: float = 60.0
    interval: float = 10.0
    max_nodes: int = 20
    max_pods: int | None = None


@dataclass(slots=True)
class Launch:
    node: str
    zone: str
    instance_id: str
    ready_at: float
    capacity: int


class Cluster:
    def __init__(self, ec2: Ec2, env: Mapping[str, str], limits: LimitsTable, *, seed: int = 0,
                 eni_configs: Mapping[str, str] | None = None, eni_config_label: str | None = None) -> None:
        self.ec2 = ec2
        self.env = dict(env)
        self.settings = ip.IpamdSettings.from_env(env)
        self.limits = limits
        self.rng = random.Random(seed)
        self.eni_configs = dict(eni_configs or {})
        self.eni_config_label = eni_config_label or self.settings.cni.eni_config_label_def
        self.nodes: dict[str, SimNode] = {}
        self.pods: dict[str, SimPod] = {}
        self.pending: dict[str, SimPod] = {}  # unbound, in creation order
        self.starting: dict[str, SimPod] = {}  # bound, no sandbox yet
        self.listeners: list[Listener] = []
        self.autoscaler: AutoscalerConfig | None = None
        self.launches: list[Launch] = []
        self.launched = 0
        self._schedule_dirty = True
        self._next_autoscale = 0.0
        self.now = 0.0  # the cluster's clock: when the changes it tells its listeners about happen
        self.created = 0  # pods created so far

    # ---- watch ------------------------------------------------------------------------------------------

    def emit(self, resource: str, op: str, obj: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener(resource, op, obj)

    # ---- nodes ------------------------------------------------------------------------------------------

    def add_node(self, name: str, zone: str, instance_type: str, subnet_id: str, *, allocatable_pods: int,
                 labels: Mapping[str, str] | None = None, eni_config: str | None = None, now: float = 0.0,
                 instance_id: str | None = None, unschedulable: bool = False) -> SimNode:
        """A node that has joined: its instance runs (launched now unless `instance_id` is given), its ipamd starts."""
        limits: InstanceLimits = self.limits.get(instance_type)
        cni = self.settings.cni
        config_subnet = None
        config_name = eni_config
        if cni.custom_networking:
            config_name = eni_config or (labels or {}).get(self.eni_config_label) or (
                zone if self.eni_config_label == ZONE_LABEL else "default")
            config_subnet = self.eni_configs.get(config_name)
        if instance_id is None:
            ipamd = ip.start_ipamd(self.ec2, name, instance_type, limits, subnet_id, self.settings,
                                   max_pods=allocatable_pods, eni_config_subnet=config_subnet,
                                   rng=random.Random(self.rng.random()), now=now)
        else:
            ipamd = ip.Ipamd(name, instance_id, limits, self.settings, self.ec2, allocatable_pods, subnet_id,
                             config_subnet, random.Random(self.rng.random()))
            primary = self.ec2.enis[self.ec2.instances[instance_id].enis[0]]
            ipamd.enis[primary.eni_id] = ip.DsEni(primary.eni_id, subnet_id, primary=True, created=now)
        ipamd.schedulable = not unschedulable
        all_labels = {
            ZONE_LABEL: zone, "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "node.kubernetes.io/instance-type": instance_type, **(labels or {}),
        }
        if cni.custom_networking and config_name and not (labels or {}).get(self.eni_config_label):
            all_labels.setdefault("k8s.amazonaws.com/eniConfig", config_name)
        # The resource controller puts branch ENIs in the ENIConfig's subnet only when custom networking names a
        # non-default ENIConfig; otherwise in the instance's own subnet.
        branch_subnet = config_subnet if config_subnet and config_name != "default" else subnet_id
        taints = [{"key": UNSCHEDULABLE_TAINT, "effect": "NoSchedule"}] if unschedulable else []
        view = NodeView(name, zone, all_labels, taints, allocatable_pods, 0)
        node = SimNode(view, ipamd, instance_type, subnet_id, branch_subnet, {},
                       offset=self.rng.uniform(0, ip.POOL_INTERVAL), eni_config=config_name)
        self.nodes[name] = node
        if cni.pod_eni and limits.trunking:
            self._attach_trunk(node)
        node.obj = self._node_obj(node)
        self._schedule_dirty = True
        self.emit("nodes", "upsert", node.obj)
        return node

    def _attach_trunk(self, node: SimNode) -> None:
        """tryEnableSecurityGroupsForPods, then the resource controller's trunk ENI: only with a free ENI slot."""
        ipamd = node.ipamd
        if len(ipamd.enis) >= ip.max_enis(ipamd.limits, self.settings.cni):
            return
        try:
            eni = self.ec2.create_network_interface(node.branch_subnet, TRUNK_DESCRIPTION, interface_type="trunk")
        except Ec2Error:
            return
        self.ec2.attach_network_interface(eni.eni_id, ipamd.instance_id, self.ec2.free_device_index(ipamd.instance_id))
        ipamd.enis[eni.eni_id] = ip.DsEni(eni.eni_id, node.branch_subnet, primary=False, created=0.0, trunk=True)
        node.trunk = eni.eni_id
        node.view.pod_eni = ipamd.limits.branch_enis

    def _node_obj(self, node: SimNode) -> dict[str, Any]:
        zone = node.view.zone
        allocatable = {"pods": str(node.view.allocatable_pods)}
        if node.view.pod_eni:
            allocatable[POD_ENI] = str(node.view.pod_eni)
        return {
            "metadata": {"name": node.view.name, "labels": dict(node.view.labels), "annotations": {}},
            "spec": {"providerID": f"aws:///{zone}/{node.ipamd.instance_id}",
                     "unschedulable": not node.ipamd.schedulable, "taints": list(node.view.taints)},
            "status": {"allocatable": allocatable},
        }

    def cordon(self, name: str) -> None:
        node = self.nodes.get(name)
        if node is None:
            return  # a scenario replayed on another snapshot may name nodes that are not there
        node.ipamd.schedulable = False
        node.view.taints = [{"key": UNSCHEDULABLE_TAINT, "effect": "NoSchedule"}]
        node.obj = self._node_obj(node)
        self.emit("nodes", "upsert", node.obj)

    def select_eni_config(self, name: str, config_name: str) -> None:
        """Relabel a running node to another ENIConfig. ipamd reads the node's ENIConfig again for each new ENI
        (`tryAllocateENI` -> `MyENIConfig`) and nothing else: attached ENIs stay in their subnet."""
        node = self.nodes[name]
        node.eni_config = config_name
        node.view.labels = {**node.view.labels, self.eni_config_label: config_name}
        node.ipamd.eni_config_subnet = self.eni_configs.get(config_name)
        node.obj = self._node_obj(node)
        self.emit("nodes", "upsert", node.obj)

    def set_eni_config_subnet(self, config_name: str, subnet_id: str) -> None:
        """An ENIConfig's subnet changed: the nodes selecting it create their next ENIs there; attached ENIs stay."""
        self.eni_configs[config_name] = subnet_id
        for node in self.nodes.values():
            if node.eni_config == config_name:
                node.ipamd.eni_config_subnet = subnet_id
        self.emit("eniconfigs", "upsert", {"metadata": {"name": config_name}, "spec": {"subnet": subnet_id}})

    # ---- pods -------------------------------------------------------------------------------------------

    def create_pod(self, key: str, obj: dict[str, Any], now: float, *, runs_for: float | None = None,
                   groups: int = 1, owner: str = "") -> SimPod:
        spec = obj.get("spec") or {}
        pod = SimPod(key, obj, now, wants_pod_eni(obj), host_network=spec.get("hostNetwork") is True,
                     groups=groups, runs_for=runs_for, owner=owner)
        self.pods[key] = pod
        self.created += 1
        node_name = spec.get("nodeName")
        if node_name:
            self._bind(pod, self.nodes[node_name], now, emit=False)
        else:
            self.pending[key] = pod
            self._schedule_dirty = True
        self.emit("pods", "upsert", self.pod_object(pod))
        return pod

    def pod_object(self, pod: SimPod) -> dict[str, Any]:
        obj = dict(pod.obj)
        spec = dict(obj.get("spec") or {})
        if pod.node:
            spec["nodeName"] = pod.node
        obj["spec"] = spec
        obj["status"] = {"phase": "Pending" if pod.phase == "Pending" else pod.phase}
        return obj

    def _bind(self, pod: SimPod, node: SimNode, now: float, *, emit: bool = True) -> None:
        pod.node = node.view.name
        node.view.pods += 1
        app = app_of(pod.obj)
        node.view.apps[app] = node.view.apps.get(app, 0) + 1
        if pod.branch:
            node.view.pod_eni_used += 1
        self.pending.pop(pod.key, None)
        self.starting[pod.key] = pod
        if emit:
            self.emit("pods", "upsert", self.pod_object(pod))

    def _unbind(self, pod: SimPod, now: float) -> None:
        node = self.nodes.get(pod.node or "")
        if node is None:
            return
        node.view.pods -= 1
        app = app_of(pod.obj)
        node.view.apps[app] -= 1
        if pod.branch:
            node.view.pod_eni_used -= 1
            eni = node.branches.pop(pod.key, None)
            if eni is not None:
                node.cooling_branches.append((eni, now))
        else:
            ip.unassign_pod_address(node.ipamd, pod.key, now)
        self._schedule_dirty = True

    def delete_pod(self, key: str, now: float) -> None:
        pod = self.pods.pop(key, None)
        if pod is None:
            return
        self.pending.pop(key, None)
        self.starting.pop(key, None)
        if pod.phase != "Succeeded":
            self._unbind(pod, now)
        pod.phase = "Deleted"
        self.emit("pods", "delete", self.pod_object(pod))

    def complete_pod(self, pod: SimPod, now: float) -> None:
        """A Job pod that finished: its sandbox is torn down, its address released; the object stays."""
        self._unbind(pod, now)
        pod.phase = "Succeeded"
        self.emit("pods", "upsert", self.pod_object(pod))

    # ---- the scheduler ----------------------------------------------------------------------------------

    def schedule(self, now: float) -> None:
        if not self.pending or not self._schedule_dirty:
            return
        self._schedule_dirty = False
        views = [n.view for n in self.nodes.values()]
        for pod in list(self.pending.values()):
            node = pick_node(pod.obj, views, pod.branch)
            if node is None:
                pod.unschedulable = True
                continue
            pod.unschedulable = False
            self._bind(pod, self.nodes[node.name], now)

    # ---- the kubelet, the CNI and the resource controller -------------------------------------------------

    def start_sandboxes(self, now: float) -> None:
        no_address: dict[str, bool] = {}
        growing: dict[str, bool] = {}
        for pod in list(self.starting.values()):
            node = self.nodes[pod.node or ""]
            if pod.host_network:
                self._started(pod, now)
                continue
            if pod.branch:
                self._start_branch(pod, node, now)
                continue
            name = node.view.name
            if not no_address.get(name) and ip.assign_pod_address(node.ipamd, pod.key, now) is not None:
                self._started(pod, now)
                continue
            no_address[name] = True
            if name not in growing:
                growing[name] = ip.growth_possible(node.ipamd, now)
            if growing[name]:
                pod.waited = True
            elif not pod.sandbox_failed:
                pod.sandbox_failed = True
                pod.failure_cause = self._why_no_address(node, now)

    def _why_no_address(self, node: SimNode, now: float) -> str:
        ipamd = node.ipamd
        stats = ip.pool_stats(ipamd, now)
        if not ip.eni_attachment_allowed(ipamd):
            return "cordoned"
        if stats.total >= ipamd.max_pods:
            return "max-pods"
        if ip.pool_too_low(ipamd, stats):
            # Low, yet no way to grow: the subnet is short, or every ENI slot is taken.
            return "subnet" if ip.room_for_eni(ipamd) or ip.allocatable_enis(ipamd, shuffle=False) else "eni-limit"
        # Not low: what it holds is enough by its targets, but cooling (or the targets keep it from growing).
        return "cooldown" if stats.cooldown else "warm-target"

    def _start_branch(self, pod: SimPod, node: SimNode, now: float) -> None:
        """The resource controller's branch ENI (one subnet address, never reused), then the sandbox."""
        limit = node.ipamd.limits.branch_enis
        cause = None
        if node.trunk is None:
            cause = "no-trunk"
        elif len(node.branches) + len(node.cooling_branches) >= limit:
            pod.waited = True  # ErrCurrentlyAtMaxCapacity: requeued until a cooling branch ENI goes
            return
        elif pod.groups > SECURITY_GROUPS_PER_ENI:
            cause = "security-groups"
        else:
            try:
                eni = self.ec2.create_network_interface(node.branch_subnet, BRANCH_DESCRIPTION, interface_type="branch")
            except Ec2Error:
                cause = "subnet"
            else:
                eni.trunk_eni_id = node.trunk
                node.branches[pod.key] = eni.eni_id
                self._started(pod, now)
                return
        if not pod.sandbox_failed:
            pod.sandbox_failed = True
            pod.failure_cause = cause

    def _started(self, pod: SimPod, now: float) -> None:
        self.starting.pop(pod.key, None)
        pod.phase = "Running"
        pod.started = now

    def finish_jobs(self, now: float) -> None:
        for pod in [p for p in self.pods.values() if p.phase == "Running" and p.runs_for is not None]:
            if pod.started is not None and pod.runs_for is not None and now - pod.started >= pod.runs_for:
                self.complete_pod(pod, now)

    def cool_branches(self, now: float) -> None:
        for node in self.nodes.values():
            kept = []
            for eni, deleted in node.cooling_branches:
                if now - deleted >= BRANCH_COOLDOWN:
                    self.ec2.delete_network_interface(eni)
                else:
                    kept.append((eni, deleted))
            node.cooling_branches = kept

    def run_ipamd(self, now: float, step: float) -> None:
        """Each node's pool manager, once per 5 s at its own phase."""
        for node in self.nodes.values():
            phase = (now - node.offset) % ip.POOL_INTERVAL
            if phase < step:
                ip.update_pool(node.ipamd, now)

    # ---- the autoscaler stand-in ------------------------------------------------------------------------

    def autoscale(self, now: float) -> None:
        """Cluster Autoscaler / Karpenter: pods Pending (unschedulable) for a while get new nodes, in the allowed zone
        with the fewest nodes whose subnet can give the node its address."""
        config = self.autoscaler
        if config is None:
            return
        for launch in [x for x in self.launches if x.ready_at <= now]:
            self.launches.remove(launch)
            self.add_node(launch.node, launch.zone, config.instance_type, config.subnets[launch.zone],
                          allocatable_pods=launch.capacity, now=now, instance_id=launch.instance_id)
        if now < self._next_autoscale:
            return
        self._next_autoscale = now + config.interval
        waiting = [p for p in self.pending.values() if p.unschedulable and now - p.created >= config.pending_for]
        if not waiting:
            return
        room = sum(x.capacity - 2 for x in self.launches)
        limits = self.limits.get(config.instance_type)
        capacity = config.max_pods or _default_max_pods(limits, self)
        for pod in waiting:
            if room > 0:
                room -= 1
                continue
            if len(self.launches) + self.launched >= config.max_nodes:
                return
            for zone in self._zones_for(pod, config):
                try:
                    instance = self.ec2.run_instance(config.instance_type, limits, config.subnets[zone])
                except Ec2Error:
                    continue
                self.launched += 1
                name = f"ip-autoscaled-{self.launched}.{zone}.compute.internal"
                self.launches.append(Launch(name, zone, instance.instance_id, now + config.boot, capacity))
                room += capacity - 2 - 1
                break

    def _zones_for(self, pod: SimPod, config: AutoscalerConfig) -> list[str]:
        counts = {zone: 0 for zone in config.subnets}
        for node in self.nodes.values():
            if node.view.zone in counts:
                counts[node.view.zone] += 1
        for launch in self.launches:
            counts[launch.zone] += 1
        fitting = []
        for zone in config.subnets:
            probe = NodeView("new", zone, {ZONE_LABEL: zone, "kubernetes.io/os": "linux",
                                           "node.kubernetes.io/instance-type": config.instance_type}, [], 1, 1)
            if affinity_matches(pod.obj, probe):
                fitting.append(zone)
        return sorted(fitting, key=lambda z: (counts[z], z))

    # ---- one step -----------------------------------------------------------------------------------------

    def step(self, now: float, step: float) -> None:
        self.now = now
        self.finish_jobs(now)
        self.cool_branches(now)
        self.autoscale(now)
        self.schedule(now)
        self.start_sandboxes(now)
        self.run_ipamd(now, step)

    def mark_changed(self) -> None:
        self._schedule_dirty = True

    # ---- what a fresh node could do (the oracle and the autoscaler's what-if) ----------------------------

    def fresh_node_could_get_address(self, zone: str, branch: bool = False) -> bool:
        """A node launched now in `zone` by the autoscaler: its own address, then one pod address from its ipamd
        (the primary ENI's one-IP fallback, a new ENI in the ENIConfig subnet, one /28), or a branch ENI's."""
        config = self.autoscaler
        if config is None or zone not in config.subnets:
            return False
        node_subnet = self.ec2.subnets[config.subnets[zone]].space
        limits = self.limits.get(config.instance_type)
        if node_subnet.free_count < 1:
            return False
        if branch:
            return self.settings.cni.pod_eni and limits.trunking and node_subnet.free_count >= 3
        cni = self.settings.cni
        prefix = cni.prefix_delegation and limits.prefix_delegation
        if cni.custom_networking:
            name = zone if self.eni_config_label == ZONE_LABEL else "default"
            subnet_id = self.eni_configs.get(name)
            if subnet_id is None:
                return False
            space = self.ec2.subnets[subnet_id].space
            if prefix:
                return space.free_count >= 1 + BLOCK and space.free_block_count >= 1
            first = limits.ipv4_per_eni - 1
            if cni.uses_ip_targets:
                first = min(max(cni.warm_ip_target or 0, cni.minimum_ip_target or 0), first)
            return space.free_count >= 1 + max(first, 1)
        if prefix:
            return node_subnet.free_count >= 1 + BLOCK and node_subnet.free_block_count >= 1
        return node_subnet.free_count >= 2


def _default_max_pods(limits: InstanceLimits, cluster: Cluster) -> int:
    return max_pods(limits, cluster.settings.cni.mode)
