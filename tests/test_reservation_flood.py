"""Only the API server may take reservations: made-up reviews cannot eat the headroom real pods need.

Two layers, each tested alone and over real HTTPS: (1) a reservation whose pod the watch has not shown within
``reservationConfirmSeconds`` is released, and a zone's unconfirmed reservations are bounded (past the bound
/validate judges without reserving); (2) only reviews from callers in the allowed sources take reservations
(the others are answered alike, hold nothing and are counted). Distinct callers are distinct loopback addresses: the
"control plane" posts from 127.0.0.1, the flooding pod from 127.0.0.2.

The cluster: zone us-east-1a's subnet has no free address left, its nodes hold 23 warm IPs (the fixture
cluster); with a reserve of 2, the zone can take 21 more pods. Ten real pods pinned to the zone must all be
admitted whatever the flood did; a control run without either layer shows the same flood denying them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import live, scrape
from tests.live import aws_env  # noqa: F401  (autouse fixture: moto's fake credentials)
from tests.test_live_sources import serve_options
from tests.test_server_e2e import SERVER_NAME, A, client_context, fixture_cluster
from webhook.admission.handler import AdmissionState
from webhook.admission.reservations import ReservationGuard
from webhook.callers import CallerFilter, Network, parse_networks
from webhook.cli import main
from webhook.model.config import Mode, Settings
from webhook.model.index import CapacityIndex, pod_key
from webhook.model.pods import PodUse
from webhook.server import RunningServer, WebhookServer, start_server
from webhook.service import Service
from webhook.sources.kube import api_client
from webhook.tls import CertPaths, CertReloader

CONTROL_PLANE, FLOODER = "127.0.0.1", "127.0.0.2"
NODE_A = "ip-10-0-1-11.ec2.internal"
REAL_PODS, FLOOD = 10, 400


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- layer 1 on its own: confirmation window and bound -------------------------------------------------------


def test_unconfirmed_reservation_is_released_after_the_window() -> None:
    """A reservation whose pod the watch never shows is released at the end of the confirmation window, long
    before the reservation TTL; one whose pod was shown stays until the watch binds it."""
    clock = Clock()
    index = CapacityIndex(reservation_ttl=30.0, clock=clock)
    guard = ReservationGuard(index, clock)
    assert guard.reserve("shop/made-up", A, None, window=5.0, limit=10)
    assert guard.reserve("shop/real", A, None, window=5.0, limit=10)
    index.upsert_pod("shop/real", None, PodUse.IP)  # the watch shows it, not scheduled yet
    clock.now += 4.9
    guard.sweep()
    assert {r.key for r in index.reservations()} == {"shop/made-up", "shop/real"}
    clock.now += 0.2
    guard.sweep()
    assert {r.key for r in index.reservations()} == {"shop/real"}
    assert guard.released == 1 and guard.counts() == {A: 0}


def test_a_pod_reserved_again_in_another_zone_keeps_its_new_reservation_for_its_own_window() -> None:
    """A create refused after admission (a quota, a later webhook) and retried under the same name, this time
    admitted into another zone: the first zone's window ends before the second's, and must not release the
    reservation the retry holds."""
    clock = Clock()
    index = CapacityIndex(clock=clock)
    guard = ReservationGuard(index, clock)
    assert guard.reserve("shop/web-1", A, None, window=10.0, limit=10)
    clock.now += 8
    assert guard.reserve("shop/web-1", "us-east-1b", None, window=10.0, limit=10)
    clock.now += 2.5  # past the first window, within the second
    guard.sweep()
    assert [(r.key, r.zone) for r in index.reservations()] == [("shop/web-1", "us-east-1b")]
    assert guard.counts() == {A: 0, "us-east-1b": 1}
    clock.now += 8  # past the second window, the pod never shown
    guard.sweep()
    assert index.reservations() == [] and guard.released == 1


def test_past_the_bound_a_zone_takes_no_more_unconfirmed_reservations() -> None:
    """At the bound, a review is judged without reserving (reserve says so); confirmed pods make room again."""
    clock = Clock()
    index = CapacityIndex(clock=clock)
    guard = ReservationGuard(index, clock)
    for i in range(3):
        assert guard.reserve(f"shop/p{i}", A, None, window=5.0, limit=3)
    assert not guard.reserve("shop/p3", A, None, window=5.0, limit=3)
    assert guard.reserve("shop/other-zone", "us-east-1b", None, window=5.0, limit=3)
    assert guard.skipped[A] == 1 and len(index.reservations()) == 4
    index.upsert_pod("shop/p0", None, PodUse.IP)  # shown by the watch: no longer unconfirmed
    assert guard.reserve("shop/p3", A, None, window=5.0, limit=3)
    assert guard.reserve("shop/p1", A, None, window=5.0, limit=3)  # the same pod again is not a new one


# ---- layers over HTTPS: a flood while real pods are admitted ------------------------------------------------


@dataclass
class Webhook:
    state: AdmissionState
    running: RunningServer
    control_plane: aiohttp.ClientSession
    flooder: aiohttp.ClientSession

    async def validate(self, session: aiohttp.ClientSession, name: str) -> tuple[int, dict[str, Any]]:
        body = live.review(live.zone_pod(name, A), name=name)
        async with session.post(f"{self.running.url}/validate?timeout=5s", data=json.dumps(body),
                                headers={"Content-Type": "application/json"}, server_hostname=SERVER_NAME) as r:
            return r.status, await r.json()

    async def metrics(self, session: aiohttp.ClientSession) -> str:
        async with session.get(f"{self.running.url}/metrics", server_hostname=SERVER_NAME) as r:
            assert r.status == 200
            return await r.text()


async def start(certs: CertPaths, callers: CallerFilter, settings: Settings) -> AsyncIterator[Webhook]:
    index = fixture_cluster(exhausted=())
    index.upsert_subnet("subnet-0a1b2c3d4e5f60718", zone=A, cidr="10.0.0.0/24", free_ips=0)
    state = AdmissionState(index, settings)
    reloader = CertReloader(certs.tls_cert, certs.tls_key)
    server = WebhookServer(state, reloader, callers=callers)
    running = await start_server(server, CONTROL_PLANE, 0, reloader.context)

    def session(local: str) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=client_context(certs.ca_cert), local_addr=(local, 0), limit=20)
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))

    webhook = Webhook(state, running, session(CONTROL_PLANE), session(FLOODER))
    try:
        yield webhook
    finally:
        await webhook.control_plane.close()
        await webhook.flooder.close()
        await running.stop()


LAYERS = {
    # the flood comes from an address outside the allowed sources
    "callers": (CallerFilter(parse_networks([f"{CONTROL_PLANE}/32"])), Settings(mode=Mode.ENFORCE, zone_reserve=2)),
    # anyone may call, but unconfirmed reservations are bounded per zone
    "confirmation": (CallerFilter(), Settings(mode=Mode.ENFORCE, zone_reserve=2, max_unconfirmed=5)),
    # neither layer (the bound out of reach): the control run
    "unprotected": (CallerFilter(), Settings(mode=Mode.ENFORCE, zone_reserve=2, max_unconfirmed=1_000_000)),
}


@pytest.mark.parametrize("layer", list(LAYERS))
async def test_a_flood_of_made_up_reviews_takes_no_headroom_real_pods_need(
    certs: CertPaths, layer: str
) -> None:
    """Made-up reviews for a zone with 21 pods of room left, 400 of them, before and while 10 real pods are
    admitted (each then shown by the watch, bound to a node in the zone): with either layer no real pod is
    denied and the flood is visible in the metrics; with neither, the flood denies real pods."""
    callers, settings = LAYERS[layer]
    async for webhook in start(certs, callers, settings):
        await flood_while_real_pods_are_admitted(webhook, layer, settings)


async def flood_while_real_pods_are_admitted(webhook: Webhook, layer: str, settings: Settings) -> None:
    async def flood(first: int) -> list[int]:
        answers = await asyncio.gather(*(webhook.validate(webhook.flooder, f"made-up-{first + i}")
                                         for i in range(FLOOD // 2)))
        return [status for status, _ in answers]

    async def real_pods() -> list[bool]:
        allowed = []
        for i in range(REAL_PODS):
            name = f"real-{i}"
            status, answer = await webhook.validate(webhook.control_plane, name)
            assert status == 200
            allowed.append(answer["response"]["allowed"])
            if answer["response"]["allowed"]:
                webhook.state.index.upsert_pod(pod_key("shop", name), NODE_A, PodUse.IP)  # the watch shows it
        return allowed

    first = await flood(0)
    allowed, second = await asyncio.gather(real_pods(), flood(FLOOD // 2))
    metrics = await webhook.metrics(webhook.flooder)  # metrics stay open to any caller

    if layer == "unprotected":
        assert not all(allowed), "the control run should show the flood denying real pods"
        return
    assert all(allowed), f"real pods denied: {allowed}"
    if layer == "callers":
        assert set(first + second) == {200}  # answered: the caller could be the control plane, moved
        assert f'ipguard_outside_callers_total{{endpoint="validate"}} {FLOOD}' in metrics
        assert not any(r.key.startswith("shop/made-up-") for r in webhook.state.index.reservations())
    else:
        assert set(first + second) == {200}
        assert f'ipguard_reservations_skipped_total{{zone="{A}"}}' in metrics
        assert webhook.state.guard.skipped[A] >= FLOOD - settings.max_unconfirmed - REAL_PODS
    async with webhook.flooder.get(f"{webhook.running.url}/healthz", server_hostname=SERVER_NAME) as r:
        assert r.status == 200


def test_serve_refuses_an_admission_source_that_is_not_a_network(capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped --admission-source stops `ipguard serve` at once, naming the value."""
    assert main(["serve", "--admission-source", "10.0.0.0/16,10.0.300.1"]) == 2
    assert "10.0.300.1" in capsys.readouterr().err


