"""SecurityGroupPolicies, ENIConfigs and branch-ENI pods judged live: ipguard's Service against the fake API
server (service accounts, policies, pods through the real kubernetes-asyncio client) and EC2 plus Service
Quotas in a moto server (real security groups with rules, subnets in zones), answering over real HTTPS.
Every deny and warn case with the exact figures in its message; stale EC2 data never denies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import live, scrape
from tests.fakekube import FakeKube
from tests.live import aws_env  # noqa: F401  (autouse fixture)
from webhook.apiserver import ENI_CONFIG, SECURITY_GROUP_POLICY, admission_review, as_created
from webhook.service import ServeOptions, Service
from webhook.sources import vpc
from webhook.sources.ec2.client import Call
from webhook.sources.kube import api_client

A, B = "us-east-1a", "us-east-1b"


@dataclass
class Groups:
    plain: list[str]  # six groups with a rule or two each
    near: str  # 55 inbound IPv4 rules: within 10% of the 60 quota
    v6: str  # 28 inbound IPv4 and 28 inbound IPv6 rules: counted apart, neither is near the quota


def make_groups(ec2: Any, vpc: str) -> Groups:
    def group(name: str) -> str:
        return str(ec2.create_security_group(GroupName=name, Description=name, VpcId=vpc)["GroupId"])

    plain = [group(f"plain-{i}") for i in range(6)]
    for gid in plain:
        ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}])
    near = group("near-quota")
    ec2.authorize_security_group_ingress(GroupId=near, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443,
         "IpRanges": [{"CidrIp": f"10.{i}.0.0/16"} for i in range(55)]}])
    v6 = group("dual-stack")
    ec2.authorize_security_group_ingress(GroupId=v6, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80,
         "IpRanges": [{"CidrIp": f"10.{i}.0.0/16"} for i in range(28)],
         "Ipv6Ranges": [{"CidrIpv6": f"2001:db8:{i:x}::/48"} for i in range(28)]}])
    return Groups(plain, near, v6)


@dataclass
class Env:
    fk: FakeKube
    moto: live.Moto
    ec2: live.Ec2Cluster
    groups: Groups
    service: Service
    client: live.Client
    clock: live.Clock

    async def validate(self, kind: Any, obj: dict[str, Any], namespace: str | None = "shop",
                       old: dict[str, Any] | None = None) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        created = as_created(obj, name)
        return await self.client.post("/validate", admission_review(created, namespace, name, kind=kind,
                                                                    old_object=old))


def sgp(name: str, groups: list[str], pod: dict[str, Any] | None = None,
        sa: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"securityGroups": {"groupIds": groups}}
    if pod is not None:
        spec["podSelector"] = pod
    if sa is not None:
        spec["serviceAccountSelector"] = sa
    return {"apiVersion": "vpcresources.k8s.aws/v1beta1", "kind": "SecurityGroupPolicy",
            "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


def eniconfig(name: str, subnet: str, groups: list[str]) -> dict[str, Any]:
    return {"apiVersion": "crd.k8s.amazonaws.com/v1alpha1", "kind": "ENIConfig", "metadata": {"name": name},
            "spec": {"subnet": subnet, "securityGroups": groups}}


@pytest.fixture
async def env(moto: live.Moto, tmp_path: Path) -> AsyncIterator[Env]:
    ec2c = live.build_ec2(moto.ec2())
    groups = make_groups(moto.ec2(), ec2c.vpc)
    fk = FakeKube(bookmark_interval=0.5)
    url = await fk.start()
    await live.load_kube(fk, ec2c)
    await fk.update("daemonsets", live.aws_node({"WARM_ENI_TARGET": "1", "ENABLE_POD_ENI": "true",
                                                 "ENI_CONFIG_LABEL_DEF": "topology.kubernetes.io/zone"}),
                    namespace="kube-system")
    await fk.create("serviceaccounts", {"apiVersion": "v1", "kind": "ServiceAccount",
                                        "metadata": {"name": "default", "namespace": "shop",
                                                     "labels": {"team": "shop"}}}, namespace="shop")
    # Pods a-0..a-17 (label app=a) run in us-east-1a: the existing policy selects them by label.
    await fk.create("securitygrouppolicies", sgp("a-existing", groups.plain[:3], {"matchLabels": {"app": "a"}}),
                    namespace="shop")
    paths = live.certs(tmp_path)
    clock = live.Clock()
    options = ServeOptions(host="127.0.0.1", port=0, tls_cert=paths.tls_cert, tls_key=paths.tls_key,
                           region=live.REGION, ec2_endpoint_url=moto.url, ec2_period=0.5, ec2_tick=0.2,
                           watch_timeout=5, vpc_period=1000.0)
    service = Service(await api_client(host=url), options, clock=clock)
    running = await service.start()
    client = live.Client(running.url, paths.ca_cert)
    try:
        await live.eventually(lambda: service.loaded() and bool(service.state.vpc.groups), "loaded, VPC listed")
        await live.eventually(lambda: service.state.policies.policies.get("shop"), "policies watched")
        yield Env(fk, moto, ec2c, groups, service, client, clock)
    finally:
        await client.close()
        await service.stop()
        await fk.stop()


def message(answer: dict[str, Any]) -> str:
    assert answer["allowed"] is False, answer
    assert answer["status"]["code"] == 403 and answer["status"]["reason"] == "Forbidden"
    return str(answer["status"]["message"])


async def test_quotas_come_from_service_quotas(env: Env) -> None:
    quotas = env.service.state.vpc.service_quotas
    assert quotas is not None and (quotas.groups_per_eni, quotas.rules_per_group, quotas.source) == (
        5, 60, "Service Quotas")
    assert env.service.state.vpc.vpc_id == env.ec2.vpc


async def test_five_groups_pass_six_are_denied(env: Env) -> None:
    """The security-groups-per-ENI quota: 5 allowed, 6 denied with the figures."""
    plain = env.groups.plain
    five = await env.validate(SECURITY_GROUP_POLICY, sgp("five", plain[:5], {"matchLabels": {"app": "none"}}))
    assert five["allowed"] is True
    six = await env.validate(SECURITY_GROUP_POLICY, sgp("six", plain, {"matchLabels": {"app": "none"}}))
    assert message(six) == (
        "ipguard: SecurityGroupPolicy shop/six lists 6 security groups; an ENI allows at most 5 "
        "(quota 'Security groups per network interface', from Service Quotas)."
    )
    status, metrics = await env.client.get("/metrics")
    assert status == 200
    assert 'ipguard_object_decisions_total{kind="SecurityGroupPolicy",outcome="denied"} 1' in metrics
    assert 'ipguard_object_decisions_total{kind="SecurityGroupPolicy",outcome="allowed"} 1' in metrics
    assert 'ipguard_zone_branch_headroom{zone="us-east-1b"}' in metrics


async def test_union_of_three_and_three(env: Env) -> None:
    """With the existing 3-group policy on the a-pods: 3 more sharing one group make 5 (allowed); 3 sharing
    none make 6 (denied, naming the pods and the other policy)."""
    plain = env.groups.plain
    shared = await env.validate(SECURITY_GROUP_POLICY, sgp("shared", [plain[0], plain[3], plain[4]],
                                                           sa={"matchLabels": {"team": "shop"}}))
    assert shared["allowed"] is True, shared
    apart = await env.validate(SECURITY_GROUP_POLICY, sgp("apart", plain[3:6], sa={"matchLabels": {"team": "shop"}}))
    text = message(apart)
    assert text.startswith("ipguard: SecurityGroupPolicy shop/apart with shop/a-existing selects 18 pod(s) (a-")
    assert f"union of 6 security groups ({', '.join(plain[3:6] + plain[:3])})" in text
    assert "more than the 5 an ENI allows" in text


async def test_service_account_labels_are_watched(env: Env) -> None:
    """serviceAccountSelector follows the service account's labels as the watch delivers them."""
    policy = sgp("by-team", env.groups.plain[3:6], sa={"matchLabels": {"team": "shop"}})
    assert (await env.validate(SECURITY_GROUP_POLICY, policy))["allowed"] is False
    await env.fk.update("serviceaccounts", {"apiVersion": "v1", "kind": "ServiceAccount",
                                            "metadata": {"name": "default", "namespace": "shop",
                                                         "labels": {"team": "other"}}}, namespace="shop")
    await live.eventually(lambda: env.service.state.policies.account_labels("shop", "default") == {"team": "other"},
                          "service account relabelled")
    answer = await env.validate(SECURITY_GROUP_POLICY, policy)
    assert answer["allowed"] is True
    assert "ipguard: SecurityGroupPolicy shop/by-team selects no current pod or service account" in answer["warnings"]


