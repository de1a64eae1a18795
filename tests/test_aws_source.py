"""The EC2 edge (webhook/sources/ec2/): pure helpers by hand-worked figures, the poller against moto.

Unit-level functions run against moto in process (`mock_aws`); the poller runs end to end against a
`ThreadedMotoServer` through `endpoint_url`, the way the real process talks to EC2. moto 5.2.5 facts these
tests rely on (checked against its source):
  * AvailableIpAddressCount is live: CIDR size - 5 - every private IP of every ENI in the subnet.
  * No /28 prefixes at all (Ipv4PrefixCount is ignored, Ipv4Prefixes never returned): the prefix-delegation
    test adds prefixes to DescribeNetworkInterfaces answers with a botocore `after-call` hook.
  * DescribeNetworkInterfaces / DescribeSubnets ignore MaxResults (one page): pagination is tested with a
    botocore Stubber serving two pages.
  * InterfaceType is always "interface" and the interface-type filter matches nothing, so branch and trunk
    ENIs are made with their real descriptions (the poller classifies by type or description).
  * Secondary IPs from SecondaryPrivateIpAddressCount are random addresses: counts are exact, positions are
    not, so the /28 arithmetic is tested on explicit addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from botocore.stub import Stubber
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st
from moto import mock_aws

from tests.live import Moto as Server
from tests.live import start_moto
from tests.paths import REPO
from webhook.model.cni import CniSettings
from webhook.model.config import Settings
from webhook.model.decide import decide
from webhook.model.index import CapacityIndex, PodUse
from webhook.model.instance_types import INSTANCE_TYPES
from webhook.model.limits import InstanceLimits, LimitsTable
from webhook.sources.ec2.client import Call, Ec2, classify_error
from webhook.sources.ec2.enis import (
    Eni,
    EniHold,
    EniProvider,
    InstanceEnis,
    ShippedFigures,
    parse_eni,
    subnet_usage,
    summarize_instances,
)
from webhook.sources.ec2.instance_types import instance_limits_from_ec2
from webhook.sources.ec2.instances import cluster_name_from_tags
from webhook.sources.ec2.poller import Ec2Poller, RefreshResult
from webhook.sources.ec2.subnets import SubnetInfo, free_prefix_blocks
from webhook.sources.provider_ids import (
    instance_id_from_provider_id,
    node_instances_from_provider_ids,
    region_from_provider_id,
    region_from_zone,
)

REGION = "us-east-1"
AMI = "ami-12c6146b"  # any id: moto does not check it
ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials, and no profile or config file from the machine running the tests."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def moto_server() -> Iterator[Server]:
    server = start_moto()  # every test starts from an empty account
    yield server
    server.stop()


def ec2_client(url: str) -> Any:
    return boto3.client("ec2", region_name=REGION, endpoint_url=url)


def make_poller(url: str, clock: Callable[[], float], **kwargs: Any) -> Ec2Poller:
    settings: dict[str, Any] = {
        "region": REGION,
        "endpoint_url": url,
        "max_attempts": 1,  # no botocore retries: a fault shows on the first call
        "connect_timeout": 0.5,
        "read_timeout": 5.0,
        "page_size": 5,
        "clock": clock,
    }
    settings.update(kwargs)
    return Ec2Poller(**settings)


def record_filters(poller: Ec2Poller, operation: str) -> list[list[str]]:
    """The filter names of every `operation` call the poller makes from now on, call by call."""
    filters: list[list[str]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        filters.append(sorted(f["Name"] for f in params.get("Filters", [])))

    poller.client.meta.events.register(f"provide-client-params.ec2.{operation}", record)
    return filters


async def refresh_once(poller: Ec2Poller, index: CapacityIndex, node_instances: dict[str, str]) -> RefreshResult:
    try:
        return await poller.refresh(index, node_instances)
    finally:
        poller.close()


@dataclass
class Cluster:
    vpc: str
    subnets: list[str]  # one per zone
    instances: list[str]  # one per subnet
    cni_enis: list[str]  # the first CNI ENI of each instance
    primary_enis: list[str]

    @property
    def node_instances(self) -> dict[str, str]:
        return {f"node-{i}": iid for i, iid in enumerate(self.instances)}


def create_cluster(ec2: Any, secondary: tuple[int, ...] = (5, 8, 3)) -> Cluster:
    """A VPC with a /24 per zone, an m5.large per subnet, each with one attached CNI ENI holding N IPs."""
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets, instances, cni_enis, primaries = [], [], [], []
    for i, zone in enumerate(ZONES):
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i + 1}.0/24", AvailabilityZone=zone)["Subnet"]
        subnets.append(subnet["SubnetId"])
        run = ec2.run_instances(
            ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="m5.large", SubnetId=subnet["SubnetId"]
        )
        instance = run["Instances"][0]
        instances.append(instance["InstanceId"])
        primaries.append(instance["NetworkInterfaces"][0]["NetworkInterfaceId"])
        eni = ec2.create_network_interface(
            SubnetId=subnet["SubnetId"],
            Description=f"aws-K8S-{instance['InstanceId']}",
            SecondaryPrivateIpAddressCount=secondary[i],
        )["NetworkInterface"]["NetworkInterfaceId"]
        ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=instance["InstanceId"], DeviceIndex=1)
        cni_enis.append(eni)
    return Cluster(vpc, subnets, instances, cni_enis, primaries)


def build_index(cluster: Cluster, cni: CniSettings | None = None, limits: LimitsTable | None = None) -> CapacityIndex:
    index = CapacityIndex(limits, cni)
    for i, subnet in enumerate(cluster.subnets):
        index.upsert_node(f"node-{i}", zone=ZONES[i], instance_type="m5.large", pod_subnet=subnet, allocatable_pods=29)
    return index


def live_free(ec2: Any, subnet: str) -> int:
    return int(ec2.describe_subnets(SubnetIds=[subnet])["Subnets"][0]["AvailableIpAddressCount"])


def ec2_error(code: str, status: int) -> Callable[..., AWSResponse]:
    """A `before-send` hook: EC2's error answer with this code, without sending anything."""
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
        f"<Message>{code}</Message></Error></Errors><RequestID>test</RequestID></Response>"
    ).encode()

    class Raw:
        def stream(self, **_: Any) -> Iterator[bytes]:
            yield body

    def answer(**_: Any) -> AWSResponse:
        return AWSResponse("https://ec2.amazonaws.com/", status, {}, Raw())

    return answer


throttle = ec2_error("RequestLimitExceeded", 503)
denied = ec2_error("UnauthorizedOperation", 403)  # a call the IAM policy does not allow


# ---- provider IDs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider_id", "instance_id", "region"),
    [
        ("aws:///us-east-1a/i-0123456789abcdef0", "i-0123456789abcdef0", "us-east-1"),
        ("aws:///eu-west-1c/i-00018772909497f61", "i-00018772909497f61", "eu-west-1"),
        ("aws:///us-gov-west-1b/i-0a1b2c3d", "i-0a1b2c3d", "us-gov-west-1"),
        ("aws:///us-west-2-lax-1a/i-0123456789abcdef0", "i-0123456789abcdef0", "us-west-2"),  # local zone
        ("aws:////i-0123456789abcdef0", "i-0123456789abcdef0", None),  # no zone
        ("aws:///us-east-1b/0123456789-abcdef/fargate-ip-192-168-1-1.ec2.internal", None, "us-east-1"),
        ("kind://docker/kind/kind-worker", None, None),
        ("", None, None),
    ],
)
def test_provider_ids(provider_id: str, instance_id: str | None, region: str | None) -> None:
    assert instance_id_from_provider_id(provider_id) == instance_id
    assert region_from_provider_id(provider_id) == region


def test_node_instances_from_provider_ids_skips_non_ec2_nodes() -> None:
    mapping = node_instances_from_provider_ids(
        {"a": "aws:///us-east-1a/i-0123456789abcdef0", "fargate": "aws:///us-east-1a/x/fargate-ip-1", "b": ""}
    )
    assert mapping == {"a": "i-0123456789abcdef0"}
    assert region_from_zone("cn-northwest-1a") == "cn-northwest-1"
    assert region_from_zone("nonsense") is None


# ---- free /28 blocks ----------------------------------------------------------------------------------
# A /24 has 16 aligned /28 blocks: block k covers .16k to .16k+15. AWS reserves .0-.3 (block 0) and .255
# (block 15), so an empty /24 offers 14.


def test_free_blocks_empty_subnets() -> None:
    assert free_prefix_blocks("10.0.1.0/24", []) == 14
    assert free_prefix_blocks("10.0.0.0/26", []) == 2  # 4 blocks, first and last reserved
    assert free_prefix_blocks("10.0.0.0/27", []) == 0  # 2 blocks, both touched by reserved addresses
    assert free_prefix_blocks("10.0.0.0/28", []) == 0
    assert free_prefix_blocks("10.0.0.0/29", []) == 0  # smaller than a prefix
    assert free_prefix_blocks("10.0.0.0/20", []) == 254  # 256 blocks


def test_free_blocks_scattered_use() -> None:
    used = [
        "10.0.1.4",  # block 0: already reserved
        "10.0.1.17",  # block 1
        "10.0.1.100",  # block 6 (96-111)
        "10.0.1.101",  # block 6 again
        "10.0.1.128/28",  # block 8, a prefix
        ipaddress.IPv4Address("10.0.1.250"),  # block 15: already reserved
        "10.0.2.7",  # another subnet: ignored
        "2600:1f18::1",  # IPv6: ignored
    ]
    # blocked: 0, 1, 6, 8, 15 -> 16 - 5
    assert free_prefix_blocks("10.0.1.0/24", used) == 11
    # A /27 reservation (two blocks) and a prefix straddling nothing else.
    assert free_prefix_blocks(ipaddress.IPv4Network("10.0.1.0/24"), ["10.0.1.64/27"]) == 12


