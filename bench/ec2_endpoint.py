"""A local EC2 endpoint for bench/ec2.py --scale: the query API's XML, in the shape EC2 answers it, for a cluster
too large for moto to hold quickly (5,000 nodes, 15,000 ENIs).

Answers DescribeNetworkInterfaces (filters vpc-id, description with `*` wildcards, attachment.instance-id,
subnet-id, tag:KEY; MaxResults/NextToken pages), DescribeSubnets (subnet-id, vpc-id, tag-key) and, empty,
every other action ipguard's poller asks (DescribeInstanceTypes: EC2 knows no type, so the bundled table stays).
Each ENI entry carries what EC2 returns for a VPC CNI ENI (attachment, group set, tags, one item per private
address with its DNS name, ...): about 190 bytes per address, 5-6 MB per 1,000-ENI page at 30 addresses each,
as recorded pages are. Counts calls and bytes per action (GET /stats). With `churn`, a share of the nodes
gains or loses one address at each refresh, as a busy cluster's nodes do from one period to the next.

The responses are rendered once at start; the process serving them is not the one measured.
"""

from __future__ import annotations

import fnmatch
import random
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from aiohttp import web

VPC = "vpc-0b1e2c3d4e5f60718"
OTHER_VPC_CLUSTER = "other"  # a second cluster sharing the VPC (--foreign-enis)
OWNER = "111122223333"  # the documentation's example account
NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
SECURITY_GROUP = "sg-0a1b2c3d4e5f60718"


def instance_id(n: int, cluster: str = "") -> str:
    return f"i-{(n + (10**9 if cluster else 0)):017x}"


@dataclass(slots=True)
class FakeEni:
    eni_id: str
    subnet_id: str
    description: str
    instance_id: str | None
    tags: dict[str, str]
    xml: bytes
    other_xml: bytes | None = None  # the same ENI with one address fewer (--churn flips between the two)

    def flip(self) -> None:
        if self.other_xml is not None:
            self.xml, self.other_xml = self.other_xml, self.xml


@dataclass
class Cluster:
    enis: list[FakeEni] = field(default_factory=list)
    subnets: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # id -> zone, cidr, free
    churn: float = 0.0  # the share of nodes whose first CNI ENI gains or loses an address at each refresh
    refreshes: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(11))

    def next_refresh(self) -> None:
        """A refresh begins: `churn` of the nodes' first CNI ENIs flip (one address more or fewer)."""
        self.refreshes += 1
        flippable = [e for e in self.enis if e.other_xml is not None]
        for eni in self.rng.sample(flippable, round(self.churn * len(flippable))):
            eni.flip()


def _address(k: int) -> str:
    return f"10.{(k >> 16) & 255}.{(k >> 8) & 255}.{k & 255}"


def _eni_xml(eni_id: str, subnet: str, zone: str, description: str, instance: str, device: int,
             addresses: list[str], tags: dict[str, str], attach_n: int) -> bytes:
    primary = addresses[0]
    ips = "".join(
        f"<item><privateIpAddress>{a}</privateIpAddress><privateDnsName>ip-{a.replace('.', '-')}.ec2.internal"
        f"</privateDnsName><primary>{'true' if i == 0 else 'false'}</primary></item>"
        for i, a in enumerate(addresses))
    tag_xml = "".join(f"<item><key>{k}</key><value>{v}</value></item>" for k, v in tags.items())
    return (
        f"<item><networkInterfaceId>{eni_id}</networkInterfaceId><subnetId>{subnet}</subnetId><vpcId>{VPC}</vpcId>"
        f"<availabilityZone>{zone}</availabilityZone><description>{description}</description>"
        f"<ownerId>{OWNER}</ownerId><requesterManaged>false</requesterManaged><status>in-use</status>"
        f"<macAddress>02:{attach_n % 256:02x}:{(attach_n >> 8) % 256:02x}:3c:4d:5e</macAddress>"
        f"<privateIpAddress>{primary}</privateIpAddress>"
        f"<privateDnsName>ip-{primary.replace('.', '-')}.ec2.internal</privateDnsName>"
        f"<sourceDestCheck>true</sourceDestCheck><groupSet><item><groupId>{SECURITY_GROUP}</groupId>"
        f"<groupName>eks-cluster-sg-bench-1234567890</groupName></item></groupSet>"
        f"<attachment><attachmentId>eni-attach-{attach_n:017x}</attachmentId><instanceId>{instance}</instanceId>"
        f"<instanceOwnerId>{OWNER}</instanceOwnerId><deviceIndex>{device}</deviceIndex>"
        f"<networkCardIndex>0</networkCardIndex><status>attached</status>"
        f"<attachTime>2026-11-30T08:00:00.000Z</attachTime><deleteOnTermination>true</deleteOnTermination>"
        f"</attachment><tagSet>{tag_xml}</tagSet><privateIpAddressesSet>{ips}</privateIpAddressesSet>"
        f"<ipv6AddressesSet/><interfaceType>interface</interfaceType></item>"
    ).encode()


