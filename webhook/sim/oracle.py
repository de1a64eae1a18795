"""The false-denial oracle: could a pod ipguard denied have got an address, by the simulation's own state?

A denial is false when, at that moment, the simulation shows a node in the pod's allowed zones that the scheduler
could pick and whose ipamd could give it an address, or a zone where the autoscaler could add a node that gets
one. Addresses already spoken for count as taken: the cluster is first played forward on a copy, with no new
pods, until the pods already created have their addresses (or have failed for want of one); what is left over is
then what the denied pod could have had. The pod is judged as its owner wrote it, without ipguard's steering.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from webhook.sim import ipamd as ip
from webhook.sim.addresses import BLOCK
from webhook.sim.cluster import ZONE_LABEL, Cluster
from webhook.sim.scheduler import NodeView, affinity_matches, fits, wants_pod_eni

HORIZON = 120.0  # long enough for ipamd to serve every pod already in flight (one pool step per 5 s)


def held_free(node: ip.Ipamd) -> int:
    """Addresses the node's ipamd holds and has given to no pod (cooling ones included: a pod gets them soon)."""
    return sum(c.size - len(c.assigned) for e in node.enis.values() for c in e.cidrs)


class Oracle:
    """Played forward once per simulated second; pods created since in that second count as claims on the
    places left, and so do the denied pods like this one already judged able to run (had they been admitted,
    they would have taken a place), so a denial is false only if there are more places than all those pods."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._places: dict[str, int] = {}
        self._claimed: dict[str, int] = {}  # denied pods judged able to run since the last settle, by shape
        self._settled: tuple[float, int, Cluster] | None = None

    def could_have_run(self, pod: dict[str, Any], now: float) -> bool:
        if self._settled is None or self._settled[0] != now:
            self._settled = (now, self.cluster.created, settle(self.cluster, now))
            self._places = {}
            self._claimed = {}
        _, created_then, clone = self._settled
        spec = pod.get("spec") or {}
        key = json.dumps([spec.get(k) for k in ("nodeName", "nodeSelector", "affinity", "tolerations", "containers")],
                         sort_keys=True)
        if key not in self._places:
            self._places[key] = places(clone, pod)
        claimed = self._claimed.get(key, 0)
        if self._places[key] > self.cluster.created - created_then + claimed:
            self._claimed[key] = claimed + 1
            return True
        return False


def settle(cluster: Cluster, now: float) -> Cluster:
    """A copy of the cluster played forward, with no new pods, until the pods in flight have an address or have
    failed (or HORIZON passes). Nobody listens to the copy."""
    # Pod and node objects are never changed in place (the cluster builds new ones): share them, copy the state.
    memo: dict[int, Any] = {id(cluster.listeners): []}
    for pod in cluster.pods.values():
        memo[id(pod.obj)] = pod.obj
    for node in cluster.nodes.values():
        memo[id(node.obj)] = node.obj
    clone = copy.deepcopy(cluster, memo)
    t = now
    while t < now + HORIZON and (clone.pending or any(not p.sandbox_failed for p in clone.starting.values())):
        clone.step(t, 1.0)
        t += 1.0
    clone.now = t
    return clone


def _waiting(cluster: Cluster, node: str, branch: bool = False) -> int:
    return sum(1 for p in cluster.starting.values() if p.node == node and p.branch == branch)


def _pod_subnet(node: ip.Ipamd) -> str:
    if node.settings.cni.custom_networking and node.eni_config_subnet:
        return node.eni_config_subnet
    return node.primary_subnet


def subnet_spare(cluster: Cluster) -> dict[str, int]:
    """Per subnet: free addresses (free /28s under prefix delegation) less what the pods still waiting on its nodes,
    beyond those nodes' own unassigned addresses, would take from it (branch pods: one address each)."""
    deficit: dict[str, int] = {}
    for node in cluster.nodes.values():
        short = max(0, _waiting(cluster, node.view.name) - held_free(node.ipamd))
        subnet = _pod_subnet(node.ipamd)
        deficit[subnet] = deficit.get(subnet, 0) + (-(-short // BLOCK) if node.ipamd.prefix_mode else short)
        deficit[node.branch_subnet] = deficit.get(node.branch_subnet, 0) + _waiting(cluster, node.view.name, True)
    prefix = cluster.settings.cni.prefix_delegation
    return {
        sid: (s.space.free_block_count if prefix else s.space.free_count) - deficit.get(sid, 0)
        for sid, s in cluster.ec2.subnets.items()
    }


UNBOUNDED = 1 << 30  # a zone where the autoscaler could add a node: as many places as wanted


def places(cluster: Cluster, pod: dict[str, Any]) -> int:
    """How many pods like this one could still get an address: unclaimed addresses on the nodes the scheduler could
    pick, plus what the subnets those nodes can still grow from have to spare (each subnet counted once), or
    UNBOUNDED where the autoscaler could add a node that gets one."""
    branch = wants_pod_eni(pod)
    pinned = (pod.get("spec") or {}).get("nodeName")
    spare = subnet_spare(cluster)
    count = 0
    growable: set[str] = set()
    for node in cluster.nodes.values():
        if (pinned and node.view.name != pinned) or not fits(pod, node.view, branch):
            continue
        if branch:
            limit = node.ipamd.limits.branch_enis
            if node.trunk is not None and len(node.branches) < limit:
                growable.add(node.branch_subnet)
            continue
        count += max(0, held_free(node.ipamd) - _waiting(cluster, node.view.name))
        if ip.growth_possible(node.ipamd, cluster.now, ignore_timers=True):
            growable.add(_pod_subnet(node.ipamd))
            # attached ENIs with free slots grow from their own subnet, wherever new ENIs now go
            growable.update(e.subnet_id for e in ip.allocatable_enis(node.ipamd, shuffle=False))
    prefix = cluster.settings.cni.prefix_delegation and not branch
    count += sum(max(0, spare.get(s, 0)) * (BLOCK if prefix else 1) for s in growable)
    config = cluster.autoscaler
    if pinned or config is None or cluster.launched + len(cluster.launches) >= config.max_nodes:
        return count
    for zone in config.subnets:
        probe = NodeView("new", zone, {ZONE_LABEL: zone, "kubernetes.io/os": "linux",
                                       "node.kubernetes.io/instance-type": config.instance_type}, [], 1, 1)
        if affinity_matches(pod, probe) and cluster.fresh_node_could_get_address(zone, branch):
            return UNBOUNDED
    return count