def test_free_blocks_fully_fragmented_subnet_has_free_ips_but_no_block() -> None:
    cidr = ipaddress.IPv4Network("10.0.1.0/24")
    used = [str(cidr.network_address + 16 * k + 5) for k in range(16)]  # one address in every block
    assert free_prefix_blocks(cidr, used) == 0
    free_ips = cidr.num_addresses - 5 - len(used)
    assert free_ips == 235  # plenty of addresses, not one /28: InsufficientCidrBlocks territory


def test_subnet_usage_counts_every_address_and_prefix() -> None:
    eni = Eni("eni-1", "subnet-a", "x", "interface", None, None, "10.0.1.4", ("10.0.1.5",), ("10.0.1.16/28",))
    other = Eni("eni-2", "subnet-b", "x", "interface", None, None, "10.0.2.9", (), ())
    assert subnet_usage([eni, other]) == {
        "subnet-a": ["10.0.1.4", "10.0.1.5", "10.0.1.16/28"],
        "subnet-b": ["10.0.2.9"],
    }


# ---- ENI summaries ------------------------------------------------------------------------------------


def raw_eni(
    eni_id: str,
    *,
    description: str = "",
    instance: str | None = None,
    device: int | None = None,
    ips: int = 0,
    prefixes: int = 0,
    interface_type: str = "interface",
    trunk: str | None = None,
) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "NetworkInterfaceId": eni_id,
        "SubnetId": "subnet-a",
        "Description": description,
        "InterfaceType": interface_type,
        "PrivateIpAddress": "10.0.0.10",
        "PrivateIpAddresses": [{"Primary": True, "PrivateIpAddress": "10.0.0.10"}]
        + [{"Primary": False, "PrivateIpAddress": f"10.0.0.{20 + i}"} for i in range(ips)],
        "Ipv4Prefixes": [{"Ipv4Prefix": f"10.0.{1 + i}.0/28"} for i in range(prefixes)],
        "TagSet": [{"Key": "vpcresources.k8s.aws/trunk-eni-id", "Value": trunk}] if trunk else [],
    }
    if instance is not None:
        raw["Attachment"] = {"InstanceId": instance, "DeviceIndex": device}
    return raw


def test_summarize_instances() -> None:
    enis = [
        parse_eni(raw)
        for raw in [
            raw_eni("eni-p", description="Primary network interface", instance="i-1", device=0, ips=3),
            raw_eni("eni-c1", description="aws-K8S-i-1", instance="i-1", device=1, ips=9),
            raw_eni("eni-c2", description="aws-K8S-i-1", instance="i-1", device=2, prefixes=2),
            raw_eni("eni-efa", description="something else", instance="i-1", device=3, ips=4),  # not the CNI's
            raw_eni("eni-t", description="aws-k8s-trunk-eni", instance="i-1", device=4, interface_type="trunk"),
            raw_eni("eni-b1", description="aws-k8s-branch-eni", interface_type="branch", trunk="eni-t"),
            raw_eni("eni-b2", description="aws-k8s-branch-eni", trunk="eni-t"),
            raw_eni("eni-b3", description="aws-k8s-branch-eni", trunk="eni-elsewhere"),
            raw_eni("eni-leak", description="aws-K8S-i-9", ips=5),  # unattached: nobody holds it
            raw_eni("eni-other", description="aws-K8S-i-2", instance="i-2", device=1, ips=1),  # not asked for
        ]
    ]
    summary = summarize_instances(enis, ["i-1", "i-3"])
    assert set(summary) == {"i-1"}  # i-3 has no ENI at all
    usage = summary["i-1"]
    assert (usage.enis, usage.secondary_ips, usage.prefixes) == (3, 12, 2)
    assert (usage.branch_enis, usage.trunk, usage.primary_subnet) == (2, True, "subnet-a")
    assert usage.held_ips() == 12 + 2 * 16
    # Custom networking: the primary ENI's 3 secondary IPs are in the node's own subnet, not a pod subnet.
    assert usage.held_ips(custom_networking=True) == 9 + 2 * 16


def test_enis_that_carry_no_pod_ips_take_slots() -> None:
    """filterUnmanagedENIs / hasRoomForEni: an ENI tagged node.k8s.amazonaws.com/no_manage=true (exactly "true")
    or EFA-only takes an ENI slot and holds no pod IP, the primary ENI is always managed; with subnet discovery
    on, ENIs in a subnet tagged kubernetes.io/role/cni=0 (the primary ENI too) are excluded from pod IPs but
    keep their slot (excludedENIBasedOnSubnetTags). ENIs on another network card are not ipamd's (no multi-NIC)."""

    def tagged(raw: dict[str, Any], value: str) -> dict[str, Any]:
        raw["TagSet"] = [{"Key": "node.k8s.amazonaws.com/no_manage", "Value": value}]
        return raw

    def in_subnet(raw: dict[str, Any], subnet: str) -> dict[str, Any]:
        raw["SubnetId"] = subnet
        return raw

    other_card = raw_eni("eni-nc1", description="aws-K8S-i-1", instance="i-1", device=0, ips=7)
    other_card["Attachment"]["NetworkCardIndex"] = 1
    raws = [
        tagged(raw_eni("eni-p", description="Primary network interface", instance="i-1", device=0), "true"),
        in_subnet(raw_eni("eni-c", description="aws-K8S-i-1", instance="i-1", device=1, ips=9), "subnet-b"),
        tagged(raw_eni("eni-u", description="storage", instance="i-1", device=2, ips=3), "true"),
        tagged(raw_eni("eni-m", description="storage", instance="i-1", device=4), "false"),  # managed, not ours
        raw_eni("eni-efa", instance="i-1", device=5, interface_type="efa-only"),
        in_subnet(raw_eni("eni-x", description="aws-K8S-i-1", instance="i-1", device=3), "subnet-zero"),
        other_card,
    ]
    usage = summarize_instances([parse_eni(raw) for raw in raws], ["i-1"])["i-1"]
    assert (usage.enis, usage.unmanaged_enis, usage.primary_subnet) == (3, 2, "subnet-a")
    assert (usage.pod_enis(), usage.held_ips(), usage.lost_enis()) == (3, 9, 2)
    zero = frozenset({"subnet-zero"})
    assert (usage.pod_enis(excluded=zero), usage.held_ips(excluded=zero), usage.lost_enis(excluded=zero)) == (
        2, 9, 3)
    # The node's own subnet tagged 0: its primary ENI carries no pod IP and keeps its slot; its pods' IPs come
    # from its ENI in subnet-b.
    own = frozenset({"subnet-a"})
    assert (usage.pod_enis(excluded=own), usage.held_ips(excluded=own), usage.lost_enis(excluded=own)) == (
        2, 9, 2 + 1)
    assert usage.own_subnet_excluded_elsewhere(own) == "subnet-b"
    # Under custom networking the primary ENI's slot is already outside the pod ENIs: not lost twice.
    assert usage.lost_enis(custom_networking=True, excluded=own) == 2
    # An excluded ENI still holding running pods' IPs stays a pod ENI until it is empty (errs toward admitting).
    busy = in_subnet(raw_eni("eni-x", description="aws-K8S-i-1", instance="i-1", device=3, ips=5), "subnet-zero")
    usage = summarize_instances([parse_eni(raw) for raw in [*raws[:5], busy]], ["i-1"])["i-1"]
    assert (usage.pod_enis(excluded=zero), usage.held_ips(excluded=zero), usage.lost_enis(excluded=zero)) == (
        3, 9 + 5, 2)


def test_parse_eni_takes_primary_from_the_address_list() -> None:
    eni = parse_eni(raw_eni("eni-1", description="aws-K8S-i-1", instance="i-1", device=1, ips=2))
    assert eni.primary_ip == "10.0.0.10"
    assert eni.secondary_ips == ("10.0.0.20", "10.0.0.21")
    assert (eni.is_cni, eni.is_primary, eni.is_branch) == (True, False, False)


# ---- instance types, errors ---------------------------------------------------------------------------


def test_instance_limits_match_the_bundled_table() -> None:
    """DescribeInstanceTypes (moto's real data) read as the generator reads it, for a spread of shapes."""
    names = ["m5.large", "t3.micro", "m4.large", "c5.metal", "p4d.24xlarge", "c6in.32xlarge", "m1.small",
             "i7ie.48xlarge", "i8ge.metal-48xl"]  # these two: ipamd's own ENI figure, not the default card's
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        infos = ec2.describe_instance_types(InstanceTypes=names)["InstanceTypes"]
    assert len(infos) == len(names)
    for info in infos:
        name = info["InstanceType"]
        limits = instance_limits_from_ec2(info, INSTANCE_TYPES[name][4])
        assert limits == InstanceLimits(name, *INSTANCE_TYPES[name]), name


def test_instance_limits_edge_cases() -> None:
    card = {"NetworkCardIndex": 1, "MaximumNetworkInterfaces": 7}
    info: Any = {
        "InstanceType": "x9.metal",
        "BareMetal": True,
        "Hypervisor": "",
        "VCpuInfo": {"DefaultVCpus": 96},
        "NetworkInfo": {
            "Ipv4AddressesPerInterface": 50,
            "MaximumNetworkInterfaces": 14,
            "DefaultNetworkCardIndex": 1,
            "NetworkCards": [{"NetworkCardIndex": 0, "MaximumNetworkInterfaces": 2}, card],
        },
    }
    assert instance_limits_from_ec2(info) == InstanceLimits("x9.metal", 7, 50, True, 96, 0)  # default card 1
    assert instance_limits_from_ec2({"InstanceType": "x9.large", "VCpuInfo": {"DefaultVCpus": 2}}) is None
    xen: Any = {
        "InstanceType": "m4.large",
        "Hypervisor": "xen",
        "VCpuInfo": {"DefaultVCpus": 2},
        "NetworkInfo": {"Ipv4AddressesPerInterface": 10, "MaximumNetworkInterfaces": 2},
    }
    assert instance_limits_from_ec2(xen) == InstanceLimits("m4.large", 2, 10, False, 2, 0)


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


