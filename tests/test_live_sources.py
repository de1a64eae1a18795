"""The live sources end to end, in-process: ipguard's Service against the fake API server (real
kubernetes-asyncio client over HTTP) and EC2 in a moto server (real boto3 over HTTP), answering over real
HTTPS. Faults: watches closed, 410 Gone, the API server away and back, EC2 away and back, a bad ConfigMap.
After each, the index must equal a fresh recount and the server's pods; while data is stale, decisions fail
open.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import live
from tests.fakekube import FakeKube
from tests.live import aws_env  # noqa: F401  (autouse fixture)
from webhook.model.index import PodUse
from webhook.service import ServeOptions, Service
from webhook.sources.kube import api_client

A, B = "us-east-1a", "us-east-1b"
NODE_A, NODE_B = "ip-10-0-1-10.ec2.internal", "ip-10-0-2-20.ec2.internal"


Clock = live.Clock


@dataclass
class Env:
    fk: FakeKube
    moto: live.Moto
    ec2: live.Ec2Cluster
    service: Service
    client: live.Client
    clock: Clock

    async def pods_on_server(self) -> set[str]:
        return {f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in await self.fk.objects("pods")
                if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")}

    async def consistent(self) -> None:
        """The index ends exactly as the server's state: same pods, aggregates equal to a fresh recount."""
        want = await self.pods_on_server()
        await until(lambda: set(self.service.index.pods) == want, f"index pods == server pods ({len(want)})")
        assert self.service.index.aggregates() == self.service.index.recount()

    async def validate(self, name: str, zone: str | None) -> dict[str, object]:
        return await self.client.post("/validate", live.review(live.zone_pod(name, zone), name=name))

    async def mutate(self, name: str, zone: str | None) -> dict[str, object]:
        return await self.client.post("/mutate", live.review(live.zone_pod(name, zone)))


async def until(check: Callable[[], bool], what: str, seconds: float = 15.0) -> None:
    await live.eventually(check, what, seconds)


def serve_options(paths: live.CertPaths, moto: live.Moto, **extra: Any) -> ServeOptions:
    """Listen anywhere on 127.0.0.1, EC2 in moto, refreshes fast enough for a test to wait on."""
    return ServeOptions(host="127.0.0.1", port=0, tls_cert=paths.tls_cert, tls_key=paths.tls_key,
                        region=live.REGION, ec2_endpoint_url=moto.url, ec2_period=0.5, ec2_tick=0.2, **extra)


@pytest.fixture
async def env(moto: live.Moto, tmp_path: Path) -> AsyncIterator[Env]:
    fk, url, ec2c = await live.start_cluster(moto, bookmark_interval=0.5)
    paths = live.certs(tmp_path)
    clock = Clock()
    service = Service(await api_client(host=url), serve_options(paths, moto, watch_timeout=5), clock=clock)
    assert service.poller is not None
    service.poller.backoff_base = 0.2  # retry soon after a fault: the test waits for recovery
    service.poller.backoff_max = 0.5
    for reflector in service.reflectors.values():
        reflector.backoff.maximum = 0.5
    running = await service.start()
    client = live.Client(running.url, paths.ca_cert)
    try:
        await live.eventually(lambda: _ready(client), "/readyz 200")
        yield Env(fk, moto, ec2c, service, client, clock)
    finally:
        await client.close()
        await service.stop()
        await fk.stop()


async def _ready(client: live.Client) -> bool:
    status, _ = await client.get("/readyz")
    return status == 200


