"""A small live cluster for integration tests: EC2 in a moto server, Kubernetes in the fake API server.

Zone us-east-1a is tight: its /27 pod subnet has 7 free addresses and its node's 18 IPs are all in use.
Zone us-east-1b has plenty. Everything is made up; the credentials are moto's fake ones.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from moto.server import ThreadedMotoServer

from tests.fakekube import FakeKube
from webhook.tls import CertPaths, write_cert_bundle

REGION = "us-east-1"
AMI = "ami-12c6146b"
SERVER_NAME = "ipguard.ipguard.svc"
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto's fake credentials, and nothing from the machine's own AWS configuration."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)


class Clock:
    """Real time plus a jump the test can add, to age data past the staleness bound without waiting."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@dataclass
class Moto:
    server: ThreadedMotoServer
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ec2(self) -> Any:
        return boto3.client("ec2", region_name=REGION, endpoint_url=self.url)

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        # moto's state lives in this process: a new server on the same port serves the same EC2.
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()


def start_moto() -> Moto:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    moto = Moto(server, port)
    urllib.request.urlopen(urllib.request.Request(f"{moto.url}/moto-api/reset", method="POST"), timeout=5)
    return moto


@dataclass
class Ec2Cluster:
    vpc: str
    subnet_a: str
    subnet_b: str
    instance_a: str
    instance_b: str
    extra_enis: list[str] = field(default_factory=list)


def build_ec2(ec2: Any) -> Ec2Cluster:
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet_a = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/27", AvailabilityZone="us-east-1a")["Subnet"]
    subnet_b = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.2.0/24", AvailabilityZone="us-east-1b")["Subnet"]
    instances = []
    for subnet, cni_ips in ((subnet_a["SubnetId"], 9), (subnet_b["SubnetId"], 0)):
        instance = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="m5.large",
                                     SubnetId=subnet)["Instances"][0]
        primary = instance["NetworkInterfaces"][0]["NetworkInterfaceId"]
        ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, SecondaryPrivateIpAddressCount=9)
        if cni_ips:
            eni = ec2.create_network_interface(SubnetId=subnet, Description=f"aws-K8S-{instance['InstanceId']}",
                                               SecondaryPrivateIpAddressCount=cni_ips)["NetworkInterface"]
            ec2.attach_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"],
                                         InstanceId=instance["InstanceId"], DeviceIndex=1)
        instances.append(instance["InstanceId"])
    return Ec2Cluster(vpc, subnet_a["SubnetId"], subnet_b["SubnetId"], instances[0], instances[1])


def consume(ec2: Any, subnet: str, count: int) -> str:
    """Take `count` + 1 addresses from a subnet, as another workload's ENI would."""
    eni = ec2.create_network_interface(SubnetId=subnet, Description="another workload",
                                       SecondaryPrivateIpAddressCount=count)["NetworkInterface"]
    return str(eni["NetworkInterfaceId"])


def node(name: str, zone: str, instance_id: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "topology.kubernetes.io/zone": zone, "node.kubernetes.io/instance-type": "m5.large",
            "kubernetes.io/os": "linux", "kubernetes.io/hostname": name}},
        "spec": {"providerID": f"aws:///{zone}/{instance_id}"},
        "status": {"allocatable": {"pods": "29"}},
    }


def pod(namespace: str, name: str, node_name: str | None, phase: str = "Running", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"containers": [{"name": "app", "image": "registry.example.com/app:1"}], **spec}
    if node_name:
        body["nodeName"] = node_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace,
                                                            "labels": {"app": name.rsplit("-", 1)[0]}},
            "spec": body, "status": {"phase": phase}}


def aws_node(env: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "aws-node", "namespace": "kube-system"},
        "spec": {"selector": {"matchLabels": {"k8s-app": "aws-node"}}, "template": {
            "metadata": {"labels": {"k8s-app": "aws-node"}},
            "spec": {"containers": [{"name": "aws-node", "image": "amazon-k8s-cni:v1.18.3",
                                     "env": [{"name": k, "value": v} for k, v in env.items()]}]}}},
    }


def config_map(data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ipguard", "namespace": "ipguard"},
            "data": data}


async def load_kube(fk: FakeKube, ec2c: Ec2Cluster, *, pods_a: int = 18, pods_b: int = 5) -> None:
    for ns in ("kube-system", "ipguard", "shop"):
        await fk.create("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    await fk.create("nodes", node("ip-10-0-1-10.ec2.internal", "us-east-1a", ec2c.instance_a))
    await fk.create("nodes", node("ip-10-0-2-20.ec2.internal", "us-east-1b", ec2c.instance_b))
    await fk.create_many("pods", [pod("shop", f"a-{i}", "ip-10-0-1-10.ec2.internal") for i in range(pods_a)],
                         namespace="shop")
    await fk.create_many("pods", [pod("shop", f"b-{i}", "ip-10-0-2-20.ec2.internal") for i in range(pods_b)],
                         namespace="shop")
    await fk.create("daemonsets", aws_node({"WARM_ENI_TARGET": "1"}), namespace="kube-system")
    await fk.create("configmaps", config_map({"mode": "enforce", "zoneReserve": "3", "stalenessSeconds": "60"}),
                    namespace="ipguard")


async def start_cluster(moto: Moto, **fake_kube: Any) -> tuple[FakeKube, str, Ec2Cluster]:
    """The EC2 side built in `moto`, and a fake API server loaded with the matching cluster."""
    ec2c = build_ec2(moto.ec2())
    fk = FakeKube(**fake_kube)
    url = await fk.start()
    await load_kube(fk, ec2c)
    return fk, url, ec2c


def certs(tmp: Path) -> CertPaths:
    return write_cert_bundle(tmp, "ipguard", "ipguard", ["127.0.0.1"])


def review(pod_obj: dict[str, Any], *, name: str | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {
        "uid": str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": "shop",
        "operation": "CREATE", "object": pod_obj, "oldObject": None, "dryRun": False,
    }
    if name:
        request["name"] = name
    return {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": request}


def zone_pod(name: str, zone: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeSelector": {"topology.kubernetes.io/zone": zone}} if zone else {}
    return pod("shop", name, None, phase="Pending", **spec)


class Client:
    """Talks to the webhook as the apiserver does: trusts only the CA, checks the service DNS name."""

    def __init__(self, url: str, ca: Path) -> None:
        context = ssl.create_default_context(cafile=str(ca))
        context.hostname_checks_common_name = False
        self.url = url
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.session.post(f"{self.url}{path}?timeout=5s", data=json.dumps(body),
                                     headers={"Content-Type": "application/json"},
                                     server_hostname=SERVER_NAME) as response:
            assert response.status == 200, await response.text()
            answer: dict[str, Any] = (await response.json())["response"]
        assert answer["uid"] == body["request"]["uid"]
        return answer

    async def get(self, path: str) -> tuple[int, str]:
        async with self.session.get(f"{self.url}{path}", server_hostname=SERVER_NAME) as response:
            return response.status, await response.text()

    async def close(self) -> None:
        await self.session.close()


async def eventually(check: Callable[[], object], what: str, seconds: float = 20.0) -> None:
    """Wait until `check()` (a plain value or a coroutine) is true; fail naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.05)
