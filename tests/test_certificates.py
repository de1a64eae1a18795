"""Certificates ipguard keeps itself, against the Kubernetes-style API server with the real client.

Each replica is a `CertificateKeeper` plus a real HTTPS listener serving its files through a `CertReloader`;
"the apiserver" is a client that trusts only the `caBundle` it reads back from the webhook configurations in
the API server, and checks the service DNS name against the SANs. The rule pinned throughout renewal: at no
moment does the published caBundle fail to verify what any replica serves.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509

from tests.fakekube import FakeKube
from tests.paths import REPO
from tests.test_tls import https_server, served_cert
from webhook.service import ServeOptions, Service
from webhook.sources import certificates
from webhook.sources.certificates import CHANGED_AT, CertificateKeeper
from webhook.sources.kube import api_client
from webhook.tls import CertReloader

NAMESPACE = "ipguard"
SVC_NAME = "ipguard.ipguard.svc"
DAY = dt.timedelta(days=1)
SETTLE = 60.0


class Clock:
    """Wall clock for the keepers, moved forward by the test. It starts 0.7 day and a few minutes in the past,
    so that every certificate made along a renewal is valid in real time too (the TLS client checks that)."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC) - DAY * 0.7 - dt.timedelta(minutes=3)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, delta: dt.timedelta) -> None:
        self.now += delta


@dataclass
class Replica:
    keeper: CertificateKeeper
    reloader: CertReloader
    port: int


@dataclass
class Env:
    fk: FakeKube
    url: str
    clock: Clock
    tmp: Path
    stack: AsyncExitStack

    async def replica(self, name: str) -> Replica:
        folder = self.tmp / name
        folder.mkdir()
        reloader = CertReloader(folder / "tls.crt", folder / "tls.key", allow_missing=True)
        api = await api_client(host=self.url)
        self.stack.push_async_callback(api.close)
        keeper = CertificateKeeper(api, NAMESPACE, folder / "tls.crt", folder / "tls.key", days=1, settle=SETTLE,
                                   now=self.clock, on_served=reloader.maybe_reload)
        port = await self.stack.enter_async_context(https_server(reloader.context))
        return Replica(keeper, reloader, port)

    async def ca_bundles(self) -> list[str]:
        bundles = []
        for kind in ("mutatingwebhookconfigurations", "validatingwebhookconfigurations"):
            config = await self.fk.get(kind, "ipguard")
            bundles += [hook["clientConfig"].get("caBundle", "") for hook in config["webhooks"]]
        return bundles

    async def secret(self) -> dict[str, Any]:
        return await self.fk.get("secrets", "ipguard-tls", namespace=NAMESPACE)

    async def apiserver_trusts(self, *replicas: Replica) -> list[x509.Certificate]:
        """Every replica's certificate verifies against every published caBundle; returns what they serve."""
        served = []
        bundles = await self.ca_bundles()
        assert bundles and len(set(bundles)) == 1, "the webhooks disagree on the caBundle"
        client = ssl.create_default_context(cadata=base64.b64decode(bundles[0]).decode("ascii"))
        client.hostname_checks_common_name = False
        for replica in replicas:
            served.append(await served_cert(replica.port, client, SVC_NAME))
        return served


def webhook_configurations() -> list[dict[str, Any]]:
    docs = yaml.safe_load_all((REPO / "manifests" / "base" / "webhooks.yaml").read_text())
    return [d for d in docs if d]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    fk = FakeKube()
    url = await fk.start()
    for config in webhook_configurations():
        await fk.create(config["kind"], config)
    async with AsyncExitStack() as stack:
        yield Env(fk, url, Clock(), tmp_path, stack)
    await fk.stop()


def serial(cert_pem: bytes) -> int:
    return x509.load_pem_x509_certificate(cert_pem).serial_number


async def test_first_start_creates_the_secret_publishes_the_bundle_and_serves(env: Env) -> None:
    """No Secret yet: one is created with a CA and serving certificate, both webhook configurations get its
    CA as caBundle, and the listener serves the certificate the apiserver then trusts."""
    replica = await env.replica("a")
    assert not replica.reloader.ready
    state = await replica.keeper.reconcile()
    secret = await env.secret()
    assert {"tls.crt", "tls.key", "ca.crt", "ca.key", "ca-bundle.crt"} <= set(secret["data"])
    assert await env.ca_bundles() == [state.bundle_b64] * 2
    served = await env.apiserver_trusts(replica)
    assert served[0].serial_number == serial(state.current.tls_cert)
    assert replica.keeper.writes == 1 and replica.reloader.ready