def test_caller_filter_reads_networks_from_a_source_as_it_learns_them() -> None:
    """Static CIDRs plus an injected source (on EKS: the control plane's ENI addresses). While the source has
    not learnt its networks the configured list alone applies, or, with none, every caller is answered."""

    class Learnt:
        def __init__(self) -> None:
            self.known: list[Network] | None = None

        def networks(self) -> list[Network] | None:
            return self.known

    learnt = Learnt()
    assert CallerFilter((), (learnt,)).allowed("10.9.9.9")  # nothing learnt, nothing configured: everyone
    callers = CallerFilter(parse_networks(["192.168.0.0/24"]), (learnt,))
    assert not callers.allowed("10.1.2.3") and callers.allowed("192.168.0.7")  # the configured list meanwhile
    learnt.known = list(parse_networks(["10.1.2.3", "fd00::/64"]))
    assert callers.allowed("10.1.2.3") and callers.allowed("192.168.0.7") and callers.allowed("fd00::1")
    assert callers.allowed("::ffff:10.1.2.3")  # an IPv4 caller on a dual-stack listener
    assert not callers.allowed("10.1.2.4") and not callers.allowed(None) and not callers.allowed("garbage")
    assert CallerFilter().allowed("203.0.113.9")  # nothing configured: everyone