async def test_unknown_group_denied_and_rules_near_quota_warned(env: Env) -> None:
    missing = "sg-0123456789abcdef0"
    answer = await env.validate(SECURITY_GROUP_POLICY, sgp("typo", [env.groups.plain[0], missing],
                                                           {"matchLabels": {"app": "b"}}))
    assert message(answer) == (
        f"ipguard: SecurityGroupPolicy shop/typo: security group(s) {missing} do not exist in VPC {env.ec2.vpc}; "
        "a branch ENI with them cannot be created."
    )
    near = await env.validate(SECURITY_GROUP_POLICY, sgp("near", [env.groups.near, env.groups.v6],
                                                         {"matchLabels": {"app": "b"}}))
    assert near["allowed"] is True
    assert near["warnings"] == [f"ipguard: {env.groups.near} has 55 inbound IPv4 rules (within 10% of quota 60)"]


async def test_eniconfig_subnet_zone_and_groups(env: Env) -> None:
    """An ENIConfig named for us-east-1b with us-east-1a's subnet, one with a subnet or group that does not
    exist: denied; a subnet at or below its zone's reserve: warned."""
    ec2c, group = env.ec2, env.groups.plain[0]
    wrong = await env.validate(ENI_CONFIG, eniconfig(B, ec2c.subnet_a, [group]), namespace=None)
    assert message(wrong) == (
        f"ipguard: ENIConfig {B}: subnet {ec2c.subnet_a} is in {A}, but it is named for zone {B} and "
        "ENI_CONFIG_LABEL_DEF is topology.kubernetes.io/zone: the CNI would ask for ENIs in another zone than the "
        "instance's and EC2 refuses them."
    )
    unknown = await env.validate(ENI_CONFIG, eniconfig("pool", "subnet-0123456789abcdef0", [group]), namespace=None)
    assert "subnet subnet-0123456789abcdef0 does not exist in VPC" in message(unknown)
    bad_group = await env.validate(ENI_CONFIG, eniconfig("pool", ec2c.subnet_b, ["sg-0123456789abcdef0"]),
                                   namespace=None)
    assert "security group(s) sg-0123456789abcdef0 do not exist" in message(bad_group)
    live.consume(env.moto.ec2(), ec2c.subnet_a, 3)  # 7 - 4 = 3 addresses left: the reserve
    index = env.service.index
    await live.eventually(lambda: index.subnets[ec2c.subnet_a].addresses <= 3, "subnet A at its reserve")
    low = await env.validate(ENI_CONFIG, eniconfig(A, ec2c.subnet_a, [group]), namespace=None)
    assert low["allowed"] is True
    free = index.subnets[ec2c.subnet_a].addresses
    assert f"ipguard: ENIConfig {A}: subnet {ec2c.subnet_a} has {free} free addresses (reserve 3)" in low["warnings"]


