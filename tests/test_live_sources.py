"""The live sources end to end, in-process: ipguard's Service against the fake API server (real
kubernetes-asyncio client over HTTP) and EC2 in a moto server (real boto3 over HTTP), answering over real
HTTPS. Faults: watches closed, 410 Gone, the API server away and back, EC2 away and back, a bad ConfigMap.
After each, the index must equal a fresh recount and the server's pods; while data is stale, decisions fail
open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import live, scrape
from tests.fakekube import FakeKube
from tests.fakekube.server import PauseMode
from tests.fakekube.store import ApiError
from tests.live import aws_env  # noqa: F401  (autouse fixture)
from webhook.model.cni import IPV6_STAND_ASIDE
from webhook.model.config import Mode
from webhook.model.index import PodUse
from webhook.report import report_text
from webhook.service import ServeOptions, Service
from webhook.sources.ec2.client import Call
from webhook.sources.kube import PROBE_DELAY, WATCH_GRACE, api_client

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


@contextlib.asynccontextmanager
async def running_env(moto: live.Moto, tmp_path: Path, config: dict[str, str] | None = None, *,
                      bookmarks: float = 0.5, watch_timeout: int = 5, fast_retry: bool = True) -> AsyncIterator[Env]:
    """The live cluster with ipguard's Service ready on it; `config` replaces the ConfigMap before the start."""
    fk, url, ec2c = await live.start_cluster(moto, bookmark_interval=bookmarks)
    if config is not None:
        await fk.update("configmaps", live.config_map(config), namespace="ipguard")
    paths = live.certs(tmp_path)
    clock = Clock()
    service = Service(await api_client(host=url), serve_options(paths, moto, watch_timeout=watch_timeout),
                      clock=clock)
    assert service.poller is not None
    service.poller.backoff_base = 0.2  # retry soon after a fault: the test waits for recovery
    service.poller.backoff_max = 0.5
    for reflector in service.reflectors.values():
        if fast_retry:
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


@pytest.fixture
async def env(moto: live.Moto, tmp_path: Path) -> AsyncIterator[Env]:
    async with running_env(moto, tmp_path) as ready:
        yield ready


async def _ready(client: live.Client) -> bool:
    status, _ = await client.get("/readyz")
    return status == 200


async def test_loads_the_cluster_and_ec2_then_decides_from_them(env: Env) -> None:
    index = env.service.index
    # EC2: node A holds 9 + 9 secondary IPs, all used by its 18 pods; subnet A (/27) has 27 - 20 = 7 free
    assert index.nodes[NODE_A].ec2_held == 18
    assert index.nodes[NODE_A].pod_subnet == env.ec2.subnet_a
    assert index.subnets[env.ec2.subnet_a].free_ips == 7
    # no warm IP on node A, and its third ENI would need 10 addresses: the 7 are for new nodes only
    assert index.zone_headroom(A) == 0
    assert index.zone_figures(A).new_node_ips == 6  # a new node's primary takes one
    assert env.service.state.settings.zone_reserve == 3  # from the ConfigMap
    assert env.service.stale_reason() is None
    await env.consistent()

    answer = await env.validate("web-1", A)
    assert answer["allowed"] is True

    # another workload takes the subnet's last addresses: zone A falls to its reserve, within a refresh
    live.consume(env.moto.ec2(), env.ec2.subnet_a, 5)  # 6 addresses: 1 left
    await until(lambda: index.zone_figures(A).new_node_ips <= 3, "zone A out of addresses after the EC2 refresh")
    answer = await env.validate("web-2", A)
    assert answer["allowed"] is False
    assert answer["status"]["code"] == 403  # type: ignore[index]
    assert "us-east-1a" in str(answer["status"]["message"])  # type: ignore[index]
    # a pod free to go anywhere is steered away from zone A
    mutated = await env.mutate("web-3", None)
    assert mutated.get("patchType") == "JSONPatch"
    assert mutated["auditAnnotations"]["avoid-zones"] == A  # type: ignore[index]

    # pods on node A finish: their IPs are warm on the node again once ipamd's cooldown (30 s) is over, so
    # zone A opens up without the subnet
    for i in range(10):
        await env.fk.delete("pods", f"a-{i}", namespace="shop")
    await until(lambda: "shop/a-9" not in index.pods, "the pods' deletions seen")
    assert index.zone_headroom(A) <= 3  # still in cooldown
    env.clock.offset += 31  # within the staleness bound (60 s in the ConfigMap)
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


