"""EC2 source benchmark: how many EC2 requests ipguard's poller makes, per operation, for a cluster in moto.

EC2's request quota is the account's and is shared with every node's ipamd, so the figure that matters is the
number of requests per refresh period, not moto's latency. A moto server (real boto3 over HTTP) holds N
m5.large nodes over 3 zones (a /20 pod subnet per zone, one CNI ENI per node), a subnet tagged
kubernetes.io/role/cni per zone, and EKS control-plane ENIs. The poller runs with prefix delegation (the mode
that asks most: subnet ENIs and CIDR reservations besides) and a cluster name, and the benchmark counts the
requests of: the first refresh (cold), a refresh within the period (a tick: nothing due), a node joining
within the period, and the next period's refresh. Wall times are moto's and this machine's, printed for scale.

Targets: no request on a tick; a joining node costs DescribeNetworkInterfaces calls by attachment only; a
period costs a constant number of requests (not per node) but for DescribeNetworkInterfaces' pages.

    python bench/ec2.py [--nodes 150] [--page-size 1000]

--scale: a 5,000-node cluster (15,000 ENIs of 10-50 addresses) served in EC2's XML by a local endpoint
(bench/ec2_endpoint.py), and ipguard's WebhookServer and Ec2Poller in one process, as `ipguard serve` runs
them: per ENI query plan, CPU seconds, bytes and calls of one refresh, and the admission p99 at 1,000 reviews/s
without and during refreshes, ending with `p99 ratio (during refresh / without): N` (see bench/README.md).

    python bench/ec2.py --scale [--nodes 5000] [--plan two-queries one-query process]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import logging
import multiprocessing
import os
import ssl
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

for _name, _value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                      "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                      "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ[_name] = _value  # moto's fake credentials, nothing from this machine's AWS configuration

import boto3  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from bench.ec2_endpoint import VPC, instance_id  # noqa: E402
from bench.index import build as build_index  # noqa: E402
from bench.server import (  # noqa: E402
    HOST,
    SERVICE,
    SETTINGS,
    Client,
    ServerHandle,
    Template,
    UidSource,
    _percentile,
    build_payloads,
    client_context,
    open_loop,
)
from webhook.admission.handler import AdmissionState  # noqa: E402
from webhook.logs import setup_logging  # noqa: E402
from webhook.model.cni import CniSettings  # noqa: E402
from webhook.model.index import CapacityIndex  # noqa: E402
from webhook.server import WebhookServer, start_server  # noqa: E402
from webhook.sources.ec2.client import Call, chunks, vpc_filter  # noqa: E402
from webhook.sources.ec2.enis import (  # noqa: E402
    BRANCH_ENI_DESCRIPTION,
    CNI_ENI_PREFIX,
    Eni,
    EniProvider,
    InstanceEnis,
    describe,
    parse_eni,
    summarize_instances,
)
from webhook.sources.ec2.poller import Ec2Poller  # noqa: E402
from webhook.tls import CertReloader, write_cert_bundle  # noqa: E402

REGION = "us-east-1"
ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")
AMI = "ami-12c6146b"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def build(ec2: Any, nodes: int) -> tuple[dict[str, str], list[str], dict[str, str]]:
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = []
    for z, zone in enumerate(ZONES):
        subnets.append(ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{16 * z}.0/20", AvailabilityZone=zone)[
            "Subnet"]["SubnetId"])
        tagged = ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{100 + z}.0/24", AvailabilityZone=zone)
        ec2.create_tags(Resources=[tagged["Subnet"]["SubnetId"]], Tags=[{"Key": "kubernetes.io/role/cni",
                                                                          "Value": "1"}])
        ec2.create_network_interface(SubnetId=subnets[-1], Description="Amazon EKS bench")
    instances: dict[str, str] = {}
    zone_of: dict[str, str] = {}
    for i in range(nodes):
        z = i % len(ZONES)
        run = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="m5.large", SubnetId=subnets[z])
        instance = run["Instances"][0]["InstanceId"]
        eni = ec2.create_network_interface(SubnetId=subnets[z], Description=f"aws-K8S-{instance}",
                                           SecondaryPrivateIpAddressCount=4)["NetworkInterface"]["NetworkInterfaceId"]
        ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=instance, DeviceIndex=1)
        instances[f"node-{i}"] = instance
        zone_of[f"node-{i}"] = ZONES[z]
    return instances, subnets, zone_of


# --- --scale: the refresh of a 5,000-node cluster beside the request path ---------------------------------


def two_query_summaries(client: Any, instance_ids: frozenset[str], vpc_id: str | None,
                        page_size: int) -> dict[str, InstanceEnis]:
    """The ENI query plan before the one-query plan, kept here to measure against: the CNI and branch ENIs by
    description VPC-wide (every cluster's in a shared VPC), then every ENI attached to the nodes (the CNI ENIs
    again), merged by id."""
    vpc = vpc_filter(vpc_id)
    seen: dict[str, Eni] = {}
    described: list[Any] = [*vpc, {"Name": "description", "Values": [f"{CNI_ENI_PREFIX}*", BRANCH_ENI_DESCRIPTION]}]
    for raw in describe(client, described, page_size):
        eni = parse_eni(raw)
        seen[eni.eni_id] = eni
    for chunk in chunks(instance_ids):
        for raw in describe(client, [*vpc, {"Name": "attachment.instance-id", "Values": chunk}], page_size):
            eni = parse_eni(raw)
            seen[eni.eni_id] = eni
    return summarize_instances(seen.values(), instance_ids)


class TwoQueryEnis(EniProvider):
    """The poller's ENI provider with the plan before (every refresh a full one, as this bench asks)."""

    async def instances(self, instance_ids: frozenset[str], vpc_id: str | None, *,
                        full: bool = False) -> dict[str, InstanceEnis] | None:
        fresh = await self.ec2.fetch(Call.ENIS, two_query_summaries, instance_ids, vpc_id, self.page_size)
        self.last_shipped = len(fresh)
        return fresh