async def test_only_its_own_webhook_configurations_are_patched(env: Env) -> None:
    """caBundle is written to the two configurations named ipguard, never to another one."""
    other = webhook_configurations()[1]
    other["metadata"]["name"] = "someone-else"
    other["webhooks"][0]["clientConfig"]["caBundle"] = base64.b64encode(b"their CA").decode()
    await env.fk.create("validatingwebhookconfigurations", other)
    await (await env.replica("a")).keeper.reconcile()
    stored = await env.fk.get("validatingwebhookconfigurations", "someone-else")
    assert stored["webhooks"][0]["clientConfig"]["caBundle"] == other["webhooks"][0]["clientConfig"]["caBundle"]


async def test_restart_with_an_existing_secret_serves_it_without_writing(env: Env) -> None:
    """A restarted replica (new files, same Secret) serves the Secret's certificate and changes nothing."""
    first = await (await env.replica("a")).keeper.reconcile()
    rv = (await env.secret())["metadata"]["resourceVersion"]
    again = await env.replica("b")
    state = await again.keeper.reconcile()
    assert state.current == first.current and again.keeper.writes == 0
    assert (await env.secret())["metadata"]["resourceVersion"] == rv
    assert (await env.apiserver_trusts(again))[0].serial_number == serial(first.current.tls_cert)


@pytest.mark.parametrize("shipped_empty", [False, True], ids=["no-secret", "empty-secret-from-manifests"])
async def test_two_replicas_starting_at_once_agree_on_one_certificate(env: Env, shipped_empty: bool) -> None:
    """Exactly one write lands (create, or update at the shipped Secret's resourceVersion); the loser reloads
    the winner's Secret and both serve the same certificate."""
    if shipped_empty:
        await env.fk.create("secrets", {"metadata": {"name": "ipguard-tls", "namespace": NAMESPACE},
                                        "type": "Opaque"})
    a, b = await env.replica("a"), await env.replica("b")
    both_read = asyncio.Barrier(2)
    reads = 0

    async def hold_the_first_two_reads(method: str, path: str) -> None:
        # Both replicas read the Secret before either writes: the race the resourceVersion settles.
        nonlocal reads
        if method == "GET" and path.endswith("/secrets/ipguard-tls") and reads < 2:
            reads += 1
            await both_read.wait()

    env.fk.before_request = hold_the_first_two_reads
    state_a, state_b = await asyncio.gather(a.keeper.reconcile(), b.keeper.reconcile())
    assert state_a.current == state_b.current
    assert a.keeper.writes + b.keeper.writes == 1
    assert a.keeper.conflicts + b.keeper.conflicts == 1
    served = await env.apiserver_trusts(a, b)
    assert served[0].serial_number == served[1].serial_number == serial(state_a.current.tls_cert)


async def test_renewal_at_two_thirds_never_leaves_the_apiserver_trusting_neither(env: Env) -> None:
    """Renewal: the next CA is published beside the old one first, the new certificate is served only once the
    bundle has settled, the old CA leaves last; replicas reload without a restart. After every step, every
    replica's certificate verifies against the published caBundle."""
    a, b = await env.replica("a"), await env.replica("b")
    first = await a.keeper.reconcile()
    await b.keeper.reconcile()
    old_serial = serial(first.current.tls_cert)

    env.clock.advance(DAY * 0.6)  # before two thirds: nothing to do
    await a.keeper.reconcile()
    assert a.keeper.writes == 1

    env.clock.advance(DAY * 0.1)  # past two thirds: step 1, publish the next CA beside the current one
    step1 = await a.keeper.reconcile()
    assert step1.next is not None and step1.bundle == first.current.ca_cert + step1.next.ca_cert
    assert {c.serial_number for c in await env.apiserver_trusts(a, b)} == {old_serial}
    await b.keeper.reconcile()  # not settled yet: nothing more
    assert b.keeper.writes == 0

    env.clock.advance(dt.timedelta(seconds=SETTLE))  # step 2: b promotes; a still serves the old one
    step2 = await b.keeper.reconcile()
    assert step2.current == step1.next and step2.bundle == step1.next.ca_cert + first.current.ca_cert
    served = await env.apiserver_trusts(a, b)
    assert [c.serial_number for c in served] == [old_serial, serial(step1.next.tls_cert)]
    await a.keeper.reconcile()
    assert a.reloader.reloads == 2  # first load, then the renewal in place: same listener, port and process
    assert len({c.serial_number for c in await env.apiserver_trusts(a, b)}) == 1

    env.clock.advance(dt.timedelta(seconds=SETTLE))  # step 3: the old CA leaves the bundle
    step3 = await a.keeper.reconcile()
    assert step3.bundle == step1.next.ca_cert and step3.next is None
    assert {c.serial_number for c in await env.apiserver_trusts(a, b)} == {serial(step1.next.tls_cert)}
    assert CHANGED_AT in (await env.secret())["metadata"]["annotations"]