def test_classify_error() -> None:
    assert classify_error(client_error("RequestLimitExceeded", 503)) == "throttled"
    assert classify_error(client_error("Throttling", 400)) == "throttled"
    assert classify_error(client_error("UnauthorizedOperation", 403)) == "denied"
    assert classify_error(client_error("InternalError", 500)) == "server"
    assert classify_error(client_error("InvalidParameterValue", 400)) == "client"
    assert classify_error(EndpointConnectionError(endpoint_url="http://x")) == "unreachable"
    assert classify_error(ReadTimeoutError(endpoint_url="http://x")) == "timeout"
    assert classify_error(ValueError("bug")) == "other"


# ---- in-process moto: limits into the index, security groups ------------------------------------------


async def test_instance_types_reach_the_index() -> None:
    """An index that knows no type learns m5.large from DescribeInstanceTypes; a type EC2 lacks stays unknown."""
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        cluster = create_cluster(ec2)
        index = build_index(cluster, limits=LimitsTable(bundled={}))
        index.upsert_node("odd", zone=ZONES[0], instance_type="zz9.plural", pod_subnet=None, allocatable_pods=10)
        assert index.nodes["node-0"].limits is None
        assert index.unknown_types == {"m5.large", "zz9.plural"}
        poller = Ec2Poller(region=REGION, clock=FakeClock())
        try:
            result = await poller.refresh(index, cluster.node_instances)
            assert Call.INSTANCE_TYPES in result.fetched
            assert index.limits.get("m5.large") == InstanceLimits("m5.large", 3, 10, True, 2, 9)
            assert index.nodes["node-0"].capacity == 3 * (10 - 1)  # secondary IPs: E x (I - 1)
            assert index.unknown_types == {"zz9.plural"}
            assert poller.stats[Call.INSTANCE_TYPES].last_success is not None

            # A node of a new type joins within the period: its limits come in, and since they make the index
            # recompute (and re-baseline its subnets), the subnets are fetched again in the same refresh.
            index.upsert_node(
                "big", zone=ZONES[1], instance_type="m5.4xlarge", pod_subnet=cluster.subnets[1], allocatable_pods=110
            )
            result = await poller.refresh(index, cluster.node_instances)
            assert {Call.INSTANCE_TYPES, Call.SUBNETS} <= result.fetched
            assert index.nodes["big"].capacity == 8 * (30 - 1)
            # Nothing new: all from the caches.
            result = await poller.refresh(index, cluster.node_instances)
            assert result.fetched == frozenset()
        finally:
            poller.close()


async def test_live_instance_type_figures_win_over_the_bundled_table() -> None:
    """`serve` sizes nodes by DescribeInstanceTypes for the types it has seen, so a new type or a changed limit
    needs no release; a type EC2 does not describe keeps its bundled row."""
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        cluster = create_cluster(ec2)
        stale = {"m5.large": (2, 6, True, 2, 9), "zz9.plural": (4, 10, True, 4, 0)}
        index = build_index(cluster, limits=LimitsTable(bundled=stale))
        index.upsert_node("odd", zone=ZONES[0], instance_type="zz9.plural", pod_subnet=None, allocatable_pods=40)
        assert index.nodes["node-0"].capacity == 2 * (6 - 1)
        poller = Ec2Poller(region=REGION, clock=FakeClock())
        result = await refresh_once(poller, index, cluster.node_instances)
    assert Call.INSTANCE_TYPES in result.fetched
    assert index.limits.get("m5.large") == InstanceLimits("m5.large", 3, 10, True, 2, 9)
    assert index.nodes["node-0"].capacity == 3 * (10 - 1)
    assert index.limits.get("zz9.plural") == InstanceLimits("zz9.plural", 4, 10, True, 4, 0)
    assert index.nodes["odd"].capacity == 4 * (10 - 1)


async def test_security_group_rule_counts() -> None:
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        sg = ec2.create_security_group(GroupName="pods", Description="pods", VpcId=vpc)["GroupId"]
        other = ec2.create_security_group(GroupName="other", Description="other", VpcId=vpc)["GroupId"]
        ec2.authorize_security_group_ingress(
            GroupId=sg,
            IpPermissions=[
                {
                    "IpProtocol": "tcp",
                    "FromPort": 443,
                    "ToPort": 443,
                    "IpRanges": [{"CidrIp": "10.0.0.0/8"}, {"CidrIp": "192.168.0.0/16"}],
                    "Ipv6Ranges": [{"CidrIpv6": "::/0"}],
                    "UserIdGroupPairs": [{"GroupId": other}],
                }
            ],
        )
        pl = ec2.create_managed_prefix_list(PrefixListName="corp", MaxEntries=7, AddressFamily="IPv4")
        pl_id = pl["PrefixList"]["PrefixListId"]
        ec2.authorize_security_group_egress(
            GroupId=sg, IpPermissions=[{"IpProtocol": "-1", "PrefixListIds": [{"PrefixListId": pl_id}]}]
        )
        poller = Ec2Poller(region=REGION, clock=FakeClock())
        try:
            groups = await poller.security_groups([sg, "sg-0123456789abcdef0", "not-a-group"])
        finally:
            poller.close()
    info = groups[sg]
    assert info is not None
    assert (info.name, info.vpc_id, info.prefix_lists_sized) == ("pods", vpc, True)
    # inbound: 2 IPv4 CIDRs, 1 IPv6 CIDR, 1 group reference (counted against both families)
    assert (info.inbound.cidr_ipv4, info.inbound.cidr_ipv6, info.inbound.group_refs) == (2, 1, 1)
    assert (info.inbound.ipv4, info.inbound.ipv6) == (3, 2)
    # outbound: the default 0.0.0.0/0 rule plus a prefix list weighing its MaxEntries
    assert (info.outbound.ipv4, info.outbound.ipv6) == (1 + 7, 0)
    assert groups["sg-0123456789abcdef0"] is None  # EC2 has no such group
    assert groups["not-a-group"] is None


# ---- the poller against a moto server -----------------------------------------------------------------


async def test_refresh_end_to_end(moto_server: Server) -> None:
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2, secondary=(5, 8, 3))
    # ipamd also puts IPs on the primary ENI (not under custom networking).
    ec2.assign_private_ip_addresses(NetworkInterfaceId=cluster.primary_enis[0], SecondaryPrivateIpAddressCount=2)
    # A leaked CNI ENI (its node is gone): it takes subnet addresses but no node holds it.
    ec2.create_network_interface(
        SubnetId=cluster.subnets[0], Description="aws-K8S-i-0000000000000dead", SecondaryPrivateIpAddressCount=4
    )
    # Security groups for pods on node-1: a trunk ENI and two branch ENIs hanging off it.
    trunk = ec2.create_network_interface(SubnetId=cluster.subnets[1], Description="aws-k8s-trunk-eni")
    trunk_id = trunk["NetworkInterface"]["NetworkInterfaceId"]
    ec2.attach_network_interface(NetworkInterfaceId=trunk_id, InstanceId=cluster.instances[1], DeviceIndex=2)
    for _ in range(2):
        ec2.create_network_interface(
            SubnetId=cluster.subnets[1],
            Description="aws-k8s-branch-eni",
            TagSpecifications=[
                {
                    "ResourceType": "network-interface",
                    "Tags": [{"Key": "vpcresources.k8s.aws/trunk-eni-id", "Value": trunk_id}],
                }
            ],
        )
    index = build_index(cluster)
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock)
    try:
        result = await poller.refresh(index, cluster.node_instances)
        assert result.ok, result.failed
        assert {Call.VPC, Call.INSTANCE_TYPES, Call.ENIS, Call.SUBNETS} <= result.fetched
        assert poller.vpc_id == cluster.vpc  # discovered from the first node's instance
        assert {n: index.nodes[n].ec2_held for n in cluster.node_instances} == {
            "node-0": 2 + 5,
            "node-1": 8,
            "node-2": 3,
        }
        usage = result.instances[cluster.instances[1]]
        assert (usage.branch_enis, usage.trunk, usage.enis) == (2, True, 2)
        assert usage.primary_subnet == cluster.subnets[1]
        for subnet, zone in zip(cluster.subnets, ZONES, strict=True):
            figures = index.subnets[subnet]
            assert (figures.zone, figures.free_ips, figures.free_blocks) == (zone, live_free(ec2, subnet), None)
        # 251 usable - instance IP - (2 on the primary) - CNI ENI (1 + 5) - leaked ENI (1 + 4)
        assert index.subnets[cluster.subnets[0]].free_ips == 251 - 1 - 2 - 6 - 5
        assert result.nodes_updated == 3 and result.subnets_updated == 3
        first_success = poller.stats[Call.SUBNETS].last_success
        assert first_success == clock.now

        # Within the period: served from the TTL caches, nothing asked, nothing re-applied.
        version = index.version
        again = await poller.refresh(index, cluster.node_instances)
        assert again.fetched == frozenset() and {Call.ENIS, Call.SUBNETS} <= again.cached
        assert index.version == version

        # The CNI takes more: the index follows at the next refresh.
        ec2.assign_private_ip_addresses(NetworkInterfaceId=cluster.cni_enis[2], SecondaryPrivateIpAddressCount=6)
        extra = ec2.create_network_interface(
            SubnetId=cluster.subnets[0],
            Description=f"aws-K8S-{cluster.instances[0]}",
            SecondaryPrivateIpAddressCount=9,
        )["NetworkInterface"]["NetworkInterfaceId"]
        ec2.attach_network_interface(NetworkInterfaceId=extra, InstanceId=cluster.instances[0], DeviceIndex=3)
        clock.advance(31)
        result = await poller.refresh(index, cluster.node_instances)
        assert result.ok and {Call.ENIS, Call.SUBNETS} <= result.fetched
        assert index.nodes["node-0"].ec2_held == 2 + 5 + 9
        assert index.nodes["node-2"].ec2_held == 3 + 6
        for subnet in cluster.subnets:
            assert index.subnets[subnet].free_ips == live_free(ec2, subnet)
        assert poller.stats[Call.SUBNETS].last_success == clock.now > (first_success or 0)
        assert sum(s.errors for s in poller.stats.values()) == 0

        # A node that leaves the mapping drops back to the index's prediction.
        clock.advance(31)
        mapping = dict(cluster.node_instances)
        del mapping["node-2"]
        await poller.refresh(index, mapping)
        assert index.nodes["node-2"].ec2_held is None
    finally:
        poller.close()