def build_cluster(nodes: int, zones: int, enis_per_node: int, ips: tuple[int, int], foreign_enis: int,
                  seed: int = 3, churn: float = 0.0) -> Cluster:
    """The nodes of bench/index.py's `build` (node i: instance `instance_id(i)`, pod subnet
    subnet-<zone>-<i % 3>): a primary ENI and enis_per_node - 1 CNI ENIs each, with ips[0]..ips[1] addresses
    (the primary's own included); then foreign_enis CNI ENIs of another cluster's nodes in the same VPC.
    `churn`: at each refresh (the first page asked by attachment for the first node), that share of the nodes
    sees its first CNI ENI gain or lose one address."""
    rng = random.Random(seed)
    zone_names = [f"us-east-1{chr(ord('a') + z)}" for z in range(zones)]
    cluster = Cluster(churn=churn)
    subnet_rng = random.Random(7)  # bench/index.py's build draws the subnets' free addresses from this seed
    for z, zone in enumerate(zone_names):
        for s in range(3):
            cluster.subnets[f"subnet-{zone}-{s}"] = (zone, f"10.{z}.{s * 16}.0/20", subnet_rng.randint(0, 4000))
    k = 1 << 20
    n_eni = 0

    def add(node: int, cluster_name: str, device: int) -> None:
        nonlocal k, n_eni
        zone = zone_names[node % zones]
        subnet = f"subnet-{zone}-{node % 3}"
        instance = instance_id(node, cluster_name)
        count = rng.randint(*ips)
        addresses = [_address(k + j) for j in range(count)]
        k += count
        n_eni += 1
        eni_id = f"eni-{n_eni:017x}"
        description = "" if device == 0 else f"aws-K8S-{instance}"
        tags = {} if device == 0 else {"node.k8s.amazonaws.com/instance_id": instance,
                                       "cluster.k8s.amazonaws.com/name": cluster_name or "bench"}
        xml = _eni_xml(eni_id, subnet, zone, description, instance, device, addresses, tags, n_eni)
        other = (_eni_xml(eni_id, subnet, zone, description, instance, device, addresses[:-1], tags, n_eni)
                 if churn and device == 1 and not cluster_name else None)
        cluster.enis.append(FakeEni(eni_id, subnet, description, instance, tags, xml, other))

    for node in range(nodes):
        for device in range(enis_per_node):
            add(node, "", device)
    for e in range(foreign_enis):
        add(e // 2, OTHER_VPC_CLUSTER, 1 + e % 2)
    return cluster


def _filters(params: dict[str, str]) -> list[tuple[str, list[str]]]:
    out = []
    n = 1
    while f"Filter.{n}.Name" in params:
        values = []
        m = 1
        while f"Filter.{n}.Value.{m}" in params:
            values.append(params[f"Filter.{n}.Value.{m}"])
            m += 1
        out.append((params[f"Filter.{n}.Name"], values))
        n += 1
    return out


def _eni_matches(eni: FakeEni, filters: list[tuple[str, list[str]]]) -> bool:
    for name, values in filters:
        if name == "vpc-id":
            ok = VPC in values
        elif name == "description":
            ok = any(fnmatch.fnmatchcase(eni.description, v) for v in values)
        elif name == "attachment.instance-id":
            ok = eni.instance_id in values
        elif name == "subnet-id":
            ok = eni.subnet_id in values
        elif name.startswith("tag:"):
            ok = eni.tags.get(name[4:]) in values
        else:
            ok = False  # a filter this endpoint does not know matches nothing (as EC2's unknown values do)
        if not ok:
            return False
    return True


def _response(action: str, body: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<{action}Response xmlns="{NS}">'
            f"<requestId>6f9b2c1e-0000-4000-8000-000000000000</requestId>{body}</{action}Response>").encode()


def app(cluster: Cluster) -> web.Application:
    stats: Counter[str] = Counter()

    async def query(request: web.Request) -> web.Response:
        params = dict(parse_qsl((await request.read()).decode()))
        action = params.get("Action", "")
        filters = _filters(params)
        if action == "DescribeNetworkInterfaces":
            size = int(params.get("MaxResults", "1000"))
            start = int(params.get("NextToken", "0"))
            if cluster.churn and start == 0 and ("attachment.instance-id", [instance_id(0)]) in [
                    (n, v[:1]) for n, v in filters]:
                cluster.next_refresh()
            matching = [e for e in cluster.enis if _eni_matches(e, filters)]
            page = matching[start:start + size]
            token = f"<nextToken>{start + size}</nextToken>" if start + size < len(matching) else ""
            body = (b"<networkInterfaceSet>" + b"".join(e.xml for e in page) + b"</networkInterfaceSet>"
                    + token.encode())
            data = _response(action, body.decode())
        elif action == "DescribeSubnets":
            items = []
            for subnet_id, (zone, cidr, free) in cluster.subnets.items():
                wanted = all(subnet_id in v if n == "subnet-id" else VPC in v if n == "vpc-id" else False
                             for n, v in filters)
                if wanted:
                    items.append(f"<item><subnetId>{subnet_id}</subnetId><state>available</state><vpcId>{VPC}</vpcId>"
                                 f"<ownerId>{OWNER}</ownerId><cidrBlock>{cidr}</cidrBlock>"
                                 f"<availableIpAddressCount>{free}</availableIpAddressCount>"
                                 f"<availabilityZone>{zone}</availabilityZone><defaultForAz>false</defaultForAz>"
                                 f"<mapPublicIpOnLaunch>false</mapPublicIpOnLaunch><tagSet/></item>")
            data = _response(action, f"<subnetSet>{''.join(items)}</subnetSet>")
        else:
            data = _response(action, "")
        stats[f"{action} calls"] += 1
        stats[f"{action} bytes"] += len(data)
        return web.Response(body=data, content_type="text/xml")

    async def get_stats(request: web.Request) -> web.Response:
        out = dict(stats)
        if request.query.get("reset"):
            stats.clear()
        return web.json_response(out)

    application = web.Application(client_max_size=1 << 20)
    application.router.add_post("/", query)
    application.router.add_get("/stats", get_stats)
    return application