async def test_promotion_waits_until_both_configurations_carry_the_next_ca(env: Env) -> None:
    """While the caBundle cannot be published (the configuration keeps being changed under us), the next
    certificate is not served: serving it would leave the apiserver trusting neither."""
    a = await env.replica("a")
    first = await a.keeper.reconcile()
    env.clock.advance(DAY * 0.7)
    step1 = await a.keeper.reconcile()
    assert step1.next is not None
    await env.fk.delete("validatingwebhookconfigurations", "ipguard")
    stale = webhook_configurations()[1]
    stale["webhooks"][0]["clientConfig"]["caBundle"] = base64.b64encode(first.current.ca_cert).decode()
    await env.fk.create("validatingwebhookconfigurations", stale)
    env.clock.advance(dt.timedelta(seconds=SETTLE))
    # The keeper republishes first; only a round that finds the bundle in place promotes.
    state = await a.keeper.reconcile()
    assert await env.ca_bundles() == [state.bundle_b64] * 2
    assert {c.serial_number for c in await env.apiserver_trusts(a)} <= {serial(first.current.tls_cert),
                                                                         serial(step1.next.tls_cert)}


async def test_a_ca_bundle_changed_by_someone_else_is_restored(env: Env) -> None:
    """Someone overwrites caBundle (a re-apply of the manifests empties it): the next round puts it back."""
    a = await env.replica("a")
    state = await a.keeper.reconcile()
    config = await env.fk.get("mutatingwebhookconfigurations", "ipguard")
    config["webhooks"][0]["clientConfig"]["caBundle"] = base64.b64encode(b"not our CA").decode()
    await env.fk.update("mutatingwebhookconfigurations", config)
    await env.fk.patch("validatingwebhookconfigurations", "ipguard",
                       [{"op": "remove", "path": "/webhooks/0/clientConfig/caBundle"}])
    await a.keeper.reconcile()
    assert await env.ca_bundles() == [state.bundle_b64] * 2
    assert a.keeper.writes == 1
    await env.apiserver_trusts(a)


async def test_a_secret_emptied_by_hand_is_refilled(env: Env) -> None:
    """A Secret without a usable pair (emptied, or shipped empty) is filled with a fresh CA and certificate."""
    a = await env.replica("a")
    await a.keeper.reconcile()
    secret = await env.secret()
    secret["data"] = {"tls.crt": base64.b64encode(b"garbage").decode()}
    await env.fk.update("secrets", secret, namespace=NAMESPACE)
    state = await a.keeper.reconcile()
    assert (await env.apiserver_trusts(a))[0].serial_number == serial(state.current.tls_cert)


async def test_serve_with_manage_certificates_answers_with_the_certificate_it_published(env: Env) -> None:
    """`ipguard serve --manage-certificates`: before it listens, the Secret and caBundle are in place, and the
    apiserver-like client reaches /healthz trusting only the published caBundle; the figures are in /metrics."""
    options = ServeOptions(host="127.0.0.1", port=0, tls_cert=env.tmp / "tls.crt", tls_key=env.tmp / "tls.key",
                           ec2=False, manage_certificates=True)
    service = Service(await api_client(host=env.url), options)
    running = await service.start()
    try:
        bundle = base64.b64decode((await env.ca_bundles())[0]).decode("ascii")
        client = ssl.create_default_context(cadata=bundle)
        client.hostname_checks_common_name = False
        async with aiohttp.ClientSession() as session:
            for path, expected in (("/healthz", "ok"), ("/metrics", "ipguard_certificate_secret_writes_total 1")):
                async with session.get(f"{running.url}{path}", ssl=client, server_hostname=SVC_NAME) as resp:
                    assert resp.status == 200 and expected in await resp.text()
    finally:
        await service.stop()


async def test_an_api_server_that_never_answers_fails_the_round_instead_of_hanging_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's default is no timeout: a call the API server accepts and never answers would stop renewals
    for good (and, at start, the listener), with no error counted. Every call is bounded: the round fails, and
    the keeper's loop counts it and tries again."""
    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    monkeypatch.setattr(certificates, "API_TIMEOUT", 0.5)
    api = await api_client(host=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    reloader = CertReloader(tmp_path / "tls.crt", tmp_path / "tls.key", allow_missing=True)
    keeper = CertificateKeeper(api, NAMESPACE, tmp_path / "tls.crt", tmp_path / "tls.key", days=1, settle=SETTLE,
                               on_served=reloader.maybe_reload)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(keeper.reconcile(), 10)
        assert asyncio.get_running_loop().time() - started < 5  # the call's own timeout, not the wait's
        assert keeper.state is None
        loop = asyncio.create_task(keeper.run(0.01))
        await asyncio.sleep(2)
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        assert keeper.errors >= 2
    finally:
        await api.close()
        server.close()