async def test_serve_reserves_only_for_the_control_plane_interfaces_ec2_describes(
        moto: live.Moto, tmp_path: Path) -> None:
    """On EKS, with no list configured: once EC2 has shown the cluster's control-plane network interfaces
    (described `Amazon EKS <cluster name>`), a review from any other address is answered as any other (the
    control plane gets new interfaces on a version update, and a refusal would fail the pod under
    failurePolicy Fail), but holds no reservation and is counted; health stays open."""
    fk, url, ec2c = await live.start_cluster(moto)
    ec2 = moto.ec2()
    ec2.create_tags(Resources=[ec2c.instance_a, ec2c.instance_b], Tags=[{"Key": "eks:cluster-name", "Value": "prod"}])
    control_plane = ec2.create_network_interface(SubnetId=ec2c.subnet_a, Description="Amazon EKS prod")
    address = control_plane["NetworkInterface"]["PrivateIpAddress"]
    service = Service(await api_client(host=url), serve_options(live.certs(tmp_path), moto))
    client: live.Client | None = None
    try:
        assert service.server.callers.allowed("127.0.0.1")  # nothing learnt yet: answered
        running = await service.start()
        await live.eventually(lambda: service.server.callers.networks() is not None, "control plane ENIs learnt")
        assert not service.server.callers.allowed("127.0.0.1") and service.server.callers.allowed(address)
        client = live.Client(running.url, tmp_path / "ca.crt")
        assert (await client.get("/healthz"))[0] == 200
        body = json.dumps(live.review(live.zone_pod("web-9", A), name="web-9"))
        async with client.session.post(f"{running.url}/validate", data=body, server_hostname=live.SERVER_NAME,
                                       headers={"Content-Type": "application/json"}) as response:
            assert response.status == 200
            answer = await response.json()
        assert answer["response"]["allowed"] is True
        assert service.state.index.reservations() == [] and service.state.guard.counts() == {}
        assert scrape.value((await client.get("/metrics"))[1], "ipguard_outside_callers_total",
                            endpoint="validate") == 1
    finally:
        if client is not None:
            await client.close()
        await service.stop()
        await fk.stop()