async def test_extra_subnets_and_missing_subnets(moto_server: Server) -> None:
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    spare = ec2.create_subnet(VpcId=cluster.vpc, CidrBlock="10.0.9.0/25", AvailabilityZone=ZONES[0])
    spare_id = spare["Subnet"]["SubnetId"]
    index = build_index(cluster)
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock, vpc_id=cluster.vpc, cluster_name="prod")
    try:
        result = await poller.refresh(index, cluster.node_instances, {spare_id, "subnet-0000000000000dead"})
        assert result.ok
        assert Call.VPC not in result.fetched  # given, not discovered
        assert index.subnets[spare_id].free_ips == 128 - 5
        assert result.subnets_missing == {"subnet-0000000000000dead"}
        # The subnet is deleted in EC2: the index drops it after the next refresh.
        ec2.delete_subnet(SubnetId=spare_id)
        clock.advance(31)
        result = await poller.refresh(index, cluster.node_instances, {spare_id})
        assert spare_id in result.subnets_missing
        assert spare_id not in index.subnets
    finally:
        poller.close()


async def test_region_from_the_nodes_zone(moto_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """No region given and boto3's default points elsewhere: the nodes' zone (as in providerIDs) decides."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    index = build_index(cluster)
    poller = make_poller(moto_server.url, FakeClock(), region=None)
    try:
        result = await poller.refresh(index, cluster.node_instances)
    finally:
        poller.close()
    assert poller.region == REGION
    assert result.ok and index.nodes["node-1"].ec2_held == 8


async def test_unreachable_endpoint_keeps_last_good_data_and_recovers(moto_server: Server) -> None:
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    index = build_index(cluster)
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock)
    try:
        assert (await poller.refresh(index, cluster.node_instances)).ok
        good_held = {n: index.nodes[n].ec2_held for n in cluster.node_instances}
        good_free = {s: index.subnets[s].free_ips for s in cluster.subnets}
        good_success = poller.stats[Call.ENIS].last_success
        version = index.version

        moto_server.stop()
        clock.advance(31)
        result = await poller.refresh(index, cluster.node_instances)
        # subnets are asked first (see poller.refresh) and fail too; nothing is applied: a fresh subnet figure
        # needs fresh held figures beside it
        assert result.failed == {Call.SUBNETS: "unreachable", Call.ENIS: "unreachable"}
        assert {n: index.nodes[n].ec2_held for n in cluster.node_instances} == good_held
        assert {s: index.subnets[s].free_ips for s in cluster.subnets} == good_free
        assert index.version == version
        stats = poller.stats[Call.ENIS]
        assert stats.last_success == good_success
        assert (stats.errors, stats.consecutive_errors, stats.errors_by_reason) == (1, 1, {"unreachable": 1})
        assert stats.next_attempt == clock.now + 30  # first retry at the next regular refresh

        # Backing off: not even asked.
        clock.advance(10)
        result = await poller.refresh(index, cluster.node_instances)
        assert result.skipped == {Call.ENIS} and not result.failed  # subnets wait for ENIs
        assert poller.stats[Call.ENIS].attempts == 2

        # Still down at the retry: the backoff doubles.
        clock.advance(20)
        result = await poller.refresh(index, cluster.node_instances)
        assert Call.ENIS in result.failed
        assert poller.stats[Call.ENIS].next_attempt == clock.now + 60

        # Back, with changes made meanwhile.
        moto_server.restart()
        ec2.assign_private_ip_addresses(NetworkInterfaceId=cluster.cni_enis[1], SecondaryPrivateIpAddressCount=4)
        clock.advance(60)
        result = await poller.refresh(index, cluster.node_instances)
        assert result.ok and {Call.ENIS, Call.SUBNETS} <= result.fetched
        assert index.nodes["node-1"].ec2_held == 8 + 4
        assert index.subnets[cluster.subnets[1]].free_ips == live_free(ec2, cluster.subnets[1])
        stats = poller.stats[Call.ENIS]
        assert stats.last_success == clock.now and stats.consecutive_errors == 0 and stats.errors == 2
    finally:
        poller.close()


async def test_an_ip_assigned_between_the_two_reads_is_never_counted_gone_from_both(moto_server: Server) -> None:
    """ipamd tops a node's pool up at any moment, between a refresh's two reads too. Subnets are read first: an
    address assigned in between counts both free in its subnet and held on its node until the next refresh (a
    few more pods admitted), never gone from both, which would deny pods while the address sits warm on the
    node. The next refresh settles it."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    index = build_index(cluster)
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock)
    subnet = cluster.subnets[0]
    try:
        assert (await poller.refresh(index, cluster.node_instances)).ok
        held, free = index.nodes["node-0"].ec2_held, live_free(ec2, subnet)
        assert held == 5

        def top_up(**_: Any) -> None:  # ipamd, between the subnet read and the ENI read
            ec2.assign_private_ip_addresses(NetworkInterfaceId=cluster.cni_enis[0], SecondaryPrivateIpAddressCount=6)
            poller.client.meta.events.unregister("after-call.ec2.DescribeSubnets", top_up)

        poller.client.meta.events.register("after-call.ec2.DescribeSubnets", top_up)
        clock.advance(31)
        assert (await poller.refresh(index, cluster.node_instances)).ok
        assert index.nodes["node-0"].ec2_held == index.nodes["node-0"].warm == held + 6  # (no pods on it)
        assert index.subnets[subnet].free_ips == free  # read before the six went: credited twice, for now
        clock.advance(31)
        assert (await poller.refresh(index, cluster.node_instances)).ok
        assert index.subnets[subnet].free_ips == free - 6 == live_free(ec2, subnet)
    finally:
        poller.close()


async def test_throttling_keeps_last_good_enis(moto_server: Server) -> None:
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    index = build_index(cluster)
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock)
    try:
        assert (await poller.refresh(index, cluster.node_instances)).ok
        enis_success = poller.stats[Call.ENIS].last_success
        events = poller.client.meta.events
        events.register("before-send.ec2.DescribeNetworkInterfaces", throttle)
        ec2.assign_private_ip_addresses(NetworkInterfaceId=cluster.cni_enis[0], SecondaryPrivateIpAddressCount=7)

        clock.advance(31)
        result = await poller.refresh(index, cluster.node_instances)
        assert result.failed == {Call.ENIS: "throttled"}
        assert index.nodes["node-0"].ec2_held == 5  # the last good figure
        assert poller.stats[Call.ENIS].last_success == enis_success
        assert poller.stats[Call.ENIS].errors_by_reason == {"throttled": 1}
        # Subnets are not applied without fresh ENIs beside them: the last good pair stays.
        assert Call.SUBNETS not in result.fetched
        assert index.subnets[cluster.subnets[0]].free_ips != live_free(ec2, cluster.subnets[0])

        events.unregister("before-send.ec2.DescribeNetworkInterfaces", throttle)
        clock.advance(31)
        result = await poller.refresh(index, cluster.node_instances)
        assert result.ok
        assert index.nodes["node-0"].ec2_held == 5 + 7
        assert poller.stats[Call.ENIS].last_success == clock.now
    finally:
        poller.close()


async def test_prefix_delegation_free_blocks(moto_server: Server) -> None:
    """moto has no prefixes: an after-call hook adds /28s to one ENI in the answers, and the rest is exact."""
    ec2 = ec2_client(moto_server.url)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone=ZONES[0])["Subnet"]["SubnetId"]
    run = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="m5.large", SubnetId=subnet)
    instance = run["Instances"][0]["InstanceId"]
    assert run["Instances"][0]["PrivateIpAddress"] == "10.0.1.4"  # block 0, reserved anyway
    cni = ec2.create_network_interface(
        SubnetId=subnet,
        Description=f"aws-K8S-{instance}",
        PrivateIpAddress="10.0.1.20",  # block 1
    )["NetworkInterface"]["NetworkInterfaceId"]
    ec2.attach_network_interface(NetworkInterfaceId=cni, InstanceId=instance, DeviceIndex=1)
    ec2.create_network_interface(SubnetId=subnet, Description="ELB app/x", PrivateIpAddress="10.0.1.200")  # block 12
    prefixes = {cni: ["10.0.1.32/28", "10.0.1.48/28"]}  # blocks 2 and 3

    def add_prefixes(parsed: dict[str, Any], **_: Any) -> None:
        for eni in parsed.get("NetworkInterfaces", []):
            eni["Ipv4Prefixes"] = [{"Ipv4Prefix": p} for p in prefixes.get(eni["NetworkInterfaceId"], [])]

    index = CapacityIndex(cni=CniSettings(prefix_delegation=True))
    index.upsert_node("node-0", zone=ZONES[0], instance_type="m5.large", pod_subnet=subnet, allocatable_pods=110)
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock)
    poller.client.meta.events.register("after-call.ec2.DescribeNetworkInterfaces", add_prefixes)
    try:
        result = await poller.refresh(index, {"node-0": instance})
        assert result.ok and Call.SUBNET_ENIS in result.fetched
        assert index.nodes["node-0"].ec2_held == 2 * 16
        # blocked: 0 (reserved, .4), 1 (.20), 2 and 3 (prefixes), 12 (.200), 15 (reserved) -> 16 - 6
        assert index.subnets[subnet].free_blocks == result.subnets[subnet].free_blocks == 10
        assert index.subnets[subnet].free_ips == live_free(ec2, subnet) == 251 - 3  # moto ignores prefixes

        prefixes[cni].append("10.0.1.96/28")  # block 6
        clock.advance(31)
        await poller.refresh(index, {"node-0": instance})
        assert index.nodes["node-0"].ec2_held == 3 * 16
        assert index.subnets[subnet].free_blocks == 9

        # The subnet's ENIs cannot be read any more: the last good count stands for the staleness bound, then
        # is unknown (the free addresses alone count, as if unfragmented: an old count could deny on blocks
        # freed since, and nothing would say the data was old).
        def fail_subnet_enis(params: dict[str, Any], **_: Any) -> None:
            if "subnet-id" in str(params.get("body")):
                raise EndpointConnectionError(endpoint_url=moto_server.url)

        poller.client.meta.events.register("before-call.ec2.DescribeNetworkInterfaces", fail_subnet_enis)
        seen = []
        for _ in range(5):
            clock.advance(31)
            await poller.refresh(index, {"node-0": instance})
            seen.append(index.subnets[subnet].free_blocks)
        assert seen == [9, 9, 9, None, None], seen  # counted at t, kept to t + 120 s
    finally:
        poller.close()