async def test_branch_pod_denied_for_its_policies_union(env: Env) -> None:
    """A pod selected by policies whose union is 6 groups cannot start: denied at validation, naming them."""
    await env.fk.create("securitygrouppolicies", sgp("team", env.groups.plain[3:6],
                                                     sa={"matchLabels": {"team": "shop"}}), namespace="shop")
    await live.eventually(lambda: "team" in env.service.state.policies.policies.get("shop", {}), "policy watched")
    pod = live.pod("shop", "a-new", None, phase="Pending")
    pod["spec"]["containers"][0]["resources"] = {"requests": {"vpc.amazonaws.com/pod-eni": "1"},
                                                 "limits": {"vpc.amazonaws.com/pod-eni": "1"}}
    answer = await env.client.post("/validate", live.review(pod, name="a-new"))
    text = message(answer)
    assert text.startswith("ipguard: pod shop/a-new is selected by SecurityGroupPolicies a-existing, team; its "
                           "branch ENI would get 6 security groups")


async def test_branch_pod_steered_away_from_a_dry_zone(env: Env) -> None:
    """At /mutate a pod the policies select is a branch-ENI pod (ENABLE_POD_ENI on): zone A's subnet has no
    address above the reserve, so it is steered to B; a-pods stay un-denied elsewhere."""
    live.consume(env.moto.ec2(), env.ec2.subnet_a, 5)
    index = env.service.index
    await live.eventually(lambda: index.zones[A].addresses <= 3, "subnet A dry after the EC2 refresh")
    pod = live.pod("shop", "a-more", None, phase="Pending")
    answer = await env.client.post("/mutate", live.review(pod))
    assert answer["auditAnnotations"]["avoid-zones"] == A


async def test_stale_ec2_data_never_denies(env: Env) -> None:
    """Past the staleness bound, a group missing from the last listing is not denied: a warning says so."""
    env.clock.offset += 120  # the ConfigMap's stalenessSeconds is 60
    answer = await env.validate(SECURITY_GROUP_POLICY, sgp("later", ["sg-0123456789abcdef0"],
                                                           {"matchLabels": {"app": "b"}}))
    assert answer["allowed"] is True
    assert ("ipguard: SecurityGroupPolicy shop/later: security groups not checked, EC2 data missing or stale"
            in answer["warnings"])
    wrong = await env.validate(ENI_CONFIG, eniconfig("pool", "subnet-0123456789abcdef0", []), namespace=None)
    assert wrong["allowed"] is True


