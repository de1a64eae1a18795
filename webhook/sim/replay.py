"""A scenario run twice from the same start: without ipguard (pods go straight to the scheduler) and with it
(each pod through mutate and validate, answered by one or more replicas fed by the simulated cluster).

Counts per run: pods that ran, sandbox failures (pods whose sandbox failed for want of an address), pods left
Pending, pods stuck without a sandbox, pods steered and denied, and false denials: a pod denied while the
simulation's own state showed a node in its allowed zones that the scheduler could pick and whose ipamd could
give it an address, or a zone where the autoscaler could add a node that gets one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from webhook.model.limits import LimitsTable
from webhook.sim.cluster import Cluster, SimPod
from webhook.sim.feed import Replica, admit
from webhook.sim.oracle import Oracle, held_free
from webhook.sim.scenario import Scenario, build_cluster
from webhook.sim.workload import Cordon, Create, Delete, EniConfigChange, Timeline


class Progress(Protocol):
    """Told which run starts, then the simulated time as it passes."""

    def start(self, label: str) -> None: ...
    def __call__(self, now: float, duration: float) -> None: ...


@dataclass(slots=True)
class RunCounts:
    created: int = 0
    running: int = 0
    sandbox_failures: int = 0
    pending: int = 0
    stuck: int = 0
    waited: int = 0
    steered: int = 0
    denied: int = 0
    false_denials: int = 0
    causes: Counter[str] = field(default_factory=Counter)
    denied_pods: list[str] = field(default_factory=list)
    false_denial_pods: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ZonePicture:
    zone: str
    nodes: int
    pods: int
    held_free: int  # addresses held by nodes' ipamd and given to no pod
    subnet_free: int
    free_blocks: int


@dataclass(slots=True)
class RunResult:
    scenario: str
    with_ipguard: bool
    counts: RunCounts
    zones: list[ZonePicture]
    nodes_added: int = 0
    reviews: int = 0  # admission reviews answered, and their wall time
    review_seconds: float = 0.0


def run(scenario: Scenario, *, with_ipguard: bool, settings: dict[str, str] | None = None,
        replicas: int | None = None, progress: Progress | None = None, limits: LimitsTable | None = None) -> RunResult:
    limits = limits or LimitsTable()
    cluster = build_cluster(scenario, limits)
    options = scenario.options
    data = {"mode": "enforce", "zoneReserve": "0", "nodeReserve": "0", **scenario.settings, **(settings or {})}
    guards: list[Replica] = []
    if with_ipguard:
        count = replicas or options.replicas
        for i in range(count):
            guards.append(Replica(cluster, data, watch_lag=options.watch_lag + 0.5 * i, ec2_period=options.ec2_period,
                                  ec2_phase=options.ec2_period * i / count))
    timeline = Timeline(scenario)
    oracle = Oracle(cluster)
    counts = RunCounts()
    created: list[SimPod] = []
    calls = 0
    now = 0.0
    step = options.step
    while now <= scenario.duration:
        cluster.now = now
        for guard in guards:
            guard.advance(now)
        for action in timeline.due(now):
            if isinstance(action, Create):
                counts.created += 1
                pod = action.template
                name = action.key.split("/", 1)[1]
                if guards:
                    # Calls go to the replicas in turn: pod i's mutate to replica i, its validate to replica i + 1.
                    mutating, validating = guards[calls % len(guards)], guards[(calls + 1) % len(guards)]
                    calls += 1
                    admission = admit(mutating, validating, pod, name)
                    if not admission.allowed:
                        counts.denied += 1
                        counts.denied_pods.append(action.key)
                        if oracle.could_have_run(action.template, now):
                            counts.false_denials += 1
                            counts.false_denial_pods.append(action.key)
                        continue
                    counts.steered += admission.steered
                    pod = admission.pod
                else:
                    pod = {**pod, "metadata": {**pod["metadata"], "name": name}}
                created.append(cluster.create_pod(action.key, pod, now, runs_for=action.runs_for,
                                                  groups=action.groups, owner=action.owner))
            elif isinstance(action, Delete):
                _delete(cluster, action, now)
            elif isinstance(action, Cordon):
                cluster.cordon(action.node)
            elif isinstance(action, EniConfigChange) and action.node is not None:
                cluster.select_eni_config(action.node, action.config)
            elif isinstance(action, EniConfigChange) and action.subnet is not None:
                cluster.set_eni_config_subnet(action.config, action.subnet)
        cluster.step(now, step)
        if progress is not None:
            progress(now, scenario.duration)
        now += step
    for sim_pod in created:
        counts.running += sim_pod.started is not None
        counts.sandbox_failures += sim_pod.sandbox_failed
        counts.waited += sim_pod.waited
        if sim_pod.sandbox_failed:
            counts.causes[sim_pod.failure_cause or "?"] += 1
        if sim_pod.phase == "Pending" and sim_pod.node is None:
            counts.pending += 1
        elif sim_pod.started is None and sim_pod.phase != "Deleted":
            counts.stuck += 1
    return RunResult(scenario.name, with_ipguard, counts, zone_picture(cluster, now), cluster.launched,
                     sum(g.reviews for g in guards), sum(g.review_seconds for g in guards))


def _delete(cluster: Cluster, action: Delete, now: float) -> None:
    """A ReplicaSet scaling down: pending pods first, then the newest."""
    pods = [p for p in cluster.pods.values() if p.owner == action.owner and p.phase in ("Pending", "Running")]
    if action.generation is not None:
        pods = [p for p in pods if p.obj["metadata"]["labels"].get("generation") == str(action.generation)]
    pods.sort(key=lambda p: (p.node is not None, p.started is not None, -p.created))
    for pod in pods[: action.count]:
        cluster.delete_pod(pod.key, now)


def zone_picture(cluster: Cluster, now: float) -> list[ZonePicture]:
    zones: dict[str, list[Any]] = {}
    for node in cluster.nodes.values():
        entry = zones.setdefault(node.view.zone, [0, 0, 0])
        entry[0] += 1
        entry[1] += sum(1 for _ in node.ipamd.pods) + len(node.branches)
        entry[2] += held_free(node.ipamd)
    pictures = []
    for zone in sorted(zones):
        nodes, pods, held = zones[zone]
        subnets = [s for s in cluster.ec2.subnets.values() if s.zone == zone]
        pictures.append(ZonePicture(zone, nodes, pods, held, sum(s.space.free_count for s in subnets),
                                    sum(s.space.free_block_count for s in subnets)))
    return pictures


@dataclass(slots=True)
class Comparison:
    scenario: str
    without: RunResult
    with_ipguard: RunResult
    reserve_for_zero: int | None = None  # two-replica scenarios: the smallest zoneReserve with no sandbox failure

    def as_json(self) -> dict[str, Any]:
        w, g = self.without.counts, self.with_ipguard.counts
        result: dict[str, Any] = {
            "scenario": self.scenario,
            "without": {"running": w.running, "sandbox_failures": w.sandbox_failures, "pending": w.pending},
            "with": {"running": g.running, "sandbox_failures": g.sandbox_failures, "pending": g.pending,
                     "steered": g.steered, "denied": g.denied, "false_denials": g.false_denials},
        }
        if self.reserve_for_zero is not None:
            result["reserve_for_zero_failures"] = self.reserve_for_zero
        return result


def compare(scenario: Scenario, *, mode: str = "enforce", progress: Progress | None = None,
            find_reserve: bool | None = None, max_reserve: int = 40) -> Comparison:
    """Both runs; for a scenario with two or more replicas, also the smallest reserve with no sandbox failure."""
    if progress is not None:
        progress.start(f"{scenario.name}: without ipguard")
    without = run(scenario, with_ipguard=False, progress=progress)
    if progress is not None:
        progress.start(f"{scenario.name}: with ipguard")
    with_ipguard = run(scenario, with_ipguard=True, settings={"mode": mode}, progress=progress)
    comparison = Comparison(scenario.name, without, with_ipguard)
    if find_reserve if find_reserve is not None else scenario.options.replicas > 1:
        comparison.reserve_for_zero = smallest_reserve(scenario, mode, with_ipguard.counts.sandbox_failures,
                                                       progress, max_reserve)
    return comparison


def smallest_reserve(scenario: Scenario, mode: str, failures_at_zero: int, progress: Progress | None = None,
                     max_reserve: int = 40) -> int | None:
    """The smallest zoneReserve with no sandbox failure (None: not within max_reserve): doubling, then bisecting,
    as failures fall when the reserve grows."""
    if failures_at_zero == 0:
        return 0

    def failures(reserve: int) -> int:
        if progress is not None:
            progress.start(f"{scenario.name}: zoneReserve {reserve}")
        result = run(scenario, with_ipguard=True, settings={"mode": mode, "zoneReserve": str(reserve)},
                     progress=progress)
        return result.counts.sandbox_failures

    low, high = 0, 1
    while failures(high) > 0:
        if high >= max_reserve:
            return None
        low, high = high, min(2 * high, max_reserve)
    while high - low > 1:
        middle = (low + high) // 2
        if failures(middle) > 0:
            low = middle
        else:
            high = middle
    return high