def endpoint_process(nodes: int, zones: int, enis_per_node: int, ips: tuple[int, int], foreign: int, churn: float,
                     cpu: int | None, conn: Connection) -> None:
    from aiohttp import web

    from bench.ec2_endpoint import app, build_cluster

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    cluster = build_cluster(nodes, zones, enis_per_node, ips, foreign, churn=churn)

    async def serve() -> None:
        runner = web.AppRunner(app(cluster), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        conn.send((int(runner.addresses[0][1]), len(cluster.enis),
                   sum(e.xml.count(b"<privateIpAddress>") - 1 for e in cluster.enis)))
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
        await runner.cleanup()

    asyncio.run(serve())


def webhook_process(url: str, nodes: int, pods: int, zones: int, plan: str, cpu: int | None, sliced: bool,
                    conn: Connection) -> None:
    """ipguard's WebhookServer on bench/index.py's index, and an Ec2Poller on the same event loop refreshing
    it from the local endpoint, as `ipguard serve` runs them. Commands on `conn`."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    setup_logging("info", open(os.devnull, "w"))  # noqa: SIM115 - as bench/server.py: JSON lines, not to a pipe
    cert, key = conn.recv()

    async def main() -> None:
        index, node_names = build_index(nodes, pods, zones)
        node_instances = {name: instance_id(i) for i, name in enumerate(node_names)}
        reloader = CertReloader(cert, key)
        running = await start_server(WebhookServer(AdmissionState(index, SETTINGS), reloader), HOST, 0,
                                     reloader.context)
        clock = Clock()
        poller = Ec2Poller(region=REGION, endpoint_url=url, vpc_id=VPC, cluster_name="bench", clock=clock,
                           read_timeout=120, fetch_in_process=plan.startswith("process"))
        if plan == "two-queries":
            poller.enis = TwoQueryEnis(poller.ec2, poller.eni_period)  # the plan before, for comparison
        if not sliced:
            poller.apply_slice = None  # the nodes' figures in one step, as before slicing
        calls: collections.Counter[str] = collections.Counter()
        poller.client.meta.events.register("before-call.ec2", lambda event_name, **_: calls.update(
            [event_name.rsplit(".", 1)[-1]]))
        gc.collect()
        gc.freeze()
        refreshing: asyncio.Task[None] | None = None
        totals = {"refreshes": 0, "cpu": 0.0, "wall": 0.0, "worker_cpu": 0.0}

        async def refresh_once(watch: bool = False) -> dict[str, Any]:
            clock.now += 31  # a new period: the full refresh
            calls.clear()
            holds: list[tuple[float, float]] = []
            watcher = asyncio.create_task(loop_holds(holds)) if watch else None
            cpu0, wall0, worker0 = time.process_time(), time.perf_counter(), children_cpu()
            result = await poller.refresh(index, node_instances)
            figures = {"cpu": time.process_time() - cpu0, "wall": time.perf_counter() - wall0,
                       "worker_cpu": children_cpu() - worker0, "ok": result.ok,
                       "failed": dict(result.failed), "nodes_updated": result.nodes_updated,
                       "calls": dict(calls), "shipped": poller.enis.last_shipped}
            if watcher is not None:
                await asyncio.sleep(4 * LOOP_TICK)  # the tick a last synchronous step held up, measured
                watcher.cancel()
                figures["hold"] = max((wall for wall, _ in holds), default=0.0)
                figures["hold_cpu"] = max((cpu for _, cpu in holds), default=0.0)
            return figures

        async def refresh_loop() -> None:
            while True:
                totals["refreshes"] += 1  # started: a refresh may outlast the window
                figures = await refresh_once()
                for k in ("cpu", "wall", "worker_cpu"):
                    totals[k] += figures[k]

        done = asyncio.Event()
        pending: list[asyncio.Task[Any]] = []

        def command() -> None:
            nonlocal refreshing
            message = conn.recv()
            op = message[0]
            if op == "cpu":
                conn.send(time.process_time())
            elif op == "worker-any-core":  # the worker inherited this process's pin: free it
                for pid in children():
                    os.sched_setaffinity(int(pid), range(os.cpu_count() or 1))
                conn.send(True)
            elif op == "refresh":
                async def reply() -> None:
                    figures = await refresh_once(watch=len(message) > 1 and message[1])
                    figures["zones"] = {z: (index.zone_headroom(z), SETTINGS.reserve_for_zone(z))
                                        for z in index.zone_names()}
                    figures["recount"] = index.aggregates() == index.recount()
                    figures["rss"] = peak_rss_mb()
                    figures["worker_rss"] = sum(peak_rss_mb(pid) for pid in children())
                    conn.send(figures)
                pending.append(asyncio.create_task(reply()))
            elif op == "refresh-loop":
                totals.update(refreshes=0, cpu=0.0, wall=0.0, worker_cpu=0.0)
                refreshing = asyncio.create_task(refresh_loop())
                conn.send(True)
            elif op == "refresh-stop":
                async def stop_loop() -> None:
                    assert refreshing is not None
                    refreshing.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await refreshing
                    conn.send(dict(totals))
                pending.append(asyncio.create_task(stop_loop()))
            elif op == "stop":
                done.set()

        loop = asyncio.get_running_loop()
        loop.add_reader(conn.fileno(), command)
        conn.send(("ready", running.port, {"pid": os.getpid()}))
        await done.wait()
        loop.remove_reader(conn.fileno())
        poller.close()
        await running.stop()

    asyncio.run(main())


LOOP_TICK = 0.0005


async def loop_holds(out: list[tuple[float, float]]) -> None:
    """How long the event loop was held past each of its ticks (a timer every 0.5 ms), until cancelled: wall
    time late, and the CPU time the loop's thread spent meanwhile (what ran on it, without the moments the
    machine's other processes had the core)."""
    while True:
        began, cpu = time.perf_counter(), time.thread_time()
        await asyncio.sleep(LOOP_TICK)
        out.append((time.perf_counter() - began - LOOP_TICK, time.thread_time() - cpu))


def children() -> list[str]:
    """The pids of this process's live children (the EC2 worker process), from /proc."""
    me = str(os.getpid())
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                    out.append(pid)
            except OSError:
                continue
    return out


def children_cpu() -> float:
    """CPU seconds of this process's live children."""
    total = 0.0
    for pid in children():
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def peak_rss_mb(pid: str = "self") -> float:
    """VmHWM: the peak resident memory of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scale(args: argparse.Namespace) -> int:
    ips = tuple(int(x) for x in args.ips.split("-"))
    assert len(ips) == 2
    ctx = multiprocessing.get_context("spawn")
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    parent, child = ctx.Pipe()
    endpoint = ctx.Process(target=endpoint_process, daemon=True, args=(
        args.nodes, args.zones, args.enis_per_node, ips, args.foreign_enis, args.churn, 1 if pin else None, child))
    started = time.perf_counter()
    endpoint.start()
    port, n_enis, n_ips = parent.recv()
    url = f"http://127.0.0.1:{port}"
    print(f"EC2 refresh at scale ({time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} cores): local endpoint "
          f"(bench/ec2_endpoint.py, EC2's XML) with {args.nodes} nodes, {n_enis} ENIs ({args.enis_per_node} per node"
          f" of ours, {args.foreign_enis} of another cluster in the VPC), {n_ips} secondary addresses "
          f"({args.ips} addresses per ENI; {args.churn:.0%} of the nodes gain or lose an address per refresh); "
          f"rendered in {time.perf_counter() - started:.0f} s")
    print(f"ipguard: WebhookServer on bench/index.py's index ({args.nodes} nodes, {args.pods} pods) and the "
          f"Ec2Poller on the same event loop, pinned to CPU 0; generator and endpoint on CPU 1: "
          f"{'yes' if pin else 'no (--no-pin)'}")
    _, sequence = build_payloads()
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="ipguard-bench-") as tmp:
            paths = write_cert_bundle(Path(tmp), SERVICE, SERVICE, ["127.0.0.1"])
            context = client_context(paths.ca_cert)
            if pin:
                os.sched_setaffinity(0, {1})
            for plan in args.plan:
                rows.append((plan, asyncio.run(measure_plan(args, plan, url, paths, context, sequence, ctx, pin))))
    finally:
        parent.send("stop")
        endpoint.join(10)
    print(f"\n{'plan':<14} {'calls':>6} {'MB parsed':>10} {'shipped':>8} {'updated':>8} {'CPU s':>7} "
          f"{'worker CPU s':>13} {'wall s':>7} {'hold cold':>10} {'hold':>8} "
          f"{'p99 without':>12} {'p99 during':>11} {'p99 after':>10} {'ratio':>6} {'refreshes':>10} {'recount':>8}")
    for plan, r in rows:
        print(f"{plan:<14} {r['calls']:6d} {r['bytes'] / 1e6:10.1f} {r['shipped']:8d} {r['updated']:8d} "
              f"{r['cpu']:7.2f} {r['worker_cpu']:13.2f} {r['wall']:7.2f} {r['hold_cold'] * 1000:8.1f}ms "
              f"{r['hold'] * 1000:6.1f}ms {r['p99_without']:10.2f}ms {r['p99_during']:9.2f}ms {r['p99_after']:8.2f}ms "
              f"{r['ratio']:6.2f} "
              f"{r['refreshes']:10d} {'equal' if r['recount'] else 'DIFFERS':>8}")
    print("(calls, MB parsed, shipped (nodes' figures the fetch handed back), updated (nodes whose figures "
          "changed), CPU s, worker CPU s, wall s: one full refresh with no reviews arriving; CPU s is the "
          "webhook process's own, worker CPU s the ENI worker process's; hold: the longest the event loop was "
          "held at once (its thread's CPU between two ticks of a 0.5 ms timer), in the cold refresh "
          "(every node's figure new) and in a later "
          "one; p99 at "
          f"{args.rate:g} reviews/s, open loop, latency from each request's due time; during: refreshes back to "
          "back for the whole window; after: without again, after them; recount: the index's aggregates equal a "
          "fresh recount after a refresh)")
    for plan, r in rows:
        print(f"p99 ratio (during refresh / without) [{plan}]: {r['ratio']:.2f}")
    # The headline: serve's plan with the worker on ipguard's core (a one-core machine), else the last measured.
    main_row = dict(rows).get("process", rows[-1][1])
    print(f"p99 ratio (during refresh / without): {main_row['ratio']:.2f}")
    return 0 if all(r["recount"] and r["ok"] for _, r in rows) else 1


async def measure_plan(args: argparse.Namespace, plan: str, url: str, paths: Any, context: ssl.SSLContext,
                       sequence: list[Template], ctx: Any, pin: bool) -> dict[str, Any]:
    parent, child = ctx.Pipe()
    process = ctx.Process(target=webhook_process, daemon=False, args=(  # not daemonic: it starts the EC2 worker
        url, args.nodes, args.pods, args.zones, plan, 0 if pin else None, not args.no_slices, child))
    process.start()
    parent.send((str(paths.tls_cert), str(paths.tls_key)))
    _, port, _ = parent.recv()
    server = ServerHandle("ipguard", process, parent, port)
    stats_url = url + "/stats?reset=1"
    try:
        # Cold: instance types, subnets, and every node's figure new (the index predicted them until now).
        warm = server.ask("refresh", True)
        if not warm["ok"]:
            raise RuntimeError(f"refresh failed: {warm['failed']}")
        if plan == "process-any-core":
            server.ask("worker-any-core")
        _fetch_json(stats_url)
        one = server.ask("refresh")
        served = _fetch_json(stats_url)
        again = server.ask("refresh", True)  # as `one`, watching the loop (its timer costs CPU of its own)
        print(f"\n== plan {plan}: longest hold of the event loop (wall / its thread's CPU): "
              f"{warm['hold'] * 1000:.1f} / {warm['hold_cpu'] * 1000:.1f} ms in the cold refresh "
              f"({warm['shipped']} nodes shipped, {warm['nodes_updated']} updated), {again['hold'] * 1000:.1f} / "
              f"{again['hold_cpu'] * 1000:.1f} ms in a later one ({again['shipped']} shipped, "
              f"{again['nodes_updated']} updated)")
        print(f"   one full refresh: {sum(v for k, v in served.items() if k.endswith('calls'))} calls "
              f"({', '.join(f'{k[:-6]} {v}' for k, v in sorted(served.items()) if k.endswith('calls'))}), "
              f"{sum(v for k, v in served.items() if k.endswith('bytes')) / 1e6:.1f} MB, CPU {one['cpu']:.2f} s here"
              f" + {one['worker_cpu']:.2f} s in the worker, wall {one['wall']:.2f} s; index equal to a recount: "
              f"{one['recount']}; peak memory: ipguard {one['rss']:.0f} MB, worker {one['worker_rss']:.0f} MB")
        print("   zones after it, headroom/reserve: " + ", ".join(f"{z}={h}/{r}" for z, (h, r) in one["zones"].items()))
        uids = UidSource()
        p99: dict[str, float] = {}
        totals: dict[str, Any] = {}
        for label in ("without", "during", "after"):  # after: without again, to see drift over the run
            client = Client("raw", port, context, 32)
            await client.open()
            try:
                if label == "during":
                    server.ask("refresh-loop")
                phase = await open_loop(server, client, sequence, uids, args.rate, 0.5, args.duration)
                if label == "during":
                    server.conn.send(("refresh-stop",))
                    totals = server.conn.recv()
            finally:
                await client.close()
            p99[label] = phase.pct(0.99)
            print(f"   {label:<8} {'refreshes' if label == 'after' else 'a refresh'}: {phase.rate:6.0f} reviews/s, p50 "
                  f"{phase.pct(0.5):6.2f} ms, p99 "
                  f"{phase.pct(0.99):7.2f} ms, max {max(phase.latencies, default=0) * 1000:7.1f} ms (the generator "
                  f"sent late by p99 {_percentile(phase.lags, 0.99) * 1000:.2f} ms, in these), errors "
                  f"{phase.errors}, denied {phase.denied}, patched {phase.patched}"
                  + (f"; {totals['refreshes']} refresh(es) ran in the window" if label == "during" else ""))
        return {"calls": sum(v for k, v in served.items() if k.endswith("calls")),
                "bytes": sum(v for k, v in served.items() if k.endswith("bytes")), "cpu": one["cpu"],
                "worker_cpu": one["worker_cpu"], "wall": one["wall"], "p99_without": p99["without"],
                "p99_during": p99["during"], "p99_after": p99["after"], "ratio": p99["during"] / p99["without"],
                "refreshes": totals.get("refreshes", 0), "recount": one["recount"] and again["recount"],
                "ok": one["ok"] and again["ok"], "hold_cold": warm["hold_cpu"], "hold": again["hold_cpu"],
                "shipped": one["shipped"], "updated": one["nodes_updated"]}
    finally:
        with contextlib.suppress(OSError):
            parent.send(("stop",))
        process.join(30)
        if process.is_alive():
            print("   (the webhook process did not stop within 30 s: terminated)")
            process.terminate()


def _fetch_json(url: str) -> dict[str, int]:
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        data: dict[str, int] = json.loads(response.read())
        return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default 150; --scale 5000)")
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--scale", action="store_true", help="the refresh of a large cluster from a local endpoint "
                        "serving EC2's XML, beside ipguard's request path (see the module docstring)")
    parser.add_argument("--pods", type=int, default=150_000, help="--scale: pods in the index")
    parser.add_argument("--zones", type=int, default=6, help="--scale: zones")
    parser.add_argument("--enis-per-node", type=int, default=3, help="--scale: the primary ENI and CNI ENIs")
    parser.add_argument("--ips", default="10-50", help="--scale: addresses per ENI, uniform in LOW-HIGH")
    parser.add_argument("--foreign-enis", type=int, default=0,
                        help="--scale: CNI ENIs of another cluster in the same VPC")
    parser.add_argument("--churn", type=float, default=0.1,
                        help="--scale: the share of nodes whose figures change at each refresh (one address)")
    parser.add_argument("--rate", type=float, default=1000.0, help="--scale: reviews/s of the open loop")
    parser.add_argument("--duration", type=float, default=8.0, help="--scale: seconds of each open-loop window")
    parser.add_argument("--plan", nargs="+", default=["two-queries", "one-query", "process", "process-any-core"],
                        choices=["two-queries", "one-query", "process", "process-any-core"],
                        help="--scale: the ENI refreshes to measure, in one run: two-queries (the plan before, "
                        "kept in this bench), one-query (the poller's, threads), process (the poller's, parsed in "
                        "a worker process on ipguard's core, as on a one-core machine), process-any-core (the "
                        "worker free to run on any core, as in a pod without a cpuset)")
    parser.add_argument("--no-pin", action="store_true", help="--scale: leave CPU placement to the kernel")
    parser.add_argument("--no-slices", action="store_true",
                        help="--scale: apply the nodes' figures in one step (as before the poller sliced it)")
    args = parser.parse_args()
    if args.scale:
        args.nodes = args.nodes or 5000
        return scale(args)
    args.nodes = args.nodes or 150

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    url = f"http://127.0.0.1:{port}"
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=url)
    started = time.perf_counter()
    instances, subnets, zone_of = build(ec2, args.nodes)
    print(f"moto cluster: {args.nodes} nodes, {len(subnets)} pod subnets + {len(ZONES)} tagged, "
          f"built in {time.perf_counter() - started:.1f} s")

    index = CapacityIndex(cni=CniSettings(prefix_delegation=True))
    for i, (node, _) in enumerate(instances.items()):
        index.upsert_node(node, zone=zone_of[node], instance_type="m5.large", pod_subnet=subnets[i % len(ZONES)],
                          allocatable_pods=110)
    clock = Clock()
    poller = Ec2Poller(region=REGION, endpoint_url=url, page_size=args.page_size, cluster_name="bench", clock=clock)
    calls: collections.Counter[str] = collections.Counter()
    poller.client.meta.events.register("before-call.ec2", lambda event_name, **_: calls.update(
        [event_name.rsplit(".", 1)[-1]]))

    async def step(label: str, mapping: dict[str, str]) -> bool:
        calls.clear()
        began = time.perf_counter()
        result = await poller.refresh(index, mapping)
        took = time.perf_counter() - began
        detail = ", ".join(f"{op} {n}" for op, n in sorted(calls.items())) or "none"
        print(f"{label:<28} {sum(calls.values()):>3} requests in {took * 1000:7.1f} ms  ({detail})")
        return result.ok

    async def run() -> bool:
        ok = await step("first refresh (cold)", instances)
        clock.now += 5
        tick_ok = await step("tick within the period", instances)
        tick_calls = sum(calls.values())
        run_new = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="m5.large",
                                    SubnetId=subnets[0])
        joined = {**instances, "node-new": run_new["Instances"][0]["InstanceId"]}
        index.upsert_node("node-new", zone=ZONES[0], instance_type="m5.large", pod_subnet=subnets[0],
                          allocatable_pods=110)
        clock.now += 5
        join_ok = await step("a node joins (same period)", joined)
        join_ops = set(calls)
        clock.now += 31
        period_ok = await step("next period", joined)
        met = tick_calls == 0 and join_ops <= {"DescribeNetworkInterfaces", "DescribeInstances"}
        print(f"targets: no request on a tick: {tick_calls == 0}; joining node by attachment only: "
              f"{join_ops <= {'DescribeNetworkInterfaces', 'DescribeInstances'}}")
        return ok and tick_ok and join_ok and period_ok and met

    try:
        ok = asyncio.run(run())
    finally:
        poller.close()
        server.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
