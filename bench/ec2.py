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
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

for _name, _value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                      "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                      "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ[_name] = _value  # moto's fake credentials, nothing from this machine's AWS configuration

import boto3  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from webhook.model.cni import CniSettings  # noqa: E402
from webhook.model.index import CapacityIndex  # noqa: E402
from webhook.sources.ec2.poller import Ec2Poller  # noqa: E402

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=150)
    parser.add_argument("--page-size", type=int, default=1000)
    args = parser.parse_args()

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