async def test_a_pod_the_index_cannot_take_is_skipped_and_the_watch_goes_on(env: Env) -> None:
    """Anyone who may create a pod may annotate it: a steering record nested deeper than the JSON parser goes
    (about 100 kB, within the annotation limit) must not stop the pod watch. The record is ignored (the pod is
    counted as an unsteered one), and pods created after it reach the index. Had the handler failed on it, the
    same event would replay on every retry and stop every later pod for good: the reflector passes over an
    object it cannot apply, logs it and counts it (`ipguard_watch_objects_skipped_total`)."""
    poisoned = live.pod("shop", "odd-0", None, phase="Pending")
    poisoned["metadata"]["annotations"] = {"ipguard.io/steered": "[" * 100_000}
    await env.fk.create("pods", poisoned, namespace="shop")
    await env.fk.create("pods", live.pod("shop", "after-0", NODE_B), namespace="shop")
    await until(lambda: "shop/after-0" in env.service.index.pods, "the pod after the odd one indexed")
    assert "shop/odd-0" in env.service.index.pods
    await env.consistent()

    reflector = env.service.reflectors["pods"]
    handler = reflector.handler

    class Refusing:
        """The pod handler, failing on one pod (any fault in applying one object)."""

        def upsert(self, obj: Any) -> None:
            if obj["metadata"]["name"] == "bad-0":
                raise RuntimeError("cannot apply")
            handler.upsert(obj)

        def __getattr__(self, name: str) -> Any:
            return getattr(handler, name)

    reflector.handler = Refusing()
    errors = reflector.errors
    await env.fk.create("pods", live.pod("shop", "bad-0", NODE_B), namespace="shop")
    await env.fk.create("pods", live.pod("shop", "after-1", NODE_B), namespace="shop")
    await until(lambda: "shop/after-1" in env.service.index.pods, "the pod after the failing one indexed")
    assert reflector.skipped == 1 and reflector.errors == errors and "shop/bad-0" not in env.service.index.pods
    _, metrics = await env.client.get("/metrics")
    assert scrape.value(metrics, "ipguard_watch_objects_skipped_total", resource="pods") == 1


async def test_stale_data_fails_open_and_recovers(env: Env) -> None:
    live.consume(env.moto.ec2(), env.ec2.subnet_a, 5)
    await until(lambda: env.service.index.zone_figures(A).new_node_ips <= 3, "zone A out of addresses")
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
    await until(lambda: index.zone_figures(A).new_node_ips <= 3, "zone A out of addresses after recovery",
                seconds=20)
    assert (await env.validate("web-2", A))["allowed"] is False


async def test_configmap_hot_reload_refuses_bad_settings(env: Env) -> None:
    feed = env.service.feed
    live.consume(env.moto.ec2(), env.ec2.subnet_a, 5)
    await until(lambda: env.service.index.zone_figures(A).new_node_ips <= 3, "zone A out of addresses")

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