def test_enis_are_read_across_pages_by_attachment_then_branch_enis_by_their_trunk() -> None:
    """moto answers in one page, so a Stubber serves two and checks MaxResults and NextToken go out. One query
    by attachment brings every ENI of the nodes (each once: no VPC-wide query by description, which would also
    bring other clusters' CNI ENIs); the branch ENIs, which hang off a trunk and are attached to no instance,
    are asked for by their trunk tag, and only when a node has a trunk."""
    ec2 = Ec2(region=REGION, page_size=5)
    provider = EniProvider(ec2, period=30.0)
    stubber = Stubber(ec2.client)
    vpc_filter = {"Name": "vpc-id", "Values": ["vpc-1"]}
    attached = [vpc_filter, {"Name": "attachment.instance-id", "Values": ["i-1"]}]
    page1 = [raw_eni("eni-p", description="Primary network interface", instance="i-1", device=0, ips=1)]
    page1 += [raw_eni(f"eni-{i}", description="aws-K8S-i-1", instance="i-1", device=i + 1, ips=2) for i in range(4)]
    page2 = [raw_eni("eni-4", description="aws-K8S-i-1", instance="i-1", device=5, ips=2),
             raw_eni("eni-t", description="aws-k8s-trunk-eni", instance="i-1", device=6, interface_type="trunk")]
    branches = [raw_eni("eni-b1", description="aws-k8s-branch-eni", interface_type="branch", trunk="eni-t")]
    stubber.add_response("describe_network_interfaces", {"NetworkInterfaces": page1, "NextToken": "page-2"},
                         {"Filters": attached, "MaxResults": 5})
    stubber.add_response("describe_network_interfaces", {"NetworkInterfaces": page2},
                         {"Filters": attached, "MaxResults": 5, "NextToken": "page-2"})
    stubber.add_response(
        "describe_network_interfaces",
        {"NetworkInterfaces": branches},
        {"Filters": [vpc_filter, {"Name": "tag:vpcresources.k8s.aws/trunk-eni-id", "Values": ["eni-t"]}],
         "MaxResults": 5},
    )
    try:
        with stubber:
            enis = provider.fetch_instance_enis(["i-1"], "vpc-1")
        stubber.assert_no_pending_responses()
    finally:
        ec2.close()
    assert len(enis) == 8
    usage = summarize_instances(enis, ["i-1"])["i-1"]
    assert (usage.enis, usage.secondary_ips, usage.trunk, usage.branch_enis) == (6, 5 * 2 + 1, True, 1)


async def eventually(predicate: Callable[[], bool]) -> None:
    for _ in range(500):  # 10 s
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_run_loop_never_raises_and_stops(moto_server: Server) -> None:
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    index = build_index(cluster)
    poller = make_poller(moto_server.url, asyncio.get_running_loop().time, eni_period=0.1, subnet_period=0.1)
    task = asyncio.create_task(poller.run(index, lambda: cluster.node_instances, lambda: set()))
    try:
        await eventually(lambda: index.nodes["node-0"].ec2_held == 5
                         and poller.stats[Call.SUBNETS].last_success is not None)
        moto_server.stop()
        await eventually(lambda: poller.stats[Call.ENIS].errors >= 2)
        assert not task.done()  # errors are counted, never raised
        poller.stop()
        async with asyncio.timeout(5):
            await task
        assert poller.loop_errors == 0
        assert index.nodes["node-0"].ec2_held == 5  # last good data kept
    finally:
        poller.close()
        task.cancel()


async def test_node_churn_does_not_multiply_eni_refreshes(moto_server: Server) -> None:
    """A node joining between two refreshes is fetched on its own (by attachment), not with a full refresh:
    EC2's request quota is shared with the CNI's ipamd."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    index = build_index(cluster)
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock)
    try:
        assert (await poller.refresh(index, cluster.node_instances)).ok
        filters = record_filters(poller, "DescribeNetworkInterfaces")
        # a new node (its instance in zone a's subnet) joins 5 s later
        run = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="m5.large",
                                SubnetId=cluster.subnets[0])
        ec2.assign_private_ip_addresses(NetworkInterfaceId=run["Instances"][0]["NetworkInterfaces"][0][
            "NetworkInterfaceId"], SecondaryPrivateIpAddressCount=6)
        index.upsert_node("node-new", zone=ZONES[0], instance_type="m5.large", pod_subnet=cluster.subnets[0],
                          allocatable_pods=29)
        instances = {**cluster.node_instances, "node-new": run["Instances"][0]["InstanceId"]}
        clock.advance(5)
        result = await poller.refresh(index, instances)
        assert result.ok and Call.ENIS in result.fetched
        assert filters == [["attachment.instance-id", "vpc-id"]]  # only the new node, by attachment
        assert index.nodes["node-new"].ec2_held == 6
        # nothing new, still within the period: EC2 is not asked again
        clock.advance(5)
        result = await poller.refresh(index, instances)
        assert Call.ENIS in result.cached and len(filters) == 1
        # the period passes: one full refresh, every node by attachment (no VPC-wide query by description)
        clock.advance(30)
        assert (await poller.refresh(index, instances)).ok
        assert len(filters) > 1 and all(f == ["attachment.instance-id", "vpc-id"] for f in filters[1:])
    finally:
        poller.close()


# ---- enhanced subnet discovery ------------------------------------------------------------------------


def tagged_subnet(ec2: Any, vpc: str, cidr: str, zone: str, value: str | None) -> str:
    subnet: str = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=zone)["Subnet"]["SubnetId"]
    if value is not None:
        ec2.create_tags(Resources=[subnet], Tags=[{"Key": "kubernetes.io/role/cni", "Value": value}])
    return subnet


@pytest.mark.parametrize(("value", "counts"), [("1", True), ("shared", True), ("0", False), ("", False), (None, False)])
def test_discovery_tag_as_ipamd_reads_it(value: str | None, counts: bool) -> None:
    """isSubnetValidForENICreation: `0` opts a subnet out, an empty value is no tag, any other value opts in."""
    tags = {} if value is None else {"kubernetes.io/role/cni": value}
    assert SubnetInfo("subnet-1", ZONES[0], "10.0.64.0/24", 251, tags=tags).cni_discoverable is counts


async def test_subnets_tagged_for_discovery_reach_the_index_with_their_tags(moto_server: Server) -> None:
    """VPC CNI 1.18+ (ENABLE_SUBNET_DISCOVERY) creates ENIs in subnets of the node's VPC and zone tagged
    kubernetes.io/role/cni, but not in those tagged `0` or with an empty value (ipamd's
    isSubnetValidForENICreation): the tagged ones are fetched with the node subnets
    (DescribeSubnets by tag-key in the VPC) and reach the index with their tags, where a node can use them."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    extra = tagged_subnet(ec2, cluster.vpc, "10.0.64.0/24", ZONES[0], "1")
    opted_out = tagged_subnet(ec2, cluster.vpc, "10.0.65.0/24", ZONES[0], "0")
    untagged = tagged_subnet(ec2, cluster.vpc, "10.0.66.0/24", ZONES[0], None)
    empty = tagged_subnet(ec2, cluster.vpc, "10.0.68.0/24", ZONES[0], "")  # ipamd reads it as no tag
    nodeless = tagged_subnet(ec2, cluster.vpc, "10.0.67.0/24", "us-east-1d", "1")  # no node in that zone
    elsewhere = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    foreign = tagged_subnet(ec2, elsewhere, "10.1.0.0/24", ZONES[0], "1")  # another VPC
    index = build_index(cluster)
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock)
    try:
        result = await poller.refresh(index, cluster.node_instances)
        assert result.ok and Call.SUBNETS in result.fetched
        assert index.subnets[extra].free_ips == 256 - 5
        assert index.subnets[extra].tags == {"kubernetes.io/role/cni": "1"}
        assert index.subnets[extra].zone == ZONES[0]
        assert extra in result.subnets and not result.subnets_missing
        for absent in (opted_out, untagged, empty, nodeless, foreign):
            assert absent not in index.subnets
        assert index.subnets[cluster.subnets[0]].tags == {}  # the node subnets carry theirs (none here)
        assert index.zones[ZONES[0]].subnet_ids == {cluster.subnets[0], extra}

        # The tag set to 0 (the subnet opted out): dropped from the index at the next subnet refresh.
        ec2.create_tags(Resources=[extra], Tags=[{"Key": "kubernetes.io/role/cni", "Value": "0"}])
        clock.advance(31)
        assert (await poller.refresh(index, cluster.node_instances)).ok
        assert extra not in index.subnets
        assert index.zones[ZONES[0]].subnet_ids == {cluster.subnets[0]}
    finally:
        poller.close()