async def test_pod_eni_off_warns_that_the_policy_will_not_apply(env: Env) -> None:
    """With ENABLE_POD_ENI off in the aws-node env, a policy is admitted with the warning that it will not
    apply (never denied for it)."""
    await env.fk.update("daemonsets", live.aws_node({"WARM_ENI_TARGET": "1"}), namespace="kube-system")
    await live.eventually(lambda: not env.service.index.cni.pod_eni, "ENABLE_POD_ENI off applied")
    answer = await env.validate(SECURITY_GROUP_POLICY, sgp("off", env.groups.plain[:1], {"matchLabels": {"app": "b"}}))
    assert answer["allowed"] is True
    assert "ipguard: ENABLE_POD_ENI is off: SecurityGroupPolicy shop/off will not apply" in answer["warnings"]


async def test_an_eniconfig_update_that_moves_nodes_subnet_warns(env: Env) -> None:
    """Under custom networking, an UPDATE that changes the subnet of an ENIConfig nodes select: the running
    node keeps its ENIs in the old subnet, only new ENIs use the new one (a warning, never a denial)."""
    ec2c = env.ec2
    await env.fk.create("eniconfigs", eniconfig(B, ec2c.subnet_b, [env.groups.plain[0]]))
    await env.fk.update("daemonsets", live.aws_node({
        "WARM_ENI_TARGET": "1", "ENABLE_POD_ENI": "true", "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true",
        "ENI_CONFIG_LABEL_DEF": "topology.kubernetes.io/zone"}), namespace="kube-system")
    await live.eventually(lambda: env.service.state.eni_configs.zones_of(B) == {B: 1}, "node B selects its ENIConfig")
    new_subnet = env.moto.ec2().create_subnet(VpcId=ec2c.vpc, CidrBlock="10.0.3.0/24",
                                              AvailabilityZone=B)["Subnet"]["SubnetId"]
    assert env.service.vpc_poller is not None
    env.service.vpc_poller.next_at = 0.0  # the next listing, now rather than a period later
    await live.eventually(lambda: new_subnet in env.service.state.vpc.subnets, "the new subnet listed")
    old = eniconfig(B, ec2c.subnet_b, [env.groups.plain[0]])
    answer = await env.validate(ENI_CONFIG, eniconfig(B, new_subnet, [env.groups.plain[0]]), namespace=None, old=old)
    assert answer["allowed"] is True
    assert (f"ipguard: ENIConfig {B}: 1 node(s) keep ENIs in {ec2c.subnet_b}; new ENIs use {new_subnet}"
            in answer["warnings"])


async def test_service_quotas_out_of_reach_hold_back_neither_the_vpc_listing_nor_the_eni_refresh(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Service Quotas out of reach (a private cluster with no endpoint for it, or a hang: here a server that
    accepts and never answers). The ENI refresh goes on meanwhile (the VPC listing is its own task), the groups
    and subnets of the listing are applied, the quotas read before stay in force (a raised quota must not fall
    back to the defaults on one failed call), and the failure is counted apart from the EC2 errors' alert."""
    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await asyncio.sleep(30)
        writer.close()

    accepted = asyncio.Event()
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(vpc, "QUOTAS_CLIENT_CONFIG", vpc.QUOTAS_CLIENT_CONFIG.merge(
        vpc.Config(read_timeout=3, retries={"mode": "standard", "max_attempts": 1})))
    poller = env.service.vpc_poller
    assert poller is not None and env.service.poller is not None
    read_before = env.service.state.vpc.service_quotas
    assert read_before is not None and read_before.source == "Service Quotas"
    poller.quotas_endpoint_url = f"http://127.0.0.1:{port}"
    new_subnet = env.moto.ec2().create_subnet(VpcId=env.ec2.vpc, CidrBlock="10.0.4.0/24",
                                              AvailabilityZone=A)["Subnet"]["SubnetId"]
    poller.next_at = 0.0
    try:
        await asyncio.wait_for(accepted.wait(), 10)
        eni_refresh = env.service.poller.stats[Call.ENIS].last_success
        await live.eventually(lambda: env.service.poller.stats[Call.ENIS].last_success != eni_refresh,
                              "an ENI refresh while Service Quotas hangs", 2.5)
        assert new_subnet not in env.service.state.vpc.subnets  # the listing still waits on the quotas
        await live.eventually(lambda: new_subnet in env.service.state.vpc.subnets, "the listing applied", 10)
        assert env.service.state.vpc.service_quotas == read_before and poller.quota_failures == 1
        _, metrics = await env.client.get("/metrics")
        assert scrape.value(metrics, "ipguard_ec2_errors_total", call="quotas", reason="failed") == 1
    finally:
        server.close()