def gauge(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


async def test_invalid_configmap_at_start_runs_dry_run_until_a_valid_one_arrives(
        moto: live.Moto, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With no last good settings, a refused ConfigMap must not mean `enforce` with the defaults: ipguard never
    denies or steers until a valid ConfigMap arrives, and says so in the log, /readyz and ipguard_config_valid."""
    caplog.set_level(logging.INFO)
    typo = {"mode": "warn", "zoneReserve": "3", "maxSteerdNodes": "5"}
    async with running_env(moto, tmp_path, config=typo) as env:
        live.consume(env.moto.ec2(), env.ec2.subnet_a, 5)
        await until(lambda: env.service.index.zone_headroom(A) <= 3, "zone A exhausted")
        assert env.service.state.settings.mode is Mode.DRY_RUN
        answer = await env.validate("web-1", A)  # enforce would deny this pod; warn would warn
        assert answer["allowed"] is True and not answer.get("warnings")
        assert "patch" not in await env.mutate("web-2", None)  # never steered either
        status, text = await env.client.get("/readyz")
        assert status == 200 and "maxSteerdNodes" in text and "dry-run" in text and "until a valid" in text
        assert gauge((await env.client.get("/metrics"))[1], "ipguard_config_valid") == 0
        refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert refused and "dry-run" in refused[0] and "last good settings" not in refused[0]

        # corrected: its settings apply, and the log says the refusal is over
        await env.fk.update("configmaps", live.config_map({"mode": "warn", "zoneReserve": "3"}), namespace="ipguard")
        await until(lambda: env.service.state.settings.mode is Mode.WARN, "warn mode applied")
        answer = await env.validate("web-3", A)
        assert answer["allowed"] is True and answer["warnings"]
        assert (await env.client.get("/readyz")) == (200, "ok\n")
        assert gauge((await env.client.get("/metrics"))[1], "ipguard_config_valid") == 1
        assert any("valid again" in r.getMessage() for r in caplog.records)


async def test_invalid_configmap_later_keeps_the_last_good_settings_and_is_logged_when_fixed_back(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """A refused change keeps the settings in force (now there were some) but still shows in /readyz and
    ipguard_config_valid; fixing it back to exactly the settings in force is logged too."""
    caplog.set_level(logging.INFO)
    good = {"mode": "enforce", "zoneReserve": "3", "stalenessSeconds": "60"}
    await env.fk.update("configmaps", live.config_map({**good, "zoneReserve": "-1"}), namespace="ipguard")
    await until(lambda: env.service.feed.config_errors == 1, "bad ConfigMap refused")
    assert env.service.state.settings.mode is Mode.ENFORCE and env.service.state.settings.zone_reserve == 3
    status, text = await env.client.get("/readyz")
    assert status == 200 and "zoneReserve" in text and "last good settings stay in force" in text
    assert gauge((await env.client.get("/metrics"))[1], "ipguard_config_valid") == 0

    await env.fk.update("configmaps", live.config_map(good), namespace="ipguard")
    await until(lambda: any("valid again" in r.getMessage() for r in caplog.records), "correction logged")
    assert (await env.client.get("/readyz")) == (200, "ok\n")
    assert gauge((await env.client.get("/metrics"))[1], "ipguard_config_valid") == 1


async def test_a_quiet_watch_is_current_and_a_failed_one_ages_from_its_failure(
        moto: live.Moto, tmp_path: Path) -> None:
    """Staleness is measured by the connection: a good watch with nothing to report (no events, no bookmarks)
    keeps the data current; once the connection fails, the data ages from then, and is current again soon after
    the API server is back."""
    async with running_env(moto, tmp_path, bookmarks=0, watch_timeout=30) as env:
        nodes = env.service.reflectors["nodes"]
        await until(lambda: nodes.connected, "node watch open")
        await asyncio.sleep(3)  # a quiet cluster: nothing changes, the server sends nothing
        assert nodes.age() == 0 and env.service.stale_reason() is None
        _, text = await env.client.get("/metrics")
        assert 'ipguard_index_age_seconds{source="nodes"} 0' in text

        await env.fk.pause("refuse")
        await until(lambda: not nodes.connected, "node watch down")
        await asyncio.sleep(1)
        assert (nodes.age() or 0) >= 0.9  # no connection: ageing
        await env.fk.resume()
        await until(lambda: nodes.age() == 0, "current again once the API server is back", seconds=5)


async def test_a_silent_connection_is_current_only_for_as_long_as_a_good_watch_can_be_silent(
        moto: live.Moto, tmp_path: Path) -> None:
    """A half-open watch (the network gone, the connection still open) is not current: after the watch's own
    timeout plus WATCH_GRACE without a byte the data ages, and the connection is dropped."""
    async with running_env(moto, tmp_path, bookmarks=0, watch_timeout=2) as env:
        nodes = env.service.reflectors["nodes"]
        assert nodes.max_silence == 2 + WATCH_GRACE
        await until(lambda: nodes.live, "node watch confirmed")
        await env.fk.pause("stall")
        stalled = time.monotonic()
        await until(lambda: (nodes.age() or 0) > 0, "ageing once silent for too long", seconds=15)
        assert time.monotonic() - stalled >= 2  # not before a good watch would have ended
        await until(lambda: not nodes.connected, "silent connection dropped", seconds=5)
        await env.fk.resume()
        await until(lambda: nodes.age() == 0, "current again", seconds=10)


async def test_stalenessseconds_below_what_the_watches_support_is_refused(env: Env) -> None:
    """A bound smaller than a quiet watch's longest silence (timeout 5 s + 5 s here) cannot be kept: refused."""
    await env.fk.update("configmaps", live.config_map({"mode": "enforce", "stalenessSeconds": "9"}),
                        namespace="ipguard")
    await until(lambda: env.service.feed.config_errors == 1, "too small a bound refused")
    assert env.service.feed.min_staleness == 10
    assert "stalenessSeconds='9' is below 10" in str(env.service.feed.config_last_error)
    assert env.service.state.settings.staleness_bound == 60  # the last good settings


async def test_after_410_at_the_start_of_a_watch_data_is_current_only_when_the_relist_finished(env: Env) -> None:
    """The stream's first event is the 410 that starts a relist: the 200 before it does not make the data
    current, so a half-rebuilt index is never taken as current."""
    pods = env.service.reflectors["pods"]
    pods.page_size = 1  # a relist of many pages: the test looks at the source between them
    await env.fk.pause("503")  # watches end; every request fails while the server is away
    await until(lambda: not pods.connected, "pod watch ended")
    await env.fk.create("pods", live.pod("shop", "b-late", NODE_B), namespace="shop")
    await env.fk.compact()  # the watch's resourceVersion is gone: its next watch starts with 410
    env.clock.offset += 120  # away for longer than the bound (60 s)
    relists, lists = pods.relists_410, pods.lists
    await env.fk.resume()
    seen: list[float | None] = []
    deadline = time.monotonic() + 15
    while pods.lists == lists and time.monotonic() < deadline:
        if pods.relists_410 > relists:
            seen.append(pods.age())
        await asyncio.sleep(0)
    assert pods.lists == lists + 1 and seen, "relisted after 410"
    assert all(age is not None and age > 60 for age in seen), seen[:5]
    assert env.service.stale_reason() is None or "pods" not in str(env.service.stale_reason())
    await env.consistent()


@pytest.mark.parametrize("away", ["refuse", "503"])
async def test_reconnect_probes_every_few_seconds_while_the_api_server_is_away(
        moto: live.Moto, tmp_path: Path, caplog: pytest.LogCaptureFixture, away: PauseMode) -> None:
    """A doubling backoff would wait up to 30 s (+20%) after the API server is back; a refused connection or a
    503 is probed at most PROBE_DELAY apart, so a server that is back is noticed within seconds."""
    async with running_env(moto, tmp_path, fast_retry=False) as env:
        pods = env.service.reflectors["pods"]
        pods.backoff.initial = 0.05  # the doubling reaches the probe cap sooner
        caplog.set_level(logging.INFO, logger="ipguard.kube")
        await env.fk.pause(away)
        await until(lambda: pods.errors >= 7, "seven failed attempts", seconds=20)
        delays = [float(r.args[2]) for r in caplog.records  # type: ignore[index]
                  if r.msg == "%s: watch failed (%s); retrying in %.1fs" and r.args and r.args[0] == "pods"]  # type: ignore[index]
        assert len(delays) >= 7 and max(delays) <= PROBE_DELAY * 1.2, delays
        back = time.monotonic()
        await env.fk.resume()
        await until(lambda: pods.live, "watching again", seconds=10)
        assert time.monotonic() - back <= PROBE_DELAY * 1.2 + 1.5  # one probe, then the watch's first second
        await env.consistent()


async def test_ready_without_waiting_a_tick_for_ec2(moto: live.Moto, tmp_path: Path) -> None:
    """The first EC2 refresh starts as soon as the nodes (and where their pods' subnets come from) are listed,
    not one ec2_tick later: with the default 5 s tick, ready well within it."""
    fk, url, _ = await live.start_cluster(moto, bookmark_interval=0.5)
    paths = live.certs(tmp_path)
    options = ServeOptions(host="127.0.0.1", port=0, tls_cert=paths.tls_cert, tls_key=paths.tls_key,
                           region=live.REGION, ec2_endpoint_url=moto.url)
    assert options.ec2_tick == 5.0
    service = Service(await api_client(host=url), options)
    started = time.monotonic()
    await service.start()
    try:
        await until(service.loaded, "ready", seconds=20)
        seconds = time.monotonic() - started
        print(f"time to ready: {seconds:.2f} s (ec2_tick {options.ec2_tick:.0f} s)")
        assert seconds < options.ec2_tick - 1
    finally:
        await service.stop()
        await fk.stop()


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


async def test_not_ready_while_a_resource_is_forbidden_and_readyz_names_it(moto: live.Moto, tmp_path: Path) -> None:
    """An upgrade whose RBAC was not applied: listing service accounts answers 403. ipguard stays not ready (the
    policies' service-account selectors need them), and /readyz says which resource and why, instead of only
    "not loaded"; once the rule is there, it becomes ready."""
    fk = FakeKube(bookmark_interval=0.5)
    url = await fk.start()
    forbidden = True

    async def rbac(_method: str, path: str) -> None:
        if forbidden and path.endswith("/serviceaccounts"):
            raise ApiError(403, "Forbidden", 'serviceaccounts is forbidden: User "system:serviceaccount:ipguard:'
                           'ipguard" cannot list resource "serviceaccounts" in API group "" at the cluster scope')

    fk.before_request = rbac
    paths = live.certs(tmp_path)
    service = Service(await api_client(host=url), serve_options(paths, moto))
    service.reflectors["serviceaccounts"].backoff.maximum = 0.5
    running = await service.start()
    client = live.Client(running.url, paths.ca_cert)
    try:
        await live.eventually(lambda: service.reflectors["serviceaccounts"].errors > 0, "the forbidden list tried")
        status, text = await client.get("/readyz")
        assert status == 503
        assert text.startswith("capacity index not loaded yet; waiting for serviceaccounts (HTTP 403"), text
        assert "pods" not in text.split("waiting for", 1)[1]  # listed: not named
        forbidden = False
        await live.eventually(lambda: _ready(client), "/readyz 200 once the rule is there")
    finally:
        await client.close()
        await service.stop()
        await fk.stop()


async def test_pods_waiting_for_an_ip_keep_their_claim_across_ec2_refreshes(env: Env) -> None:
    """Pods bound to node A beyond the 18 IPs its two full ENIs hold wait for an IP: EC2 keeps reporting 18
    held and 7 free at every refresh (ipamd cannot create a third ENI: it needs 10 addresses at once), and
    every refresh must leave them counted, so no extra pod is admitted onto node A per refresh. Over HTTPS."""
    index = env.service.index
    for i in range(3):
        await env.fk.create("pods", live.pod("shop", f"late-{i}", NODE_A), namespace="shop")
    await until(lambda: index.zone_figures(A).waiting == 3, "three pods waiting for an IP on node A")
    pinned = live.pod("shop", "pinned", NODE_A, phase="Pending")
    assert env.service.poller is not None
    subnets = env.service.poller.stats[Call.SUBNETS]
    for _ in range(3):
        seen = subnets.attempts
        await until(lambda seen=seen: subnets.attempts > seen, "another subnet refresh")
        answer = await env.client.post("/validate", live.review(pinned, name="pinned"))
        assert answer["allowed"] is False
        assert "a new ENI on m5.large needs 10 address(es) at once" in str(answer["status"])
        assert index.zone_figures(A).waiting == 3 and index.zone_headroom(A) == 0
    _, text = await env.client.get("/metrics")
    assert 'ipguard_zone_pods_waiting_for_ip{zone="us-east-1a"} 3' in text
    await env.consistent()


async def test_karpenter_subnets_from_ec2nodeclasses_reach_the_index(env: Env) -> None:
    """An EC2NodeClass whose controller resolved subnets (status.subnets, written through the status
    subresource as Karpenter does) makes ipguard fetch those subnets and mark them launchable; a pod for that
    zone, where no node runs yet, is admitted."""
    ec2 = env.moto.ec2()
    spare = ec2.create_subnet(VpcId=env.ec2.vpc, CidrBlock="10.0.9.0/24", AvailabilityZone="us-east-1c")
    spare_id = spare["Subnet"]["SubnetId"]
    await env.fk.create("ec2nodeclasses", {
        "apiVersion": "karpenter.k8s.aws/v1", "kind": "EC2NodeClass", "metadata": {"name": "default"},
        "spec": {"role": "KarpenterNodeRole", "amiSelectorTerms": [{"alias": "al2023@latest"}],
                 "subnetSelectorTerms": [{"tags": {"karpenter.sh/discovery": "prod"}}],
                 "securityGroupSelectorTerms": [{"tags": {"karpenter.sh/discovery": "prod"}}]}})
    await env.fk.patch_status("ec2nodeclasses", "default", {
        "subnets": [{"id": spare_id, "zone": "us-east-1c", "zoneID": "use1-az3"}]})
    index = env.service.index
    await until(lambda: spare_id in index.subnets and index.subnets[spare_id].launchable, "launch subnet indexed")
    assert index.subnets[spare_id].free_ips == 256 - 5
    assert index.subnets[spare_id].zone == "us-east-1c"
    await env.consistent()
    # A zone with no node yet but a Karpenter subnet with addresses: the autoscaler's to fill, never denied.
    answer = await env.validate("batch-1", "us-east-1c")
    assert answer["allowed"] is True


async def test_without_the_ec2nodeclass_crd_ipguard_stands_aside_quietly(moto: live.Moto, tmp_path: Path) -> None:
    """No Karpenter (the EC2NodeClass CRD is not served): the watch stands aside, the service is ready and
    decides as before."""
    fk, url, _ = await live.start_cluster(moto, bookmark_interval=0.5)
    await fk.disable_crd("ec2nodeclasses")
    paths = live.certs(tmp_path)
    service = Service(await api_client(host=url), serve_options(paths, moto, watch_timeout=5))
    running = await service.start()
    client = live.Client(running.url, paths.ca_cert)
    try:
        await live.eventually(lambda: _ready(client), "/readyz 200")
        reflector = service.reflectors["ec2nodeclasses"]
        assert reflector.missing and reflector.synced and reflector.errors == 0
        assert service.feed.launch_subnets() == set()
        answer = await client.post("/validate", live.review(live.zone_pod("web-1", B), name="web-1"))
        assert answer["allowed"] is True
    finally:
        await client.close()
        await service.stop()
        await fk.stop()


async def test_relabelled_node_keeps_its_enis_in_the_old_subnet_live(env: Env) -> None:
    """Custom networking, live: node B's pod ENI (5 IPs, 4 slots free) is in subnet pods-old, its ENIConfig's.
    Relabelled to ENIConfig `new` (subnet pods-new), it still holds those addresses in pods-old and grows its
    free slots from there (`tryAssignIPs` on the ENI itself); only a new ENI would come from pods-new
    (`tryAllocateENI` -> `MyENIConfig`). So pods-old stays debited and pods-new is not; with pods-old out of
    addresses and ENABLE_SUBNET_DISCOVERY off, a pod pinned to node B is denied (the shortage error stops the
    step before any new ENI), and admitted once discovery lets ipamd move on to a new ENI in pods-new."""
    ec2 = env.moto.ec2()
    index = env.service.index
    old = ec2.create_subnet(VpcId=env.ec2.vpc, CidrBlock="10.0.3.0/28", AvailabilityZone=B)["Subnet"]["SubnetId"]
    new = ec2.create_subnet(VpcId=env.ec2.vpc, CidrBlock="10.0.4.0/24", AvailabilityZone=B)["Subnet"]["SubnetId"]
    eni = ec2.create_network_interface(SubnetId=old, Description=f"aws-K8S-{env.ec2.instance_b}",
                                       SecondaryPrivateIpAddressCount=5)["NetworkInterface"]["NetworkInterfaceId"]
    ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=env.ec2.instance_b, DeviceIndex=1)
    for name, subnet in (("old", old), ("new", new)):
        await env.fk.create("eniconfigs", {"apiVersion": "crd.k8s.amazonaws.com/v1alpha1", "kind": "ENIConfig",
                                           "metadata": {"name": name}, "spec": {"subnet": subnet}})
    node_b = live.node(NODE_B, B, env.ec2.instance_b)

    async def select(config: str) -> None:
        node_b["metadata"]["labels"]["k8s.amazonaws.com/eniConfig"] = config
        await env.fk.update("nodes", node_b)

    await select("old")
    cni = {"WARM_ENI_TARGET": "1", "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true", "ENABLE_SUBNET_DISCOVERY": "false"}
    await env.fk.update("daemonsets", live.aws_node(cni), namespace="kube-system")
    await until(lambda: index.nodes[NODE_B].pod_subnet == old and index.nodes[NODE_B].ec2_held == 5
                and old in index.subnets, "node B on ENIConfig old, its ENI counted")
    assert index.subnets[old].supply == 11 - 6

    await select("new")
    await until(lambda: index.nodes[NODE_B].pod_subnet == new and new in index.subnets
                and [p.subnet_id for p in index.nodes[NODE_B].elsewhere] == [old], "node B relabelled")
    assert env.service.poller is not None
    subnets = env.service.poller.stats[Call.SUBNETS]
    seen = subnets.attempts
    await until(lambda: subnets.attempts > seen + 1, "two more subnet refreshes")
    assert index.subnets[old].supply == 5 and index.subnets[old].free_ips == 5  # no credit for the relabel
    assert index.subnets[new].supply == 256 - 5  # and no debit: EC2 took nothing from it
    await env.consistent()
    pinned = live.pod("shop", "pinned", NODE_B, phase="Pending")
    answer = await env.client.post("/validate", live.review(pinned, name="pinned"))
    assert answer["allowed"] is True

    live.consume(ec2, old, 4)  # another workload takes pods-old's last 5 addresses
    await until(lambda: index.subnets[old].free_ips == 0, "pods-old empty after a refresh")
    answer = await env.client.post("/validate", live.review(pinned, name="pinned"))
    assert answer["allowed"] is False and answer["status"]["code"] == 403  # type: ignore[index]

    await env.fk.update("daemonsets", live.aws_node({**cni, "ENABLE_SUBNET_DISCOVERY": "true"}),
                        namespace="kube-system")
    await until(lambda: index.cni.subnet_discovery, "subnet discovery on")
    answer = await env.client.post("/validate", live.review(pinned, name="pinned"))
    assert answer["allowed"] is True
    await env.consistent()


async def test_a_node_group_whose_nodes_cannot_give_an_ip_is_judged_on_them_live(env: Env) -> None:
    """Over HTTPS, node labels from the watch: a pod selecting node group `gpu` (node A only: its two ENIs are
    full, its third needs 10 addresses, subnet A has 7) is kept off node A to wait for a new gpu node while
    subnets have room for one, denied once they have none (although node B, in group `web`, has warm IPs), and
    admitted once node B is relabelled into the group."""
    index = env.service.index
    group = "eks.amazonaws.com/nodegroup"
    nodes = {NODE_A: live.node(NODE_A, A, env.ec2.instance_a), NODE_B: live.node(NODE_B, B, env.ec2.instance_b)}

    async def label(name: str, value: str) -> None:
        nodes[name]["metadata"]["labels"][group] = value
        await env.fk.update("nodes", nodes[name])

    await label(NODE_A, "gpu")
    await label(NODE_B, "web")
    await until(lambda: index.nodes_labelled(group, "gpu") == {NODE_A} and bool(index.nodes_labelled(group, "web")),
                "node groups indexed")
    gpu_pod = live.pod("shop", "train-1", None, phase="Pending", nodeSelector={group: "gpu"})
    dry_run = live.review(gpu_pod, name="train-1")
    dry_run["request"]["dryRun"] = True  # holds no reservation: zone B keeps its 4 warm IPs of headroom
    answer = await env.client.post("/validate", dry_run)
    assert answer["allowed"] is True
    assert answer["warnings"] == [f"ipguard: no node matching {group}=gpu can give it an IP; it waits Pending for a "
                                  "new node"]
    mutated = await env.client.post("/mutate", live.review(gpu_pod))
    assert mutated["auditAnnotations"]["avoid-nodes"] == NODE_A  # type: ignore[index]

    ec2 = env.moto.ec2()
    live.consume(ec2, env.ec2.subnet_a, 5)  # 1 address left: no new node in zone A
    b_free = index.subnets[env.ec2.subnet_b].free_ips
    live.consume(ec2, env.ec2.subnet_b, b_free - 2)  # nor in zone B; node B keeps its 4 warm IPs
    await until(lambda: index.subnets[env.ec2.subnet_b].free_ips == 1 and index.subnets[env.ec2.subnet_a].free_ips == 1,
                "both subnets down to one address")
    assert index.zone_headroom(B) == 4
    answer = await env.client.post("/validate", live.review(gpu_pod, name="train-1"))
    assert answer["allowed"] is False
    assert f"its node selection allows ({group}=gpu)" in str(answer["status"]["message"])  # type: ignore[index]

    await label(NODE_B, "gpu")
    await until(lambda: index.nodes_labelled(group, "gpu") == {NODE_A, NODE_B}, "node B in group gpu")
    answer = await env.client.post("/validate", live.review(gpu_pod, name="train-1"))
    assert answer["allowed"] is True and "warnings" not in answer
    await env.consistent()


# ---- clusters and nodes ipguard stands aside in ---------------------------------------------------------

WINDOWS_NODE = "ip-10-0-1-99.ec2.internal"


def _windows_pod(name: str, **spec: Any) -> dict[str, Any]:
    return live.pod("shop", name, None, phase="Pending", **spec)


async def test_windows_pods_are_never_judged_on_the_linux_warm_pool(env: Env) -> None:
    """Windows nodes have their own IPAM (vpc.amazonaws.com/PrivateIPv4Address from the VPC resource
    controller), not ipamd's warm pools: with zone A out of addresses for Linux pods, pods selected onto
    Windows nodes (node selector, or required node affinity on kubernetes.io/os) and a pod pinned to a Windows
    node by name are admitted unjudged, over HTTPS."""
    windows = live.node(WINDOWS_NODE, A, "i-0123456789abcdef0")
    windows["metadata"]["labels"]["kubernetes.io/os"] = "windows"
    await env.fk.create("nodes", windows)
    await until(lambda: env.service.index.nodes.get(WINDOWS_NODE) is not None, "the Windows node seen")
    live.consume(env.moto.ec2(), env.ec2.subnet_a, 5)
    await until(lambda: env.service.index.zone_figures(A).new_node_ips <= 3, "zone A out of addresses")
    assert (await env.validate("linux-1", A))["allowed"] is False

    zone = {"topology.kubernetes.io/zone": A}
    by_selector = _windows_pod("win-1", nodeSelector={**zone, "kubernetes.io/os": "windows"})
    by_affinity = _windows_pod("win-2", nodeSelector=zone, affinity={"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/os", "operator": "In", "values": ["windows"]}]}]}}})
    pinned = _windows_pod("win-3", nodeName=WINDOWS_NODE)
    for obj in (by_selector, by_affinity, pinned):
        name = obj["metadata"]["name"]
        for stage in ("/mutate", "/validate"):
            answer = await env.client.post(stage, live.review(obj, name=name))
            assert answer["allowed"] is True and "patch" not in answer, (name, stage, answer)
            notes = answer["auditAnnotations"]
            assert notes["outcome"] == "not-applicable" and "Windows" in notes["reason"], (name, notes)