@pytest.mark.parametrize("discovery", [True, False])
async def test_enis_that_carry_no_pod_ips_reach_the_index_as_lost_eni_slots(
    moto_server: Server, discovery: bool
) -> None:
    """hasRoomForEni takes the slots of unmanaged ENIs (tagged node.k8s.amazonaws.com/no_manage=true:
    setUnmanagedENIs) and of ENIs in subnets tagged kubernetes.io/role/cni=0 (IsSubnetExcluded, marked in
    setupENI only with subnet discovery on) off maxENI: node-0 (m5.large, 3 slots) with a no_manage ENI keeps two
    pod ENIs; node-1, whose own subnet is tagged 0, loses its primary ENI's slot (it carries no pod IP)."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    storage = ec2.create_network_interface(
        SubnetId=cluster.subnets[0], Description="storage", SecondaryPrivateIpAddressCount=2,
        TagSpecifications=[{"ResourceType": "network-interface",
                            "Tags": [{"Key": "node.k8s.amazonaws.com/no_manage", "Value": "true"}]}],
    )["NetworkInterface"]["NetworkInterfaceId"]  # fmt: skip
    ec2.attach_network_interface(NetworkInterfaceId=storage, InstanceId=cluster.instances[0], DeviceIndex=2)
    ec2.create_tags(Resources=[cluster.subnets[1]], Tags=[{"Key": "kubernetes.io/role/cni", "Value": "0"}])
    index = build_index(cluster, cni=CniSettings(subnet_discovery=discovery))
    result = await refresh_once(make_poller(moto_server.url, FakeClock()), index, cluster.node_instances)
    assert result.ok, result.failed
    node0, node1 = index.nodes["node-0"], index.nodes["node-1"]
    assert (node0.ec2_held, node0.ec2_enis, node0.lost_enis, node0.capacity) == (5, 2, 1, 2 * 9)
    if discovery:  # its primary ENI, empty, is excluded; its CNI ENI there still holds running pods' IPs
        assert (node1.ec2_held, node1.ec2_enis, node1.lost_enis, node1.capacity) == (8, 1, 1, 2 * 9)
    else:  # no exclusion without subnet discovery
        assert (node1.ec2_held, node1.ec2_enis, node1.lost_enis, node1.capacity) == (8, 2, 0, 3 * 9)


@pytest.mark.parametrize("discovery", [True, False])
async def test_a_node_in_a_subnet_tagged_out_takes_pod_ips_from_the_tagged_ones(
    moto_server: Server, discovery: bool
) -> None:
    """The node subnets tagged kubernetes.io/role/cni=0, pods in subnets tagged 1 (the layout subnet discovery
    is for): createENI skips the node's own subnet (isSubnetValidForENICreation) and tries the zone's tagged
    subnets most free first (GetVpcSubnets). A node whose pod ENI is in a tagged subnet draws from it; a node
    with no pod ENI yet from the zone's tagged subnet with most free addresses. Without discovery, the own."""
    ec2 = ec2_client(moto_server.url)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    nodes_subnet = tagged_subnet(ec2, vpc, "10.0.1.0/24", ZONES[0], "0")
    small = tagged_subnet(ec2, vpc, "10.0.64.0/26", ZONES[0], "1")
    large = tagged_subnet(ec2, vpc, "10.0.128.0/20", ZONES[0], "1")
    instances = []
    for _ in range(2):
        run = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="m5.large", SubnetId=nodes_subnet)
        instances.append(run["Instances"][0]["InstanceId"])
    eni = ec2.create_network_interface(SubnetId=small, Description=f"aws-K8S-{instances[0]}",
                                       SecondaryPrivateIpAddressCount=4)["NetworkInterface"]["NetworkInterfaceId"]
    ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=instances[0], DeviceIndex=1)
    node_instances = {"with-eni": instances[0], "fresh": instances[1]}
    index = CapacityIndex(None, CniSettings(subnet_discovery=discovery))
    for name in node_instances:
        index.upsert_node(name, zone=ZONES[0], instance_type="m5.large", pod_subnet=nodes_subnet,
                          allocatable_pods=29)
    poller = make_poller(moto_server.url, FakeClock())
    try:
        result = await poller.refresh(index, node_instances)
        assert result.ok, result.failed
        chosen = poller.pod_subnets(result.instances, dict.fromkeys(instances, ZONES[0]), discovery=discovery)
    finally:
        poller.close()
    if discovery:
        assert chosen == {instances[0]: small, instances[1]: large}
        assert (index.nodes["with-eni"].lost_enis, index.nodes["with-eni"].ec2_held) == (1, 4)
    else:
        assert chosen == dict.fromkeys(instances, nodes_subnet)


async def test_custom_networking_ignores_the_discovery_tag(moto_server: Server) -> None:
    """Custom networking takes precedence over subnet discovery: pod IPs come from the ENIConfig subnets only,
    so tagged subnets are not even asked for."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    extra = tagged_subnet(ec2, cluster.vpc, "10.0.64.0/24", ZONES[0], "1")
    index = build_index(cluster, cni=CniSettings(custom_networking=True))
    poller = make_poller(moto_server.url, FakeClock())
    filters = record_filters(poller, "DescribeSubnets")
    result = await refresh_once(poller, index, cluster.node_instances)
    assert result.ok and Call.SUBNETS in result.fetched
    assert extra not in index.subnets
    assert filters == [["subnet-id"]]


# ---- subnet CIDR reservations -------------------------------------------------------------------------


async def test_explicit_cidr_reservations_are_not_free_blocks(moto_server: Server) -> None:
    """EC2 never picks a prefix inside an explicit subnet CIDR reservation (only when asked by address), so
    free /28 blocks leave those ranges out; a `prefix` reservation is where EC2 takes prefixes from, so its
    blocks stay free. A /24 offers 14 free blocks when empty (first and last hold AWS's reserved addresses)."""
    ec2 = ec2_client(moto_server.url)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone=ZONES[0])["Subnet"]["SubnetId"]
    run = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="m5.large", SubnetId=subnet)
    instance = run["Instances"][0]["InstanceId"]  # its primary address .4 sits in block 0, reserved anyway
    ec2.create_subnet_cidr_reservation(SubnetId=subnet, Cidr="10.0.1.64/27", ReservationType="explicit")  # 4, 5
    ec2.create_subnet_cidr_reservation(SubnetId=subnet, Cidr="10.0.1.200/29", ReservationType="explicit")  # 12
    ec2.create_subnet_cidr_reservation(SubnetId=subnet, Cidr="10.0.1.128/28", ReservationType="prefix")
    index = CapacityIndex(cni=CniSettings(prefix_delegation=True))
    index.upsert_node("node-0", zone=ZONES[0], instance_type="m5.large", pod_subnet=subnet, allocatable_pods=110)
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock)
    try:
        result = await poller.refresh(index, {"node-0": instance})
        assert result.ok and Call.SUBNET_ENIS in result.fetched
        assert poller.stats[Call.CIDR_RESERVATIONS].last_success is not None
        assert index.subnets[subnet].free_blocks == 14 - 3
        # Reservations change rarely: asked once per TTL, not every period.
        attempts = poller.stats[Call.CIDR_RESERVATIONS].attempts
        clock.advance(31)
        assert (await poller.refresh(index, {"node-0": instance})).ok
        assert poller.stats[Call.CIDR_RESERVATIONS].attempts == attempts
        assert index.subnets[subnet].free_blocks == 11
    finally:
        poller.close()


async def test_reservations_denied_leave_the_figures_standing(moto_server: Server) -> None:
    """A policy without ec2:GetSubnetCidrReservations (deployed before it was needed) costs only the
    reservations: the error is counted, the free /28 count is made without them and the refresh is ok."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    ec2.create_subnet_cidr_reservation(SubnetId=cluster.subnets[0], Cidr="10.0.1.64/27", ReservationType="explicit")
    index = build_index(cluster, cni=CniSettings(prefix_delegation=True))
    poller = make_poller(moto_server.url, FakeClock())
    poller.client.meta.events.register("before-send.ec2.GetSubnetCidrReservations", denied)
    result = await refresh_once(poller, index, cluster.node_instances)
    assert result.ok and Call.SUBNETS in result.fetched
    assert poller.stats[Call.CIDR_RESERVATIONS].errors_by_reason == {"denied": 1}
    assert index.subnets[cluster.subnets[0]].free_blocks is not None


async def test_the_iam_policy_allows_every_call_the_poller_makes(moto_server: Server) -> None:
    """manifests/iam-policy.json is the role ipguard runs with: every EC2 operation a refresh (prefix
    delegation, subnet discovery, reservations) and a security-group lookup make is in it."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    tagged_subnet(ec2, cluster.vpc, "10.0.64.0/24", ZONES[0], "1")
    sg = ec2.create_security_group(GroupName="pods", Description="pods", VpcId=cluster.vpc)["GroupId"]
    pl = ec2.create_managed_prefix_list(PrefixListName="corp", MaxEntries=7, AddressFamily="IPv4")
    pl_id = pl["PrefixList"]["PrefixListId"]
    ec2.authorize_security_group_egress(
        GroupId=sg, IpPermissions=[{"IpProtocol": "-1", "PrefixListIds": [{"PrefixListId": pl_id}]}]
    )
    index = build_index(cluster, cni=CniSettings(prefix_delegation=True), limits=LimitsTable(bundled={}))
    poller = make_poller(moto_server.url, FakeClock())
    operations: set[str] = set()

    def record(event_name: str, **_: Any) -> None:
        operations.add(event_name.rsplit(".", 1)[-1])

    poller.client.meta.events.register("before-call.ec2", record)
    try:
        assert (await poller.refresh(index, cluster.node_instances)).ok
        await poller.security_groups([sg])
    finally:
        poller.close()
    policy = json.loads((REPO / "manifests" / "iam-policy.json").read_text())
    allowed = {action for statement in policy["Statement"] for action in statement["Action"]}
    assert operations == {
        "DescribeInstances", "DescribeInstanceTypes", "DescribeNetworkInterfaces", "DescribeSubnets",
        "GetSubnetCidrReservations", "DescribeSecurityGroups", "DescribeSecurityGroupRules",
        "DescribeManagedPrefixLists",
    }  # fmt: skip
    assert {f"ec2:{op}" for op in operations} <= allowed