async def test_loads_the_cluster_and_ec2_then_decides_from_them(env: Env) -> None:
    index = env.service.index
    # EC2: node A holds 9 + 9 secondary IPs, all used by its 18 pods; subnet A (/27) has 27 - 20 = 7 free
    assert index.nodes[NODE_A].ec2_held == 18
    assert index.nodes[NODE_A].pod_subnet == env.ec2.subnet_a
    assert index.subnets[env.ec2.subnet_a].free_ips == 7
    assert index.zone_headroom(A) == 7  # no warm IP on node A: all from the subnet
    assert env.service.state.settings.zone_reserve == 3  # from the ConfigMap
    assert env.service.stale_reason() is None
    await env.consistent()

    answer = await env.validate("web-1", A)
    assert answer["allowed"] is True

    # another workload takes the subnet's last addresses: zone A falls to its reserve, within a refresh
    live.consume(env.moto.ec2(), env.ec2.subnet_a, 5)  # 6 addresses: 1 left
    await until(lambda: index.zone_headroom(A) <= 3, "zone A exhausted after the EC2 refresh")
    answer = await env.validate("web-2", A)
    assert answer["allowed"] is False
    assert answer["status"]["code"] == 403  # type: ignore[index]
    assert "us-east-1a" in str(answer["status"]["message"])  # type: ignore[index]
    # a pod free to go anywhere is steered away from zone A
    mutated = await env.mutate("web-3", None)
    assert mutated.get("patchType") == "JSONPatch"
    assert mutated["auditAnnotations"]["avoid-zones"] == A  # type: ignore[index]

    # pods on node A finish: their IPs are warm on the node again, so zone A opens up without the subnet
    for i in range(10):
        await env.fk.delete("pods", f"a-{i}", namespace="shop")
    await until(lambda: index.zone_headroom(A) > 3, "zone A open again after pods finished")
    assert (await env.validate("web-4", A))["allowed"] is True
    await env.consistent()


async def test_watch_closed_and_410_gone_leave_no_pod_lost_or_double_counted(env: Env) -> None:
    index = env.service.index
    pods = env.service.reflectors["pods"]
    # the streams end abruptly while pods come and go
    await env.fk.close_watches(abort=True)
    await env.fk.create("pods", live.pod("shop", "b-new-1", NODE_B), namespace="shop")
    await env.fk.delete("pods", "b-0", namespace="shop")
    await env.consistent()

    # the API server goes away; meanwhile pods change and the history is compacted: the re-watch gets 410,
    # and the relist must both add what is new and remove what is gone
    await env.fk.pause("refuse")
    await env.fk.close_watches(abort=True)
    await until(lambda: not pods.connected, "pod watch noticed the outage")
    relists = pods.relists_410
    for i in range(5):
        await env.fk.delete("pods", f"a-{i}", namespace="shop")
    for i in range(3):
        await env.fk.create("pods", live.pod("shop", f"b-late-{i}", NODE_B), namespace="shop")
    await env.fk.patch("pods", "b-1", {"status": {"phase": "Succeeded"}}, namespace="shop")
    await env.fk.compact()
    assert "shop/a-0" in index.pods  # not seen yet
    await env.fk.resume()
    await until(lambda: pods.relists_410 > relists, "relist after 410 Gone")
    await env.consistent()
    assert "shop/a-0" not in index.pods and "shop/b-late-2" in index.pods and "shop/b-1" not in index.pods
    assert index.nodes[NODE_A].assigned == 13


async def test_stale_data_fails_open_and_recovers(env: Env) -> None:
    live.consume(env.moto.ec2(), env.ec2.subnet_a, 5)
    await until(lambda: env.service.index.zone_headroom(A) <= 3, "zone A exhausted")
    assert (await env.validate("web-1", A))["allowed"] is False

    # the API server goes away for longer than the staleness bound (60 s in the ConfigMap)
    await env.fk.pause("refuse")
    await env.fk.close_watches(abort=True)
    await until(lambda: not env.service.reflectors["pods"].connected, "watch down")
    env.clock.offset += 120
    assert env.service.stale_reason() is not None
    answer = await env.validate("web-2", A)
    assert answer["allowed"] is True  # never denied on stale figures
    assert any("stale" in w for w in answer.get("warnings", []))  # type: ignore[union-attr]
    assert answer["auditAnnotations"]["stale"] == "true"  # type: ignore[index]
    status, text = await env.client.get("/metrics")
    assert status == 200 and "ipguard_stale 1" in text

    await env.fk.resume()
    await until(lambda: env.service.stale_reason() is None, "fresh again")
    assert (await env.validate("web-3", A))["allowed"] is False
    await env.consistent()