async def test_ipv6_cluster_stands_aside_and_says_so_once(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """An IPv6 cluster (ENABLE_IPv6=true: ipamd gives each node a /80 prefix, no warm-pool growth to model):
    addresses are not the constraint. ipguard admits every pod, even in a zone out of IPv4 addresses, and
    says so once in the log, in `report` and in /readyz."""
    caplog.set_level(logging.INFO)
    live.consume(env.moto.ec2(), env.ec2.subnet_a, 5)
    await until(lambda: env.service.index.zone_figures(A).new_node_ips <= 3, "zone A out of addresses")
    assert (await env.validate("web-1", A))["allowed"] is False
    ipv6 = {"ENABLE_IPv6": "true", "ENABLE_IPv4": "false", "ENABLE_PREFIX_DELEGATION": "true"}
    await env.fk.update("daemonsets", live.aws_node(ipv6), namespace="kube-system")
    await until(lambda: env.service.index.cni.ipv6, "IPv6 picked up")

    for name in ("web-2", "web-3"):
        answer = await env.validate(name, A)
        assert answer["allowed"] is True and "warnings" not in answer
        assert answer["auditAnnotations"]["reason"] == IPV6_STAND_ASIDE  # type: ignore[index]
        mutated = await env.mutate(name, None)
        assert mutated["allowed"] is True and "patch" not in mutated
    status, text = await env.client.get("/readyz")
    assert status == 200 and IPV6_STAND_ASIDE in text
    report = report_text(env.service.index.snapshot(), env.service.state.settings)
    assert report.splitlines()[0] == IPV6_STAND_ASIDE
    # Another change to the aws-node env, still IPv6: nothing more said.
    await env.fk.update("daemonsets", live.aws_node({**ipv6, "WARM_IP_TARGET": "1"}), namespace="kube-system")
    await until(lambda: env.service.index.cni.warm_ip_target == 1, "the second env change applied")
    assert [r.getMessage() for r in caplog.records].count(IPV6_STAND_ASIDE) == 1


async def test_own_subnet_tagged_out_sends_the_nodes_growth_to_the_tagged_subnets(env: Env) -> None:
    """Enhanced subnet discovery with the node's own subnet tagged kubernetes.io/role/cni=0: ipamd's createENI
    skips it (isSubnetValidForENICreation) and creates the node's next ENI in the zone's tagged subnet with most
    free addresses (GetVpcSubnets' order). Zone A's subnet is empty and its pods are denied; once it is tagged 0
    and a tagged subnet with room exists in zone A, node A's pod IPs come from there: admitted, not denied."""
    index = env.service.index
    live.consume(env.moto.ec2(), env.ec2.subnet_a, 5)
    await until(lambda: index.zone_figures(A).new_node_ips <= 3, "zone A out of addresses")
    assert (await env.validate("web-1", A))["allowed"] is False
    ec2 = env.moto.ec2()
    ec2.create_tags(Resources=[env.ec2.subnet_a], Tags=[{"Key": "kubernetes.io/role/cni", "Value": "0"}])
    tagged = ec2.create_subnet(VpcId=env.ec2.vpc, CidrBlock="10.0.64.0/24", AvailabilityZone=A)["Subnet"]["SubnetId"]
    ec2.create_tags(Resources=[tagged], Tags=[{"Key": "kubernetes.io/role/cni", "Value": "1"}])
    await until(lambda: index.nodes[NODE_A].pod_subnet == tagged, "node A's pod IPs from the tagged subnet")
    assert env.service.poller is not None and env.ec2.subnet_a in env.service.poller.excluded_subnets
    assert index.zone_headroom(A) == 9  # a third ENI from the tagged subnet
    assert (await env.validate("web-2", A))["allowed"] is True
    answer = await env.client.post("/validate", live.review(live.pod("shop", "pinned", NODE_A), name="pinned"))
    assert answer["allowed"] is True
    await env.consistent()