# ---- the EKS control plane's ENIs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "name"),
    [
        ({"eks:cluster-name": "prod", "kubernetes.io/cluster/prod": "owned"}, "prod"),  # managed node group
        ({"aws:eks:cluster-name": "prod"}, "prod"),
        ({"eks:eks-cluster-name": "prod", "karpenter.sh/nodepool": "default"}, "prod"),  # Karpenter
        ({"kubernetes.io/cluster/prod": "owned", "Name": "prod-node"}, "prod"),  # self-managed, eksctl
        ({"kubernetes.io/cluster/a": "shared", "kubernetes.io/cluster/b": "shared"}, None),  # not ours to pick
        ({"Name": "bastion"}, None),
    ],
)
def test_cluster_name_from_instance_tags(tags: dict[str, str], name: str | None) -> None:
    assert cluster_name_from_tags([{"Key": k, "Value": v} for k, v in tags.items()]) == name


def control_plane_eni(ec2: Any, subnet: str, cluster: str) -> tuple[str, str]:
    eni = ec2.create_network_interface(SubnetId=subnet, Description=f"Amazon EKS {cluster}")["NetworkInterface"]
    return eni["NetworkInterfaceId"], eni["PrivateIpAddress"]


async def test_control_plane_enis_by_cluster_name(moto_server: Server) -> None:
    """EKS places its control plane's cross-account ENIs in the cluster subnets, described `Amazon EKS <cluster
    name>`: their addresses (where webhook calls come from) and their subnets' free addresses (a version update
    needs up to 5 there) come from DescribeNetworkInterfaces and DescribeSubnets; another cluster's are not
    ours, and none of it enters the capacity index."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    ours = [control_plane_eni(ec2, subnet, "prod") for subnet in cluster.subnets[:2]]
    control_plane_eni(ec2, cluster.subnets[2], "staging")  # another cluster in the same VPC
    elsewhere = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    other_subnet = ec2.create_subnet(VpcId=elsewhere, CidrBlock="10.1.0.0/24", AvailabilityZone=ZONES[0])
    control_plane_eni(ec2, other_subnet["Subnet"]["SubnetId"], "prod")  # same name, another VPC
    index = build_index(cluster)
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock, cluster_name="prod")
    try:
        result = await poller.refresh(index, cluster.node_instances)
        assert result.ok and Call.CONTROL_PLANE in result.fetched
        view = poller.control_plane
        assert view is not None and view == result.control_plane and view.cluster_name == "prod"
        assert view.addresses == {address for _, address in ours}
        assert view.subnet_ids == set(cluster.subnets[:2])
        assert {s: info.free_ips for s, info in view.subnets.items()} == {
            s: live_free(ec2, s) for s in cluster.subnets[:2]
        }
        # Within the period: not asked again.
        result = await poller.refresh(index, cluster.node_instances)
        assert Call.CONTROL_PLANE not in result.fetched and poller.control_plane == view
        # A version update: EKS adds an ENI; the next period sees it.
        added = control_plane_eni(ec2, cluster.subnets[2], "prod")
        clock.advance(31)
        result = await poller.refresh(index, cluster.node_instances)
        assert poller.control_plane is not None and added[1] in poller.control_plane.addresses
        assert poller.control_plane.subnet_ids == set(cluster.subnets)
    finally:
        poller.close()


async def test_cluster_name_detected_from_the_nodes_instances(moto_server: Server) -> None:
    """Without a name given, the tags EKS and its node launchers put on instances name the cluster; until one
    does, no control-plane call is made, and each instance is asked about once."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    (_, address) = control_plane_eni(ec2, cluster.subnets[0], "prod")
    index = build_index(cluster)
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock)
    try:
        result = await poller.refresh(index, cluster.node_instances)
        assert result.ok and Call.VPC in result.fetched and Call.CONTROL_PLANE not in result.fetched
        assert poller.cluster_name is None and poller.control_plane is None
        clock.advance(31)
        result = await poller.refresh(index, cluster.node_instances)
        assert Call.VPC not in result.fetched  # the same instances: not asked again

        # A node joins from a launcher that tags its instance.
        run = ec2.run_instances(
            ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="m5.large", SubnetId=cluster.subnets[0],
            TagSpecifications=[{"ResourceType": "instance",
                                "Tags": [{"Key": "kubernetes.io/cluster/prod", "Value": "owned"}]}],
        )  # fmt: skip
        index.upsert_node("node-new", zone=ZONES[0], instance_type="m5.large", pod_subnet=cluster.subnets[0],
                          allocatable_pods=29)  # fmt: skip
        instances = {**cluster.node_instances, "node-new": run["Instances"][0]["InstanceId"]}
        result = await poller.refresh(index, instances)
        assert {Call.VPC, Call.CONTROL_PLANE} <= result.fetched
        assert poller.cluster_name == "prod"
        assert poller.control_plane is not None and poller.control_plane.addresses == {address}
    finally:
        poller.close()



async def test_cluster_name_is_found_on_an_instance_past_the_first_call(moto_server: Server) -> None:
    """Each call asks about a few instances (20). When those carry no cluster tag, the next refresh asks the
    next ones: only the instances actually asked are done with (before, every instance counted as asked after
    the first call, and a cluster whose first 20 instances lacked the tags never learnt its name)."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    control_plane_eni(ec2, cluster.subnets[0], "prod")
    index = build_index(cluster)
    run = ec2.run_instances(ImageId=AMI, MinCount=22, MaxCount=22, InstanceType="m5.large",
                            SubnetId=cluster.subnets[0])
    instances = dict(cluster.node_instances)
    for i, instance in enumerate(run["Instances"]):
        index.upsert_node(f"node-extra-{i}", zone=ZONES[0], instance_type="m5.large", pod_subnet=cluster.subnets[0],
                          allocatable_pods=29)
        instances[f"node-extra-{i}"] = instance["InstanceId"]
    last = max(instances.values())  # sorts after the first call's 20
    ec2.create_tags(Resources=[last], Tags=[{"Key": "kubernetes.io/cluster/prod", "Value": "owned"}])
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock)
    try:
        names = []
        for _ in range(3):
            await poller.refresh(index, instances)
            names.append(poller.cluster_name)
            clock.advance(31)
        assert names[0] is None and names[-1] == "prod", names
    finally:
        poller.close()


# ---- subnets new nodes can launch into ----------------------------------------------------------------


async def test_launch_subnets_reach_the_index_as_launchable(moto_server: Server) -> None:
    """Subnets an autoscaler launches into (Karpenter's EC2NodeClass status) are fetched with the others and
    handed to the index as launchable, also in a zone with no node; one that leaves every class is dropped,
    unless a node still uses it."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    spare = tagged_subnet(ec2, cluster.vpc, "10.0.70.0/24", "us-east-1d", None)  # no node in us-east-1d
    index = build_index(cluster)
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock)
    try:
        launch = {spare, cluster.subnets[0]}
        result = await poller.refresh(index, cluster.node_instances, launch_subnets=launch)
        assert result.ok
        assert index.subnets[spare].launchable and index.subnets[spare].free_ips == 256 - 5
        assert index.subnets[spare].zone == "us-east-1d"
        assert index.subnets[cluster.subnets[0]].launchable
        assert not index.subnets[cluster.subnets[1]].launchable

        # The classes change: the spare subnet is no longer a launch target, the node subnet stays (its node
        # uses it) but is no longer launchable. New targets are fetched at once, not a period later.
        result = await poller.refresh(index, cluster.node_instances, launch_subnets=set())
        assert Call.SUBNETS in result.fetched
        assert spare not in index.subnets
        assert not index.subnets[cluster.subnets[0]].launchable
    finally:
        poller.close()


# ---- the nodes' ENIs fetched and parsed in a worker process ---------------------------------------------


def ec2_view(index: CapacityIndex, result: RefreshResult) -> tuple[object, ...]:
    nodes = {name: (node.ec2_held, node.ec2_enis) for name, node in index.nodes.items()}
    subnets = {sid: (subnet.free_ips, subnet.free_blocks) for sid, subnet in index.subnets.items()}
    return dict(result.instances), nodes, subnets, index.aggregates()


async def test_a_refresh_fetched_in_a_worker_process_gives_the_thread_figures_and_a_recount(
    moto_server: Server,
) -> None:
    """`serve` fetches and parses the nodes' ENIs (and, under prefix delegation, the pod subnets' ENIs) in a
    worker process that ships back per-node figures: the index it leaves is the one the thread pool's fetch
    leaves, and its aggregates equal a fresh recount."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2, secondary=(5, 8, 3))
    ec2.assign_private_ip_addresses(NetworkInterfaceId=cluster.primary_enis[0], SecondaryPrivateIpAddressCount=2)
    trunk = ec2.create_network_interface(SubnetId=cluster.subnets[1], Description="aws-k8s-trunk-eni")
    trunk_id = trunk["NetworkInterface"]["NetworkInterfaceId"]
    ec2.attach_network_interface(NetworkInterfaceId=trunk_id, InstanceId=cluster.instances[1], DeviceIndex=2)
    ec2.create_network_interface(
        SubnetId=cluster.subnets[1], Description="aws-k8s-branch-eni",
        TagSpecifications=[{"ResourceType": "network-interface",
                            "Tags": [{"Key": "vpcresources.k8s.aws/trunk-eni-id", "Value": trunk_id}]}],
    )  # fmt: skip
    views = {}
    for in_process in (False, True):
        index = build_index(cluster, CniSettings(prefix_delegation=True))
        poller = make_poller(moto_server.url, FakeClock(), fetch_in_process=in_process)
        try:
            result = await poller.refresh(index, cluster.node_instances)
            assert result.ok, result.failed
            assert {Call.ENIS, Call.SUBNET_ENIS, Call.SUBNETS} <= result.fetched
            assert index.aggregates() == index.recount()
            views[in_process] = ec2_view(index, result)
        finally:
            poller.close()
    assert views[True] == views[False]
    assert result.instances[cluster.instances[1]].branch_enis == 1


async def test_worker_process_errors_are_counted_like_thread_errors_and_keep_the_last_figures(
    moto_server: Server,
) -> None:
    """An EC2 error inside the worker process comes back as the same error: classified, counted, backed off,
    and the index keeps its last good figures."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2)
    index = build_index(cluster)
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock, fetch_in_process=True)
    try:
        assert (await poller.refresh(index, cluster.node_instances)).ok
        good_held = {n: index.nodes[n].ec2_held for n in cluster.node_instances}
        moto_server.stop()
        clock.advance(31)
        result = await poller.refresh(index, cluster.node_instances)
        assert result.failed == {Call.SUBNETS: "unreachable", Call.ENIS: "unreachable"}  # subnets asked first
        assert poller.stats[Call.ENIS].errors_by_reason == {"unreachable": 1}
        assert {n: index.nodes[n].ec2_held for n in cluster.node_instances} == good_held
    finally:
        poller.close()


