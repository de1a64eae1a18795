"""Sources benchmark: ipguard's Kubernetes list+watch (kube.Reflector -> cluster handlers -> CapacityIndex) at scale.

The fake API server (tests/fakekube) runs in a SEPARATE, spawned process, so its CPU and memory are not ipguard's:
with 2 cores it is pinned to CPU 1 and the benchmark (ipguard) to CPU 0 (--no-pin leaves placement to the kernel).
It is loaded with an EKS-like cluster: N nodes over 6 zones (zone, instance type, nodegroup labels, providerID,
allocatable pods) and M pods (~1.7 KB each as listed: labels, ownerReferences, a container with resources,
nodeName, phase Running, podIP; two hostNetwork DaemonSet pods per node, 1 in 40 Deployments with a pod-eni
request), plus namespaces and the aws-node DaemonSet.

In this process, ipguard is wired as `Service` wires it (an ApiClient, a CapacityIndex, a ClusterFeed and one
Reflector per watched resource) and measured in three steps:

  sync    from starting the reflectors until nodes and pods are synced and the index holds every pod
          (paginated lists of 500, the Reflector default); RSS (VmRSS) before and after.
  watch   the apply rate of watch events. The server is paused (answers 503, open watches end cleanly) while it
          writes a burst of pod events (status MODIFIED, moves/binds, creates, deletes) into its history; the
          reflectors keep their resourceVersion and retry. On resume they re-watch from it, and the server
          replays the whole backlog from its history as fast as the connection takes it. So the rate, counted
          from the first to the last event applied (the pods reflector's `events` counter, sampled every 2 ms),
          is ipguard's read+parse+apply rate, not the server's write rate; the CPU time of both processes over
          that window is printed to show which side was busy.
  check   index.aggregates() == index.recount(), pod and node counts equal to the server's, and the watched
          index equal to a fresh index built from a new list (every pod entry and every aggregate).

Targets on a 2-core machine: sync < 30 s, RSS < 400 MB after sync, >= 20,000 watch events/s.

    python bench/sources.py [--nodes 5000] [--pods 150000] [--events 100000] [--page-size 500] [--profile]
                            [--trace-memory] [--no-pin]
    python bench/sources.py --quick     # 200 nodes, 6,000 pods, 20,000 events

--profile runs cProfile around the sync and around the watch replay and prints where the time goes (timings
under the profiler are slower); --trace-memory runs tracemalloc over the sync and prints where the memory goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import logging
import multiprocessing
import os
import pstats
import random
import sys
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from webhook.model.config import Settings
from webhook.model.index import CapacityIndex
from webhook.sources.cluster import ClusterFeed
from webhook.sources.kube import Backoff, Reflector, api_client, watched_resources

REPO = Path(__file__).resolve().parent.parent
ZONES = [f"us-east-1{c}" for c in "abcdef"]
ZONE_IDS = [f"use1-az{i}" for i in (1, 2, 4, 6, 3, 5)]
# instance type -> allocatable pods (EKS max-pods); mean ~104, so 150,000 pods on 5,000 nodes fit
TYPES = {"m5.xlarge": 58, "m5.2xlarge": 58, "c5.4xlarge": 234, "r5.2xlarge": 58, "m5.4xlarge": 234,
         "m5.large": 29, "c5.xlarge": 58}
TYPE_NAMES = list(TYPES)
NAMESPACES = 200
REPLICAS = 30  # pods per Deployment
SAFE = "bcdfghjklmnpqrstvwxz2456789"  # the characters of generated names
SERVER_CPU, BENCH_CPU = 1, 0


# ==================================================================================================================
# The synthetic cluster (built in the server process)
# ==================================================================================================================


def _name(n: int, length: int) -> str:
    out = []
    n = (n * 2654435761 + 40503) & 0xFFFFFFFFFFFF
    for _ in range(length):
        n, r = divmod(n, len(SAFE))
        out.append(SAFE[r])
    return "".join(out)


def _uid(n: int, salt: int) -> str:
    h = f"{(n * 0x9E3779B97F4A7C15 + salt * 0xC2B2AE3D27D4EB4F) & ((1 << 128) - 1):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"


@dataclass(frozen=True, slots=True)
class NodeRef:
    name: str
    zone: str
    ip: str


def node_ref(i: int) -> NodeRef:
    z, k = i % len(ZONES), i // len(ZONES)
    ip = f"10.{z}.{k // 250}.{k % 250 + 4}"
    return NodeRef(f"ip-{ip.replace('.', '-')}.ec2.internal", ZONES[z], ip)


def node_object(i: int) -> dict[str, Any]:
    ref = node_ref(i)
    z = i % len(ZONES)
    itype = TYPE_NAMES[(i // len(ZONES)) % len(TYPE_NAMES)]
    pods = str(TYPES[itype])
    nodegroup = f"ng-{itype.split('.')[0]}"
    instance = f"i-0{(i * 2654435761 + 977) % 16**16:016x}"
    capacity = {"cpu": "8", "ephemeral-storage": "104845292Ki", "hugepages-1Gi": "0", "hugepages-2Mi": "0",
                "memory": "32386544Ki", "pods": pods}
    return {
        "metadata": {
            "name": ref.name,
            "labels": {
                "beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/instance-type": itype,
                "beta.kubernetes.io/os": "linux", "eks.amazonaws.com/capacityType": "ON_DEMAND",
                "eks.amazonaws.com/nodegroup": nodegroup, "eks.amazonaws.com/nodegroup-image": "ami-0abcdef1234567890",
                "failure-domain.beta.kubernetes.io/region": "us-east-1",
                "failure-domain.beta.kubernetes.io/zone": ref.zone, "k8s.io/cloud-provider-aws": "0123456789abcdef",
                "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": ref.name, "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": itype, "topology.k8s.aws/zone-id": ZONE_IDS[z],
                "topology.kubernetes.io/region": "us-east-1", "topology.kubernetes.io/zone": ref.zone,
            },
            "annotations": {"alpha.kubernetes.io/provided-node-ip": ref.ip, "node.alpha.kubernetes.io/ttl": "0",
                            "volumes.kubernetes.io/controller-managed-attach-detach": "true"},
        },
        "spec": {"providerID": f"aws:///{ref.zone}/{instance}"},
        "status": {
            "capacity": capacity,
            "allocatable": {**capacity, "cpu": "7910m", "memory": "31369712Ki"},
            "conditions": [
                {"type": t, "status": "False", "lastHeartbeatTime": "2026-11-26T08:50:43Z",
                 "lastTransitionTime": "2026-11-26T08:50:43Z", "reason": f"KubeletHas{r}", "message": m}
                for t, r, m in (("MemoryPressure", "SufficientMemory", "kubelet has sufficient memory available"),
                                ("DiskPressure", "NoDiskPressure", "kubelet has no disk pressure"))
            ] + [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-11-26T08:50:43Z",
                  "lastTransitionTime": "2026-11-26T08:50:43Z", "reason": "KubeletReady",
                  "message": "kubelet is posting ready status"}],
            "addresses": [{"type": "InternalIP", "address": ref.ip}, {"type": "Hostname", "address": ref.name},
                          {"type": "InternalDNS", "address": ref.name}],
            "nodeInfo": {"machineID": _uid(i, 1).replace("-", ""), "systemUUID": _uid(i, 2),
                         "bootID": _uid(i, 3), "kernelVersion": "6.1.112-124.190.amzn2023.x86_64",
                         "osImage": "Amazon Linux 2023.6.20241111", "containerRuntimeVersion": "containerd://1.7.23",
                         "kubeletVersion": "v1.31.2-eks-94953ac", "kubeProxyVersion": "v1.31.2-eks-94953ac",
                         "operatingSystem": "linux", "architecture": "amd64"},
        },
    }


_TOLERATIONS = [
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
]


def pod_object(j: int, ds_pods: int, node: NodeRef | None, restarts: int, ip_n: int) -> dict[str, Any]:
    """Pod number j: DaemonSet pods (hostNetwork, two per node) first, then Deployment pods. `node` None: Pending."""
    if j < ds_pods:
        app = ("aws-node", "kube-proxy")[j % 2]
        namespace, owner_kind, owner = "kube-system", "DaemonSet", app
        name = f"{app}-{_name(j, 5)}"
        labels = {"k8s-app": app, "controller-revision-hash": "6b9d8f7c5d", "pod-template-generation": "1"}
        image = f"602401143452.dkr.ecr.us-east-1.amazonaws.com/eks/{app}:v1.19.0-eksbuild.1"
        host_network, pod_eni, owner_n = True, False, j % 2
    else:
        d = (j - ds_pods) // REPLICAS
        app, template_hash = f"svc-{_name(d, 6)}", _name(d + 7, 10)
        namespace, owner_kind, owner = f"team-{d % NAMESPACES:03d}", "ReplicaSet", f"{app}-{template_hash}"
        name = f"{owner}-{_name(j, 5)}"
        labels = {"app.kubernetes.io/name": app, "pod-template-hash": template_hash}
        image = f"123456789012.dkr.ecr.us-east-1.amazonaws.com/{app}:1.{d % 40}.{d % 7}"
        host_network, pod_eni, owner_n = False, d % 40 == 0, d + 2
    requests = {"cpu": "250m", "memory": "256Mi"}
    limits = {"memory": "512Mi"}
    if pod_eni:
        requests["vpc.amazonaws.com/pod-eni"] = limits["vpc.amazonaws.com/pod-eni"] = "1"
    spec: dict[str, Any] = {
        "containers": [{
            "name": app.split("-")[0], "image": image,
            "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
            "resources": {"limits": limits, "requests": requests},
            "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
            "imagePullPolicy": "IfNotPresent",
        }],
        "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default",
    }
    if node is not None:
        spec["nodeName"] = node.name
    if host_network:
        spec["hostNetwork"] = True
    spec |= {"securityContext": {}, "schedulerName": "default-scheduler", "tolerations": _TOLERATIONS,
             "priority": 0, "enableServiceLinks": True, "preemptionPolicy": "PreemptLowerPriority"}
    if node is None:
        status: dict[str, Any] = {"phase": "Pending", "qosClass": "Burstable"}
    else:
        pod_ip = node.ip if host_network else f"10.{node.ip.split('.')[1]}.{64 + (ip_n // 250) % 190}.{ip_n % 250 + 4}"
        status = {
            "phase": "Running", "hostIP": node.ip, "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
            "startTime": "2026-11-26T08:50:51Z",
            "containerStatuses": [{"name": app.split("-")[0], "ready": True, "restartCount": restarts,
                                   "state": {"running": {"startedAt": f"2026-11-26T09:{restarts % 60:02d}:00Z"}}}],
            "qosClass": "Burstable",
        }
    return {
        "metadata": {
            "name": name, "generateName": name[:-5], "namespace": namespace, "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner_kind, "name": owner,
                                 "uid": _uid(owner_n, 4), "controller": True,
                                 "blockOwnerDeletion": True}],
        },
        "spec": spec,
        "status": status,
    }


def aws_node_daemonset() -> dict[str, Any]:
    env = {"WARM_ENI_TARGET": "1", "ENABLE_PREFIX_DELEGATION": "false", "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "false",
           "ENABLE_POD_ENI": "true", "ENABLE_IPv6": "false", "AWS_VPC_K8S_CNI_LOGLEVEL": "DEBUG"}
    return {
        "metadata": {"name": "aws-node", "namespace": "kube-system", "labels": {"k8s-app": "aws-node"}},
        "spec": {
            "selector": {"matchLabels": {"k8s-app": "aws-node"}},
            "template": {"metadata": {"labels": {"k8s-app": "aws-node"}}, "spec": {"hostNetwork": True, "containers": [
                {"name": "aws-node", "image": "602401143452.dkr.ecr.us-east-1.amazonaws.com/amazon-k8s-cni:v1.19.0",
                 "env": [{"name": k, "value": v} for k, v in env.items()]}]}},
            "updateStrategy": {"type": "RollingUpdate"},
        },
    }


@dataclass
class ClusterState:
    """What the server process keeps to write realistic updates: per pod, its node, restarts and IP number."""

    nodes: list[NodeRef]
    ds_pods: int
    node_of: list[int] = field(default_factory=list)  # -1: Pending (unscheduled); -2: deleted
    restarts: list[int] = field(default_factory=list)
    ip_of: list[int] = field(default_factory=list)
    alive: list[int] = field(default_factory=list)  # Deployment pods that exist (for random picks)
    where: dict[int, int] = field(default_factory=dict)  # pod -> position in `alive`
    ips: int = 0

    def obj(self, j: int) -> dict[str, Any]:
        n = self.node_of[j]
        return pod_object(j, self.ds_pods, self.nodes[n] if n >= 0 else None, self.restarts[j], self.ip_of[j])

    def add(self, node: int) -> int:
        j = len(self.node_of)
        self.node_of.append(node)
        self.restarts.append(0)
        self.ip_of.append(self.ips)
        self.ips += 1
        if j >= self.ds_pods:
            self.where[j] = len(self.alive)
            self.alive.append(j)
        return j

    def remove(self, j: int) -> None:
        pos = self.where.pop(j)
        last = self.alive.pop()
        if last != j:
            self.alive[pos] = last
            self.where[last] = pos
        self.node_of[j] = -2


def build_cluster(nodes: int, pods: int, seed: int) -> tuple[ClusterState, list[dict[str, Any]]]:
    rng = random.Random(seed)
    refs = [node_ref(i) for i in range(nodes)]
    ds_pods = 2 * nodes if pods >= 4 * nodes else 0
    state = ClusterState(refs, ds_pods)
    for j in range(ds_pods):
        state.add(j // 2)
    weights = [TYPES[TYPE_NAMES[(i // len(ZONES)) % len(TYPE_NAMES)]] for i in range(nodes)]
    for node in rng.choices(range(nodes), weights=weights, k=pods - ds_pods):
        state.add(node)
    return state, [node_object(i) for i in range(nodes)]


# ==================================================================================================================
# The server process
# ==================================================================================================================


def server_process(conn: Connection, history_limit: int, pin: bool) -> None:
    if pin:
        os.sched_setaffinity(0, {SERVER_CPU})
    asyncio.run(_serve(conn, history_limit))


async def _serve(conn: Connection, history_limit: int) -> None:
    from tests.fakekube import FakeKube

    # No bookmarks during the run: the watch counters then count object events only.
    fk = FakeKube(history_limit=history_limit, bookmark_interval=3600)
    conn.send(("ok", await fk.start()))
    loop = asyncio.get_running_loop()
    state: ClusterState | None = None
    while True:
        command, kwargs = await loop.run_in_executor(None, conn.recv)
        try:
            if command == "load":
                state, reply = await _load(fk, **kwargs)
            elif command == "pause":
                await fk.pause("503")  # open watches end cleanly; every request gets 503 until resume
                for _ in range(3000):  # until the streams have ended (they close at once)
                    if not fk.watcher_count():
                        break
                    await asyncio.sleep(0.01)
                reply = {"rv": fk.resource_version}
            elif command == "burst":
                assert state is not None
                reply = await _burst(fk, state, **kwargs)
            elif command == "resume":
                await fk.resume()
                reply = {"cpu": time.process_time()}
            elif command == "state":
                reply = {"pods": fk.count("pods"), "nodes": fk.count("nodes"), "rv": fk.resource_version,
                         "cpu": time.process_time()}
            elif command == "stop":
                await fk.stop()
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown command {command!r}")
        except Exception:
            conn.send(("error", traceback.format_exc()))
            continue
        conn.send(("ok", reply))


async def _load(fk: Any, nodes: int, pods: int, seed: int) -> tuple[ClusterState, dict[str, Any]]:
    t0 = time.perf_counter()
    state, node_objs = build_cluster(nodes, pods, seed)
    names = ["default", "kube-system", *(f"team-{i:03d}" for i in range(NAMESPACES))]
    await fk.create_many("namespaces", [{"metadata": {"name": n}, "spec": {"finalizers": ["kubernetes"]},
                                         "status": {"phase": "Active"}} for n in names])
    await fk.create("daemonsets", aws_node_daemonset())
    await fk.create_many("nodes", node_objs)
    await fk.create_many("pods", (state.obj(j) for j in range(len(state.node_of))))
    seconds = time.perf_counter() - t0
    raws = [e.raw for e in fk.store.resolve("pods").objects.values()]
    node_raws = [e.raw for e in fk.store.resolve("nodes").objects.values()]
    return state, {"seconds": seconds, "nodes": len(node_raws), "pods": len(raws),
                   "pod_bytes": sum(map(len, raws)) / max(1, len(raws)),
                   "node_bytes": sum(map(len, node_raws)) / max(1, len(node_raws)), "rv": fk.resource_version}


async def _burst(fk: Any, state: ClusterState, events: int, seed: int) -> dict[str, Any]:
    """Pod events in a realistic mix: 50% status MODIFIED (restarts), 20% moves (or binds of Pending pods),
    15% creates (half Pending, half bound and Running), 15% deletes. Each write is exactly one event."""
    rng = random.Random(seed)
    rv0, t0 = fk.resource_version, time.perf_counter()
    ops: Counter[str] = Counter()
    n_nodes = len(state.nodes)
    for i in range(events):
        r = rng.random()
        if r < 0.15 or not state.alive:
            j = state.add(rng.randrange(n_nodes) if rng.random() < 0.5 else -1)
            await fk.create("pods", state.obj(j))
            ops["create"] += 1
        elif r < 0.30 and len(state.alive) > 1:
            j = state.alive[rng.randrange(len(state.alive))]
            obj = state.obj(j)
            state.remove(j)
            await fk.delete("pods", obj["metadata"]["name"], namespace=obj["metadata"]["namespace"])
            ops["delete"] += 1
        elif r < 0.50:
            j = state.alive[rng.randrange(len(state.alive))]
            ops["bind" if state.node_of[j] < 0 else "move"] += 1
            state.node_of[j] = rng.randrange(n_nodes)
            state.ip_of[j] = state.ips
            state.ips += 1
            await fk.update("pods", state.obj(j))
        else:
            j = state.alive[rng.randrange(len(state.alive))]
            state.restarts[j] += 1
            await fk.update("pods", state.obj(j))
            ops["status"] += 1
        if i % 1000 == 999:
            await asyncio.sleep(0)  # answer the reflectors' retries now and then
    return {"seconds": time.perf_counter() - t0, "events": fk.resource_version - rv0, "ops": dict(ops),
            "pods": fk.count("pods"), "rv": fk.resource_version}


class ServerProcess:
    def __init__(self, history_limit: int, pin: bool) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=server_process, args=(child, history_limit, pin), name="fakekube",
                                   daemon=True)
        self.process.start()
        child.close()
        self.url: str = self.rpc("start")

    def rpc(self, command: str, **kwargs: Any) -> Any:
        if command != "start":
            self.conn.send((command, kwargs))
        status, reply = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"fake API server: {command} failed:\n{reply}")
        return reply

    async def arpc(self, command: str, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self.rpc, command, **kwargs)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.rpc("stop")
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# ==================================================================================================================
# Measuring
# ==================================================================================================================


def proc_status(field_name: str) -> float:
    """A /proc/self/status figure in MiB (VmRSS: resident now; VmHWM: the peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def machine_busy() -> float:
    """CPU-seconds all processes on the machine have used (from /proc/stat), to tell a contended run."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class GcTimer:
    """CPU time spent in the cyclic garbage collector (cProfile does not show it; CPU time, not wall time, so a
    busy machine does not inflate it)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections: Counter[int] = Counter()
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.process_time()
        else:
            self.seconds += time.process_time() - self._start
            self.collections[info["generation"]] += 1

    def take(self) -> tuple[float, dict[int, int]]:
        out = self.seconds, dict(self.collections)
        self.seconds, self.collections = 0.0, Counter()
        return out


def _short(path: str) -> str:
    for marker in ("site-packages/", str(REPO) + "/", "/lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def print_profile(title: str, profile: cProfile.Profile, top: int = 22) -> None:
    stats = pstats.Stats(profile)
    rows = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in rows.values())
    print(f"\n-- cProfile: {title} (total {total:.2f} s of tottime; file:line(function); the collector's pauses "
          "are charged to whatever allocated, mostly orjson.loads)")
    print(f"   {'tottime':>8} {'cumtime':>8} {'calls':>9}  function")
    for (path, line, func), (_, nc, tt, ct, _) in sorted(rows.items(), key=lambda kv: -kv[1][2])[:top]:
        print(f"   {tt:8.2f} {ct:8.2f} {nc:9d}  {_short(path)}:{line}({func})")
    by_file: Counter[str] = Counter()
    for (path, _, _), (_, _, tt, _, _) in rows.items():
        by_file[_short(path)] += tt
    print("   tottime by file:")
    for path, tt in by_file.most_common(10):
        print(f"   {tt:8.2f} {100 * tt / total:5.1f}%  {path}")
    print("   ipguard's functions (and the JSON parse) by cumulative time:")
    steps = [(ct, nc, _short(path), line, func) for (path, line, func), (_, nc, _, ct, _) in rows.items()
             if "/webhook/" in path or func == "<orjson.loads>"]
    for ct, nc, path, line, func in sorted(steps, reverse=True)[:14]:
        print(f"   {ct:8.2f} {nc:9d}  {path}:{line}({func})")


@dataclass
class Options:
    nodes: int
    pods: int
    events: int
    seed: int
    page_size: int
    profile: bool
    trace_memory: bool
    timeout: float


def wire(api: Any, page_size: int) -> tuple[CapacityIndex, dict[str, Reflector]]:
    """An index, a ClusterFeed and one Reflector per watched resource, as `Service` builds them."""
    settings = Settings()
    index = CapacityIndex(node_reserve=settings.node_reserve, reservation_ttl=settings.reservation_ttl)

    def apply_settings(new: Settings) -> None:
        index.set_node_reserve(new.node_reserve)
        index.set_reservation_ttl(new.reservation_ttl)

    feed = ClusterFeed(index, apply_settings)
    handlers = feed.handlers()
    reflectors = {
        w.kind: Reflector(w.kind, w.call, handlers[w.kind], optional=w.optional, page_size=page_size,
                          backoff=Backoff(initial=0.05, maximum=0.25))  # quick retries while the server is paused
        for w in watched_resources(api, feed.config_namespace, feed.config_name)
    }
    return index, reflectors


async def bench(server: ServerProcess, opts: Options, expected_pods: int, rss_before: float) -> bool:
    # The reflectors log a warning for every 503 they get while the server is paused on purpose (counted below).
    logging.getLogger("ipguard.kube").setLevel(logging.ERROR)
    gc_timer = GcTimer()
    gc.callbacks.append(gc_timer)
    ok = True

    # ---- wiring, as Service does ------------------------------------------------------------------------------
    api = await api_client(host=server.url)
    index, reflectors = wire(api, opts.page_size)
    nodes, pods = reflectors["nodes"], reflectors["pods"]

    async def until(condition: Callable[[], bool], what: str, step: float = 0.005) -> None:
        deadline = time.monotonic() + opts.timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(step)

    # ---- initial sync -----------------------------------------------------------------------------------------
    server_cpu0 = (await server.arpc("state"))["cpu"]
    if opts.trace_memory:
        tracemalloc.start(1)
        traced_base = tracemalloc.take_snapshot()
    profile = cProfile.Profile() if opts.profile else None
    gc_timer.take()
    cpu0, busy0 = time.process_time(), machine_busy()
    t0 = time.perf_counter()
    if profile:
        profile.enable()
    for reflector in reflectors.values():
        reflector.start()
    nodes_synced_at: list[float] = []

    def synced() -> bool:
        if nodes.synced and not nodes_synced_at:
            nodes_synced_at.append(time.perf_counter() - t0)
        return nodes.synced and pods.synced and len(index.pods) == expected_pods

    await until(synced, "the initial sync")
    sync_s = time.perf_counter() - t0
    if profile:
        profile.disable()
    sync_cpu, sync_busy = time.process_time() - cpu0, machine_busy() - busy0
    sync_gc, sync_gcs = gc_timer.take()
    server_sync_cpu = (await server.arpc("state"))["cpu"] - server_cpu0
    rss_sync, hwm_sync = proc_status("VmRSS"), proc_status("VmHWM")
    if opts.trace_memory:
        traced = tracemalloc.take_snapshot()
        tracemalloc.stop()
    tracked = len(gc.get_objects())
    full_gc = time.process_time()
    gc.collect()
    full_gc = time.process_time() - full_gc
    await until(lambda: all(r.synced for r in reflectors.values()), "every reflector to sync")
    await until(lambda: all(r.connected for r in reflectors.values() if not r.missing), "the watches to open")

    profiled = opts.profile or opts.trace_memory

    def mark(good: bool, judged: bool = True) -> str:
        nonlocal ok
        if not judged:
            return "not judged under a profiler"
        ok = ok and good
        return "ok" if good else "MISSED"

    print(f"\n== initial sync{' (under cProfile: slower)' if profile else ''}"
          f"{' (under tracemalloc: slower)' if opts.trace_memory else ''}")
    verdict = mark(sync_s < 30, not profiled)
    print(f"sync:               {sync_s:8.2f} s       (target < 30 s: {verdict}); nodes synced at "
          f"{nodes_synced_at[0] if nodes_synced_at else float('nan'):.2f} s; {pods.lists} pod list of "
          f"{-(-expected_pods // opts.page_size)} pages of {opts.page_size}")
    others = sync_busy - sync_cpu - server_sync_cpu  # CPU the run did not use: a contended machine
    print(f"  cpu:              ipguard {sync_cpu:6.2f} s ({100 * sync_cpu / sync_s:3.0f}% of the wall time), "
          f"fake server {server_sync_cpu:6.2f} s, other processes {max(0.0, others):.2f} s; "
          f"of ipguard's, gc {sync_gc:.2f} s (collections by generation {sync_gcs})")
    print(f"  rate:             {expected_pods / sync_s:8.0f} pods/s listed and indexed (wall); "
          f"{expected_pods / sync_cpu:.0f} pods per ipguard CPU-second")
    print(f"  gc now:           {tracked} objects tracked by the collector; a full collection takes "
          f"{1000 * full_gc:.0f} ms CPU")
    verdict = mark(rss_sync < 400, not opts.trace_memory)  # tracemalloc's own bookkeeping inflates RSS
    print(f"RSS after sync:     {rss_sync:8.1f} MiB     (target < 400 MB: {verdict}); before "
          f"{rss_before:.1f} MiB (imports loaded), delta {rss_sync - rss_before:+.1f} MiB, peak (VmHWM) "
          f"{hwm_sync:.1f} MiB")
    print(f"  index:            {len(index.pods)} pods, {sum(1 for n in index.nodes.values() if n.known)} nodes, "
          f"zones {sorted(index.zone_names())}")
    if profile:
        print_profile("initial sync", profile)
    if opts.trace_memory:
        stats = traced.compare_to(traced_base, "lineno")
        total = sum(s.size_diff for s in stats)
        print(f"\n-- tracemalloc: live Python memory after sync, +{total / 2**20:.1f} MiB "
              f"({total / expected_pods:.0f} bytes per pod), top lines:")
        for s in stats[:15]:
            frame = s.traceback[0]
            where = f"{_short(frame.filename)}:{frame.lineno}"
            print(f"   {s.size_diff / 2**20:8.2f} MiB {s.count_diff:9d} blocks  {where}")

    # ---- watch throughput: backlog written while paused, replayed from history --------------------------------
    if opts.events > 0:
        pause = await server.arpc("pause")
        await until(lambda: not any(r.connected for r in reflectors.values()), "the watches to close")
        base_events, base_errors = pods.events, sum(r.errors for r in reflectors.values())
        burst = await server.arpc("burst", events=opts.events, seed=opts.seed + 1)
        n: int = burst["events"]
        assert pods.events == base_events, "events were applied while the server was paused"
        print(f"\n== watch: {n} pod events written while ipguard's watches were closed, in "
              f"{burst['seconds']:.1f} s (server write rate {n / burst['seconds']:.0f}/s, not measured)")
        print(f"  mix:              {burst['ops']}; resourceVersion {pause['rv']} -> {burst['rv']}")
        gc_timer.take()
        profile = cProfile.Profile() if opts.profile else None
        samples: list[tuple[float, int, float]] = []
        resumed = await server.arpc("resume")
        t_resume, busy0, cpu_resume = time.perf_counter(), machine_busy(), time.process_time()
        if profile:
            profile.enable()

        def applied() -> bool:
            count = pods.events - base_events
            if count and (not samples or samples[-1][1] != count):
                samples.append((time.perf_counter(), count, time.process_time()))
            return count >= n

        await until(applied, "the backlog to be applied", step=0.002)
        if profile:
            profile.disable()
        replay_gc, replay_gcs = gc_timer.take()
        busy = machine_busy() - busy0
        after = await server.arpc("state")
        (t1, c1, cpu1), (t2, c2, cpu2) = samples[0], samples[-1]
        if t2 <= t1:  # all in one chunk (tiny runs): count from the resume instead, a lower bound
            (t1, c1, cpu1) = (t_resume, 0, cpu_resume)
        rate = (c2 - c1) / (t2 - t1)
        verdict = mark(rate >= 20000, not profiled)
        print(f"watch apply rate:   {rate:8.0f} events/s (target >= 20000: {verdict}); events "
              f"{c1}..{c2} applied in {t2 - t1:.2f} s (first seen {t1 - t_resume:.2f} s after resume, which "
              f"includes the retry backoff and the server building the replay)")
        print(f"  cpu in window:    ipguard {cpu2 - cpu1:.2f} s of {t2 - t1:.2f} s wall "
              f"({100 * (cpu2 - cpu1) / max(t2 - t1, 1e-9):.0f}% busy: "
              f"{(c2 - c1) / max(cpu2 - cpu1, 1e-9):.0f} events per ipguard CPU-second); fake server "
              f"{after['cpu'] - resumed['cpu']:.2f} s from resume to the end; gc {replay_gc:.2f} s ({replay_gcs})")
        print(f"  machine:          {busy:.2f} CPU-s used by all processes from resume to the end "
              f"({time.perf_counter() - t_resume:.2f} s wall, {os.cpu_count()} CPUs)")
        print(f"  retries:          {sum(r.errors for r in reflectors.values()) - base_errors} 503s answered "
              f"while paused (expected); {pods.relists_410} relists (410)")
        print(f"RSS after watch:    {proc_status('VmRSS'):8.1f} MiB (peak {proc_status('VmHWM'):.1f} MiB)")
        if profile:
            print_profile("watch replay (apply of the backlog)", profile)

    # ---- correctness --------------------------------------------------------------------------------------------
    state = await server.arpc("state")
    with contextlib.suppress(TimeoutError):  # a mismatch is reported below, not raised
        await until(lambda: len(index.pods) == state["pods"], "the index to match the server", step=0.01)
    same = index.aggregates() == index.recount()
    known_nodes = sum(1 for n in index.nodes.values() if n.known)
    counts = len(index.pods) == state["pods"] and known_nodes == state["nodes"]
    print("\n== check")
    print(f"aggregates == recount: {mark(same)}; pods index {len(index.pods)} / server {state['pods']}, "
          f"nodes index {known_nodes} / server {state['nodes']}: {mark(counts)}")
    if opts.events > 0:
        # The index the watch brought up to date must be the one a fresh list of the same state gives.
        fresh, fresh_reflectors = wire(api, opts.page_size)
        for reflector in fresh_reflectors.values():
            reflector.start()
        with contextlib.suppress(TimeoutError):
            await until(lambda: all(r.synced for r in fresh_reflectors.values())
                        and len(fresh.pods) == state["pods"], "a fresh list", step=0.02)
        for reflector in fresh_reflectors.values():
            await reflector.stop()
        agree = fresh.pods == index.pods and fresh.aggregates() == index.aggregates()
        print(f"watched index == index from a fresh list of the server: {mark(agree)} "
              f"(every pod entry and every node, zone and subnet aggregate)")

    for reflector in reflectors.values():
        await reflector.stop()
    await api.close()
    gc.callbacks.remove(gc_timer)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--pods", type=int, default=150_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="small sizes: 200 nodes, 6,000 pods, 20,000 events")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--page-size", type=int, default=Reflector.__dataclass_fields__["page_size"].default)
    parser.add_argument("--profile", action="store_true", help="cProfile the sync and the watch replay")
    parser.add_argument("--trace-memory", action="store_true", help="tracemalloc over the sync")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and ipguard to CPUs 1 and 0")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.pods, args.events = 200, 6000, 20_000
    opts = Options(args.nodes, args.pods, args.events, args.seed, args.page_size, args.profile, args.trace_memory,
                   args.timeout)
    pin = not args.no_pin and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2
    if pin:
        os.sched_setaffinity(0, {BENCH_CPU})

    gc.collect()
    rss_before = proc_status("VmRSS")
    # The history must hold the whole backlog, or the re-watch would get 410 and relist instead.
    server = ServerProcess(history_limit=args.events + 10_000, pin=pin)
    try:
        t0 = time.perf_counter()
        load = server.rpc("load", nodes=args.nodes, pods=args.pods, seed=args.seed)
        print(f"cluster: {load['nodes']} nodes in {len(ZONES)} zones (~{load['node_bytes']:.0f} bytes each as listed), "
              f"{load['pods']} pods (~{load['pod_bytes']:.0f} bytes each), {NAMESPACES + 2} namespaces")
        print(f"fake API server: {server.url}, process {server.process.pid}"
              f"{' on CPU 1 (ipguard on CPU 0)' if pin else ''}, history {args.events + 10_000} events")
        print(f"load (server side): {load['seconds']:8.2f} s generating and storing the objects "
              f"({time.perf_counter() - t0:.2f} s wall, not part of any figure below)")
        ok = asyncio.run(bench(server, opts, load["pods"], rss_before))
    finally:
        server.close()
    print(f"\nresult: {'all targets met' if ok else 'some targets or checks MISSED (see above)'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