async def test_ec2_away_keeps_last_good_data_then_recovers(env: Env) -> None:
    index = env.service.index
    poller = env.service.poller
    assert poller is not None
    free_before = index.subnets[env.ec2.subnet_a].free_ips
    errors_before = sum(s.errors for s in poller.stats.values())
    env.moto.stop()
    try:
        env.clock.offset += 1.0  # make the next ENI and subnet refreshes due
        await until(lambda: sum(s.errors for s in poller.stats.values()) > errors_before, "EC2 errors counted")
        assert index.subnets[env.ec2.subnet_a].free_ips == free_before  # last good data kept
        assert index.nodes[NODE_A].ec2_held == 18
        env.clock.offset += 120  # past the staleness bound: decisions fail open
        # the watches show progress again at their next bookmark; EC2 stays stale while it is away
        await until(lambda: "EC2" in str(env.service.stale_reason()), "stale for want of EC2 data")
        assert (await env.validate("web-1", A))["allowed"] is True
    finally:
        env.moto.restart()
    # EC2 is back, with a subnet emptied meanwhile: ipguard follows
    live.consume(env.moto.ec2(), env.ec2.subnet_a, 5)
    await until(lambda: env.service.stale_reason() is None, "EC2 fresh again", seconds=20)
    await until(lambda: index.zone_headroom(A) <= 3, "zone A exhausted after recovery", seconds=20)
    assert (await env.validate("web-2", A))["allowed"] is False


async def test_configmap_hot_reload_refuses_bad_settings(env: Env) -> None:
    feed = env.service.feed
    live.consume(env.moto.ec2(), env.ec2.subnet_a, 5)
    await until(lambda: env.service.index.zone_headroom(A) <= 3, "zone A exhausted")

    # a bad value: refused, counted, the last good settings stay
    await env.fk.update("configmaps", live.config_map({"mode": "bogus", "zoneReserve": "3"}), namespace="ipguard")
    await until(lambda: feed.config_errors == 1, "bad ConfigMap refused")
    assert env.service.state.settings.mode.value == "enforce"
    assert "mode" in str(feed.config_last_error)
    assert (await env.validate("web-1", A))["allowed"] is False
    _, text = await env.client.get("/metrics")
    assert "ipguard_config_errors_total 1" in text

    # a good change applies within seconds: warn mode admits with warnings
    await env.fk.update("configmaps", live.config_map({"mode": "warn", "zoneReserve": "3"}), namespace="ipguard")
    await until(lambda: env.service.state.settings.mode.value == "warn", "warn mode applied")
    answer = await env.validate("web-2", A)
    assert answer["allowed"] is True and answer["warnings"]


async def test_cni_settings_follow_the_aws_node_daemonset(env: Env) -> None:
    index = env.service.index
    assert index.cni.warm_eni_target == 1 and not index.cni.prefix_delegation
    await env.fk.update("daemonsets", live.aws_node({"ENABLE_PREFIX_DELEGATION": "true", "WARM_PREFIX_TARGET": "1"}),
                        namespace="kube-system")
    await until(lambda: index.cni.prefix_delegation, "prefix delegation picked up")
    assert index.nodes[NODE_B].capacity == 3 * 9 * 16
    await env.consistent()


async def test_missing_crds_stand_aside(moto: live.Moto, tmp_path: Path) -> None:
    fk, url, _ = await live.start_cluster(moto, disabled=["eniconfigs", "securitygrouppolicies", "cninodes"])
    paths = live.certs(tmp_path)
    service = Service(await api_client(host=url), serve_options(paths, moto))
    await service.start()
    try:
        await until(service.loaded, "ready without the CRDs")
        for kind in ("eniconfigs", "securitygrouppolicies", "cninodes"):
            assert service.reflectors[kind].missing
        assert len(service.index.pods) == 23
        assert service.index.pods["shop/a-0"] == (NODE_A, PodUse.IP, None)
    finally:
        await service.stop()
        await fk.stop()


async def test_ready_with_no_ec2_nodes_yet(moto: live.Moto, tmp_path: Path) -> None:
    """A cluster scaled to zero (or on Fargate only): nothing to ask EC2, so nothing to wait for."""
    fk = FakeKube(bookmark_interval=0.5)
    url = await fk.start()
    paths = live.certs(tmp_path)
    service = Service(await api_client(host=url), serve_options(paths, moto))
    running = await service.start()
    client = live.Client(running.url, paths.ca_cert)
    try:
        await live.eventually(lambda: _ready(client), "/readyz 200 with no nodes")
        assert service.stale_reason() is None
        answer = await client.post("/validate", live.review(live.zone_pod("web-1", None), name="web-1"))
        assert answer["allowed"] is True and answer["auditAnnotations"]["reason"] == "no nodes known yet"
    finally:
        await client.close()
        await service.stop()
        await fk.stop()