def test_a_worker_process_makes_its_own_session() -> None:
    """A given boto3 session cannot cross into another process."""
    with pytest.raises(ValueError, match="its own boto3 session"):
        Ec2(region=REGION, session=boto3.session.Session(), fetch_in_process=True)


# ---- incremental refreshes: only what changed crosses from the worker, applied in slices -------------------


def secondary_ips(ec2: Any, eni_id: str) -> set[str]:
    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
    return {a["PrivateIpAddress"] for a in eni["PrivateIpAddresses"] if not a["Primary"]}


def kill_worker(poller: Ec2Poller) -> None:
    """Kill the poller's EC2 worker process, as the kernel's OOM killer would."""
    processes = poller.ec2._processes
    assert processes is not None
    for worker in list(getattr(processes, "_processes", {}).values()):
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)


async def test_the_worker_ships_only_the_nodes_whose_figures_changed(moto_server: Server) -> None:
    """The worker process remembers what it last shipped and sends only the instances whose figures changed
    (one that returns to an earlier figure included); the first refresh after a restart of ipguard or of the
    worker ships every node. After each refresh the index equals a fresh recount and the figures equal a
    whole fetch's."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2, secondary=(5, 8, 3))
    index = build_index(cluster)
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock, fetch_in_process=True)

    async def refresh() -> RefreshResult:
        clock.advance(31)
        result = await poller.refresh(index, cluster.node_instances)
        assert result.ok, result.failed
        assert index.aggregates() == index.recount()
        return result

    try:
        first = await refresh()
        assert poller.enis.last_shipped == 3 and first.nodes_updated == 3
        held = {n: index.nodes[n].ec2_held for n in cluster.node_instances}
        assert held == {"node-0": 5, "node-1": 8, "node-2": 3}

        await refresh()
        assert poller.enis.last_shipped == 0

        before = secondary_ips(ec2, cluster.cni_enis[2])
        ec2.assign_private_ip_addresses(NetworkInterfaceId=cluster.cni_enis[2], SecondaryPrivateIpAddressCount=4)
        result = await refresh()
        assert poller.enis.last_shipped == 1 and result.nodes_updated == 1
        assert index.nodes["node-2"].ec2_held == 3 + 4
        assert {iid: u.held_ips() for iid, u in result.instances.items()} == dict(
            zip(cluster.instances, (5, 8, 7), strict=True))

        # Back to the figure it had two refreshes ago: still a change from what was shipped last.
        ec2.unassign_private_ip_addresses(NetworkInterfaceId=cluster.cni_enis[2],
                                          PrivateIpAddresses=sorted(secondary_ips(ec2, cluster.cni_enis[2]) - before))
        await refresh()
        assert poller.enis.last_shipped == 1
        assert {n: index.nodes[n].ec2_held for n in cluster.node_instances} == held

        kill_worker(poller)
        clock.advance(31)
        lost = await poller.refresh(index, cluster.node_instances)
        assert Call.ENIS in lost.failed  # the broken pool is noticed on the next call; a new worker after it
        assert {n: index.nodes[n].ec2_held for n in cluster.node_instances} == held
        ec2.assign_private_ip_addresses(NetworkInterfaceId=cluster.cni_enis[0], SecondaryPrivateIpAddressCount=1)
        await refresh()
        assert poller.enis.last_shipped == 3  # a new worker knows nothing of what was shipped
        assert index.nodes["node-0"].ec2_held == 6
        await refresh()
        assert poller.enis.last_shipped == 0
    finally:
        poller.close()

    restarted = make_poller(moto_server.url, clock, fetch_in_process=True)
    try:
        clock.advance(31)
        assert (await restarted.refresh(index, cluster.node_instances)).ok
        assert restarted.enis.last_shipped == 3
        assert index.aggregates() == index.recount()
    finally:
        restarted.close()


async def test_a_node_recreated_in_the_index_gets_its_figures_though_they_did_not_change(
    moto_server: Server,
) -> None:
    """What is shipped is what changed in EC2, but the index is brought to EC2's figures: a node the watch
    removed and re-added (its EC2 figure dropped) gets it again at the next refresh, with nothing shipped."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2, secondary=(5, 8, 3))
    index = build_index(cluster)
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock)
    try:
        assert (await poller.refresh(index, cluster.node_instances)).ok
        index.remove_node("node-1")
        index.upsert_node("node-1", zone=ZONES[1], instance_type="m5.large", pod_subnet=cluster.subnets[1],
                          allocatable_pods=29)
        assert index.nodes["node-1"].ec2_held is None
        clock.advance(31)
        result = await poller.refresh(index, cluster.node_instances)
        assert poller.enis.last_shipped == 0 and result.nodes_updated == 1
        assert index.nodes["node-1"].ec2_held == 8
        assert index.aggregates() == index.recount()
    finally:
        poller.close()


async def test_a_refresh_applied_in_slices_lets_admissions_and_pod_events_in_between(moto_server: Server) -> None:
    """The nodes' figures are applied a slice at a time with the event loop free in between: admissions and
    watch events land while some nodes have this refresh's figures and others the last one's; each node is
    whole at any moment, and after the refresh the index equals a fresh recount."""
    ec2 = ec2_client(moto_server.url)
    cluster = create_cluster(ec2, secondary=(5, 8, 3))
    index = build_index(cluster)
    settings = Settings()
    clock = FakeClock()
    poller = make_poller(moto_server.url, clock)
    poller.apply_slice = 0.0  # a slice per node
    seen: list[int] = []  # nodes with EC2's figure, as each interleaved step saw them
    refreshing = True

    async def traffic() -> None:
        n = 0
        while refreshing:
            n += 1
            seen.append(sum(node.ec2_held is not None for node in index.nodes.values()))
            node = f"node-{n % 3}"
            index.upsert_pod(f"apps/p{n}", node, PodUse.IP)
            if n % 2:
                index.remove_pod(f"apps/p{n - 1}")
            pod = {"metadata": {"name": f"q{n}", "namespace": "apps"}, "spec": {"containers": [{"name": "c"}]}}
            decision = decide(pod, index, settings, namespace="apps")
            if decision.reserve_zone is not None:
                index.reserve(f"apps/q{n}", decision.reserve_zone, decision.reserve_node)
            # Ready again at once, to take every turn the refresh gives; but the GIL is let go meanwhile, else
            # moto's threads and boto3's (the same process) would wait up to a switch interval per step.
            time.sleep(0.0002)  # noqa: ASYNC251 - on purpose: the loop stays busy, the GIL does not
            await asyncio.sleep(0)

    try:
        task = asyncio.create_task(traffic())
        result = await poller.refresh(index, cluster.node_instances)
        refreshing = False
        await task
        assert result.ok and result.nodes_updated == 3
        assert any(0 < applied < 3 for applied in seen), seen  # a decision between two slices
        assert index.aggregates() == index.recount()
        assert {n: index.nodes[n].ec2_held for n in cluster.node_instances} == {"node-0": 5, "node-1": 8,
                                                                                 "node-2": 3}
    finally:
        poller.close()


figures = st.sampled_from([
    InstanceEnis("i-?", (EniHold("subnet-a", ips, 0, True),), primary_subnet="subnet-a") for ips in (0, 3, 7)])
views = st.dictionaries(st.sampled_from(["i-1", "i-2", "i-3", "i-4"]), figures, max_size=4)


@given(st.lists(st.tuples(views, st.sets(st.sampled_from(["i-1", "i-2", "i-3", "i-4"])), st.booleans(),
                          st.sampled_from(["kept", "lost", "worker restarted"])), max_size=12))
@examples(max_examples=300, deadline=None)
def test_a_view_kept_from_changes_equals_whole_answers(
    steps: list[tuple[dict[str, InstanceEnis], set[str], bool, str]],
) -> None:
    """Whatever answers are lost on the way or whatever worker restarts in between, the view the poller keeps
    from the changes it is shipped equals the one whole answers give: every asked instance EC2 knows with its
    current figure (and, for the nodes that joined only, the others as they were)."""
    shipped = ShippedFigures()
    view: dict[str, InstanceEnis] = {}
    token: str | None = None
    exact = False  # the worker's memory is the poller's view: only what differs is shipped
    for ec2_now, joined, whole, fate in steps:
        asked = frozenset(ec2_now) | frozenset(joined) if whole else frozenset(joined)
        if fate == "worker restarted":
            shipped, exact = ShippedFigures(), False
        fresh = {iid: f for iid, f in ec2_now.items() if iid in asked}
        answer = shipped.answer(fresh, asked, whole, token)
        if fate == "lost":
            exact = False
            continue
        expected = dict(fresh) if whole else {**{i: f for i, f in view.items() if i not in asked}, **fresh}
        differs = {iid for iid, f in fresh.items() if view.get(iid) != f}
        assert differs <= set(answer.changed) <= set(fresh)
        assert set(answer.changed) == differs if exact else answer.complete or token is not None
        exact = whole or (exact and not answer.complete)
        view, token = answer.merged(view, asked, whole), answer.token
        assert view == expected
