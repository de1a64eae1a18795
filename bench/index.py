"""Capacity index benchmark: a synthetic cluster of 5,000 nodes and 150,000 pods in 6 zones.

Prints build time, pod-event apply rate, decision latency (median, p99) for a pod with a zone affinity and for
one selecting a node group (listed from the label index), and index memory per pod.
Targets on a 2-core machine: build < 3 s, >= 100,000 pod events/s, decision median < 20 us and p99 < 100 us,
<= 600 bytes per pod.

    python bench/index.py [--nodes 5000] [--pods 150000] [--zones 6]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webhook.model.cni import CniSettings
from webhook.model.config import Settings
from webhook.model.decide import Decision, decide
from webhook.model.index import CapacityIndex, Clock, PodUse
from webhook.model.limits import LimitsTable

GROUPS = 10  # node groups, spread over the zones
TYPES = ["m5.large", "m5.xlarge", "m5.2xlarge", "c5.xlarge", "c5.4xlarge", "r5.2xlarge", "m5.4xlarge"]


def build(nodes: int, pods: int, zones: int, seed: int = 7, *, kind: type[CapacityIndex] = CapacityIndex,
          clock: Clock = time.monotonic) -> tuple[CapacityIndex, list[str]]:
    rng = random.Random(seed)
    index = kind(LimitsTable(), CniSettings(), clock=clock)
    zone_names = [f"us-east-1{chr(ord('a') + z)}" for z in range(zones)]
    node_names = []
    for i in range(nodes):
        zone = zone_names[i % zones]
        name = f"ip-10-{i // 250}-{i % 250}.ec2.internal"
        node_names.append(name)
        index.upsert_node(
            name,
            zone=zone,
            instance_type=TYPES[i % len(TYPES)],
            pod_subnet=f"subnet-{zone}-{i % 3}",
            allocatable_pods=110,
            labels={"topology.kubernetes.io/zone": zone, "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64", "node.kubernetes.io/instance-type": TYPES[i % len(TYPES)],
                    "eks.amazonaws.com/nodegroup": f"ng-{i % GROUPS}", "eks.amazonaws.com/capacityType": "ON_DEMAND"},
        )
    for p in range(pods):
        node = node_names[p % nodes]
        use = PodUse.NONE if p % 30 == 0 else PodUse.IP
        index.upsert_pod(f"ns-{p % 200}/pod-{p}", node, use)
    # Subnet figures last, as EC2 reports them: with these pods and warm pools already in place.
    for zone in zone_names:
        for s in range(3):
            index.upsert_subnet(f"subnet-{zone}-{s}", zone=zone, free_ips=rng.randint(0, 4000))
    return index, node_names




def timed_decisions(index: CapacityIndex, settings: Settings, pod: dict[str, Any],
                    count: int) -> tuple[float, float, Decision]:
    """Median and p99 latency (us) of `count` decisions; every fifth one takes a reservation as /validate does."""
    latencies = []
    clock = time.perf_counter_ns
    decision = None
    for i in range(count):
        t = clock()
        decision = decide(pod, index, settings, namespace="payments")
        latencies.append(clock() - t)
        if i % 5 == 0 and decision.reserve_zone:
            index.reserve(f"payments/bench-{i}-{id(pod)}", decision.reserve_zone)
    assert decision is not None
    latencies.sort()
    return statistics.median(latencies) / 1000, latencies[int(len(latencies) * 0.99)] / 1000, decision


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--pods", type=int, default=150_000)
    parser.add_argument("--zones", type=int, default=6)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--decisions", type=int, default=20_000)
    args = parser.parse_args()

    gc.collect()
    t0 = time.perf_counter()
    index, node_names = build(args.nodes, args.pods, args.zones)
    build_s = time.perf_counter() - t0

    # Pod events: a churn of deletes and re-adds on other nodes, as a rolling deployment produces.
    rng = random.Random(11)
    keys = list(index.pods)
    ops = []
    for _ in range(args.events // 2):
        key = keys[rng.randrange(len(keys))]
        ops.append((key, node_names[rng.randrange(len(node_names))]))
    t0 = time.perf_counter()
    for key, node in ops:
        index.remove_pod(key)
        index.upsert_pod(key, node, PodUse.IP)
    events_s = time.perf_counter() - t0
    rate = 2 * len(ops) / events_s

    # Decisions on a Deployment pod with a zone affinity.
    settings = Settings(zone_reserve=5)
    pod = {
        "metadata": {"generateName": "api-7d9c8b6f5d-", "namespace": "payments", "labels": {"app": "api"}},
        "spec": {
            "containers": [{"name": "api", "image": "api:1"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "NotIn",
                                                   "values": ["us-east-1f"]}]}
                        ]
                    }
                }
            },
        },
    }
    median_us, p99_us, decision = timed_decisions(index, settings, pod, args.decisions)
    # The same for a pod selecting one node group (500 nodes): judged on the group's nodes first.
    group_pod = {"metadata": {"generateName": "train-5f6d7c8b9a-", "namespace": "payments"},
                 "spec": {"containers": [{"name": "train", "image": "train:1"}],
                          "nodeSelector": {"eks.amazonaws.com/nodegroup": "ng-3"}}}
    group_median_us, group_p99_us, group_decision = timed_decisions(index, settings, group_pod, args.decisions)
    # Its worst case: no node of the group can take it (cordoned here), so every change of the index makes the
    # next decision walk the whole group.
    for entry in [index.nodes[n] for n in index.nodes_labelled("eks.amazonaws.com/nodegroup", "ng-3")]:
        index.upsert_node(entry.name, zone=entry.zone, instance_type=entry.instance_type,
                          pod_subnet=entry.pod_subnet, allocatable_pods=110, schedulable=False, cordoned=True)
    dry_median_us, dry_p99_us, dry_decision = timed_decisions(index, settings, group_pod, args.decisions)

    # Memory: the index built again under tracemalloc (slower, so not timed).
    del index
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    index2, _ = build(args.nodes, args.pods, args.zones)
    total = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    tracemalloc.stop()
    per_pod = total / args.pods

    print(f"cluster: {args.nodes} nodes, {args.pods} pods, {args.zones} zones")
    print(f"build:            {build_s:8.2f} s        (target < 3 s)")
    print(f"pod events:       {rate:8.0f} /s       (target >= 100000/s)")
    print(f"decision median:  {median_us:8.1f} us       (target < 20 us)")
    print(f"decision p99:     {p99_us:8.1f} us       (target < 100 us)")
    print(f"node group median:{group_median_us:8.1f} us       (a pod selecting 1 of {GROUPS} node groups)")
    print(f"node group p99:   {group_p99_us:8.1f} us       ({group_decision.verdict.value})")
    print(f"dry group median: {dry_median_us:8.1f} us       (none of its {args.nodes // GROUPS} nodes can take it)")
    print(f"dry group p99:    {dry_p99_us:8.1f} us       ({dry_decision.verdict.value}: walks the group when the "
          "index changed)")
    print(f"memory per pod:   {per_pod:8.0f} bytes    (target <= 600; whole index {total / 2**20:.1f} MiB)")
    print(f"last decision: {decision.verdict.value} ({decision.reason}); pods indexed {len(index2.pods)}")


if __name__ == "__main__":
    main()
