"""`ipguard serve`: the webhook server fed by live sources (Kubernetes watches and EC2).

Wires the pieces together and owns the rules that span them: readiness (Nodes, Pods and the first EC2
refresh loaded, certificate in place), staleness (data older than the bound fails open), and settings hot
reload (a valid ConfigMap applies at once; an invalid one is refused and the last good settings stay).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes_asyncio import client as k8s

from webhook.admission.handler import AdmissionState
from webhook.callers import AddressSource, CallerFilter, parse_networks
from webhook.eventloop import describe
from webhook.metrics import Gauge, LabelValues
from webhook.model.cni import IPV6_STAND_ASIDE
from webhook.model.config import Settings
from webhook.model.eniconfig import missing_config_findings
from webhook.model.index import CapacityIndex
from webhook.model.vpc import VpcFacts
from webhook.server import RunningServer, WebhookServer, start_server
from webhook.sources.certificates import CertificateKeeper
from webhook.sources.cluster import ClusterFeed
from webhook.sources.ec2.client import Call
from webhook.sources.ec2.poller import Ec2Poller
from webhook.sources.kube import WATCH_GRACE, WATCH_TIMEOUT, Reflector, watched_resources
from webhook.sources.vpc import VpcPoller
from webhook.tls import CertReloader

log = logging.getLogger("ipguard.service")

# Data older than the staleness bound from these fails decisions open.
ESSENTIAL = ("nodes", "pods")
# What the EC2 refresh needs listed first: the nodes' instances, and the ENIConfigs and CNI settings that say
# which subnets their pods use.
EC2_INPUTS = ("nodes", "eniconfigs", "daemonsets")
# The certificate round before listening waits this long at most (its calls have their own timeouts too).
START_RECONCILE_SECONDS = 20.0


@dataclass(slots=True)
class ServeOptions:
    host: str = "0.0.0.0"
    port: int = 8443
    tls_cert: Path = Path("/tls/tls.crt")
    tls_key: Path = Path("/tls/tls.key")
    config_namespace: str = "ipguard"
    config_name: str = "ipguard"
    ec2: bool = True
    region: str | None = None
    vpc_id: str | None = None
    cluster_name: str | None = None  # the EKS cluster (default: from the nodes' instances' tags)
    ec2_endpoint_url: str | None = None
    ec2_period: float = 30.0
    # The nodes' ENIs fetched and parsed in a worker process (`Ec2.fetch`): `serve`'s default, so a large
    # cluster's refresh does not hold the GIL against the request path.
    ec2_fetch_in_process: bool = False
    ec2_tick: float = 5.0  # how often the poller is asked; it only calls EC2 for what is due
    vpc_period: float = 300.0  # seconds between listings of the VPC's security groups and subnets
    watch_timeout: int = WATCH_TIMEOUT
    shutdown_delay: float = 5.0  # not ready, still serving, before the listener closes
    tls: bool = True  # False: the index only (`report --live`), no serving certificate looked for
    # Certificates kept in a Secret by ipguard itself (the files above are then written, not only read).
    manage_certificates: bool = False
    certificate_secret: str = "ipguard-tls"
    service_name: str = "ipguard"
    webhook_configuration: str = "ipguard"
    certificate_days: int = 365
    certificate_period: float = 60.0
    certificate_settle: float = 600.0
    # Callers allowed to POST reviews (CIDRs or addresses); none: every caller (see webhook/callers.py).
    admission_sources: tuple[str, ...] = ()
    # With EC2: also the EKS control plane's network interfaces (`Amazon EKS <cluster>`), once they are known.
    control_plane_callers: bool = True


def min_staleness(options: ServeOptions) -> float:
    """The least `stalenessSeconds` the sources can keep: a good watch may be silent for its timeout (plus a
    grace) before a dead connection can be told from a quiet one, and EC2 data is up to a period plus a tick (plus
    the calls' own time) old between refreshes. A smaller bound would fail decisions open on healthy data."""
    watch = options.watch_timeout + WATCH_GRACE
    return max(watch, options.ec2_period + options.ec2_tick + WATCH_GRACE) if options.ec2 else watch


@dataclass(slots=True)
class Service:
    api: k8s.ApiClient
    options: ServeOptions
    clock: Callable[[], float] = time.monotonic
    index: CapacityIndex = field(init=False)
    state: AdmissionState = field(init=False)
    feed: ClusterFeed = field(init=False)
    reflectors: dict[str, Reflector] = field(init=False)
    poller: Ec2Poller | None = field(init=False)
    vpc_poller: VpcPoller | None = field(init=False)
    ec2_ready: bool = False
    ec2_idle_at: float | None = None  # last refresh with nothing to ask EC2 (no nodes, no pod subnets)
    ec2_loop_errors: int = 0
    settings_changes: int = 0
    server: WebhookServer = field(init=False)
    certificates: CertificateKeeper | None = field(init=False)
    running: RunningServer | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        settings = Settings()
        self.index = CapacityIndex(node_reserve=settings.node_reserve, reservation_ttl=settings.reservation_ttl,
                                   clock=self.clock)
        self.state = AdmissionState(self.index, settings, self.stale_reason, vpc=VpcFacts(clock=self.clock))
        self.feed = ClusterFeed(self.index, self.apply_settings, self.options.config_name,
                                self.options.config_namespace, min_staleness=min_staleness(self.options),
                                policies=self.state.policies, eni_store=self.state.eni_configs)
        handlers = self.feed.handlers()
        self.reflectors = {
            w.kind: Reflector(w.kind, w.call, handlers[w.kind], optional=w.optional,
                              watch_timeout=self.options.watch_timeout, clock=self.clock)
            for w in watched_resources(self.api, self.options.config_namespace, self.options.config_name)
        }
        o = self.options
        self.poller = (
            Ec2Poller(region=o.region, vpc_id=o.vpc_id, cluster_name=o.cluster_name, endpoint_url=o.ec2_endpoint_url,
                      eni_period=o.ec2_period, subnet_period=o.ec2_period, clock=self.clock,
                      fetch_in_process=o.ec2_fetch_in_process)
            if o.ec2 else None
        )
        # The Service Quotas endpoint follows the EC2 one when that is overridden (a test's moto server).
        self.vpc_poller = (
            VpcPoller(self.poller, self.state.vpc, period=o.vpc_period, quotas_endpoint_url=o.ec2_endpoint_url,
                      clock=self.clock)
            if self.poller is not None else None
        )
        reloader = CertReloader(o.tls_cert, o.tls_key, allow_missing=True) if o.tls else None
        self.server = WebhookServer(self.state, reloader, self.loaded, self.source_ages, self.notes,
                                    callers=self._callers(), waiting_for=self.waiting_for)
        self.certificates = (
            CertificateKeeper(self.api, o.config_namespace, o.tls_cert, o.tls_key, secret_name=o.certificate_secret,
                              service=o.service_name, webhook_configuration=o.webhook_configuration,
                              days=o.certificate_days, settle=o.certificate_settle,
                              on_served=reloader.maybe_reload)
            if o.manage_certificates and reloader is not None else None
        )
        self._add_metrics()

    def _callers(self) -> CallerFilter:
        o, poller = self.options, self.poller
        if poller is None or not o.control_plane_callers:
            return CallerFilter(parse_networks(o.admission_sources))

        def control_plane() -> frozenset[str] | None:
            view = poller.control_plane
            return view.addresses if view is not None else None

        return CallerFilter(parse_networks(o.admission_sources), (AddressSource(control_plane),))

    # ---- settings ---------------------------------------------------------------------------------------

    def apply_settings(self, settings: Settings) -> None:
        old = self.state.settings
        if settings == old:
            return
        self.state.settings = settings
        if settings.node_reserve != old.node_reserve:
            self.index.set_node_reserve(settings.node_reserve)
        self.index.set_reservation_ttl(settings.reservation_ttl)
        self.settings_changes += 1
        log.info("settings applied", extra={"fields": {"mode": settings.mode.value,
                                                        "zoneReserve": settings.zone_reserve}})

    # ---- readiness and staleness ------------------------------------------------------------------------

    def notes(self) -> list[str]:
        problem = self.feed.config_problem()
        return [*([problem] if problem else []), *([IPV6_STAND_ASIDE] if self.index.cni.ipv6 else [])]

    def loaded(self) -> bool:
        """Every watched resource listed once (an absent CRD counts as listed; a forbidden one does not: the CNI
        settings and ipguard's own settings matter as much as the pods), and EC2 answered for ENIs and subnets."""
        kube = all(r.synced for r in self.reflectors.values())
        return kube and (self.poller is None or self.ec2_ready)

    def waiting_for(self) -> str:
        """What the index still waits for before it is loaded, each with its last error (a forbidden resource after
        an upgrade whose RBAC was not applied shows here, by name)."""
        parts = [f"{kind} ({r.last_error})" if r.last_error else kind
                 for kind, r in self.reflectors.items() if not r.synced]
        if self.poller is not None and not self.ec2_ready:
            parts.append("EC2 network interfaces and subnets")
        return ", ".join(parts)

    def source_ages(self) -> dict[str, float]:
        ages: dict[str, float] = {}
        for kind, reflector in self.reflectors.items():
            age = reflector.age()
            if age is not None:
                ages[kind] = age
        ec2 = self.ec2_age()
        if ec2 is not None:
            ages["ec2"] = ec2
        return ages

    def ec2_age(self) -> float | None:
        """Seconds since both ENIs and subnets were last fetched (None until both have been)."""
        if self.poller is None:
            return None
        if self.ec2_idle_at is not None:
            return self.clock() - self.ec2_idle_at  # nothing to know: as current as the last look
        times = [self.poller.stats[k].last_success for k in (Call.ENIS, Call.SUBNETS)]
        if any(t is None for t in times):
            return None
        return self.clock() - min(t for t in times if t is not None)

    def stale_reason(self) -> str | None:
        """Why the figures cannot be trusted now, or None. Decisions then fail open."""
        bound = self.state.settings.staleness_bound
        for kind in ESSENTIAL:
            reflector = self.reflectors[kind]
            age = reflector.age()
            if not reflector.synced or age is None:
                return f"{kind} not loaded yet"
            if age > bound:
                return f"{kind} data is {age:.0f}s old (bound {bound:.0f}s)"
        if self.poller is not None:
            age = self.ec2_age()
            if age is None:
                return "no EC2 data yet"
            if age > bound:
                return f"EC2 data is {age:.0f}s old (bound {bound:.0f}s)"
        return None

    # ---- EC2 --------------------------------------------------------------------------------------------

    async def refresh_ec2(self) -> None:
        assert self.poller is not None
        node_instances = self.feed.node_instances()
        if not node_instances and not self.feed.subnets_in_use():
            # No EC2 node and no pod subnet (a cluster scaled to zero, or on Fargate only): nothing to wait for,
            # once the node list says so (before it, "no nodes" only means "not listed yet").
            if self.reflectors["nodes"].synced:
                self.ec2_idle_at = self.clock()
                self.ec2_ready = True
            return
        self.ec2_idle_at = None
        result = await self.poller.refresh(self.index, node_instances, set(self.feed.eni_configs.values()),
                                           self.feed.launch_subnets())
        if result.instances:
            zones = {iid: self.feed.nodes[node].zone for node, iid in node_instances.items() if node in self.feed.nodes}
            by_instance = self.poller.pod_subnets(result.instances, zones, discovery=self.index.cni.subnet_discovery)
            subnets = {node: by_instance[iid] for node, iid in node_instances.items() if iid in by_instance}
            before = set(self.feed.ec2_node_subnets.values())
            self.feed.set_ec2_node_subnets(subnets)
            if set(subnets.values()) - before:
                # Nodes named subnets not fetched yet: fetch them now rather than a period later.
                result = await self.poller.refresh(self.index, node_instances, set(self.feed.eni_configs.values()),
                                                   self.feed.launch_subnets())
        stats = self.poller.stats
        if result.ok and stats[Call.ENIS].last_success is not None and (
            stats[Call.SUBNETS].last_success is not None or not self.feed.subnets_in_use()
        ):
            self.ec2_ready = True

    async def _ec2_loop(self) -> None:
        # The first refresh as soon as EC2 can be asked the right things (the nodes, and where custom networking
        # puts their pods), not a tick later: it is what readiness waits for.
        await asyncio.gather(*(self.reflectors[kind].listed.wait() for kind in EC2_INPUTS))
        await self._every_tick(self.refresh_ec2, "EC2 refresh")

    async def _vpc_loop(self) -> None:
        # Apart from the ENI and subnet refresh: a slow VPC listing (Service Quotas with no endpoint, a VPC with
        # thousands of groups) must not hold back the figures every decision rests on.
        assert self.vpc_poller is not None
        await self._every_tick(self.vpc_poller.refresh, "EC2 VPC listing")

    async def _every_tick(self, step: Callable[[], Awaitable[object]], what: str) -> None:
        """`step` every EC2 tick, forever: a failure is counted and logged, never raised."""
        while True:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.ec2_loop_errors += 1
                log.exception("%s failed", what)
            await asyncio.sleep(self.options.ec2_tick)

    def _start_ec2(self) -> None:
        if self.poller is not None:
            self._tasks.append(asyncio.create_task(self._ec2_loop(), name="ec2"))
        if self.vpc_poller is not None:
            self._tasks.append(asyncio.create_task(self._vpc_loop(), name="ec2-vpc"))

    # ---- lifecycle --------------------------------------------------------------------------------------

    async def _freeze_when_loaded(self) -> None:
        # The loaded index is long-lived: moving it out of the collector's view keeps full collections (tens
        # of milliseconds with 150,000 pods) off the admission path.
        while not self.loaded():  # noqa: ASYNC110  (readiness is derived from several sources: polled)
            await asyncio.sleep(0.5)
        gc.collect()
        gc.freeze()
        log.info("index loaded", extra={"fields": {"pods": len(self.index.pods), "nodes": len(self.feed.nodes)}})
        if self.index.cni.custom_networking:
            # Said once, when ready: nodes whose ENIConfig does not exist give their pods no IP.
            for finding in missing_config_findings(self.state.eni_configs, self.state.eni_configs.configs):
                log.warning(finding.message)

    async def start(self) -> RunningServer:
        for reflector in self.reflectors.values():
            reflector.start()
        self._start_ec2()
        self._tasks.append(asyncio.create_task(self._freeze_when_loaded(), name="gc-freeze"))
        if self.certificates is not None:
            # Before listening, so the first handshake already has a certificate when the API server answers.
            try:
                # Bounded: the listener must open even while the API server does not answer (the loop retries).
                await asyncio.wait_for(self.certificates.reconcile(), START_RECONCILE_SECONDS)
            except Exception:
                self.certificates.errors += 1
                log.exception("certificates not in place yet; retrying")
            self._tasks.append(asyncio.create_task(self.certificates.run(self.options.certificate_period),
                                                   name="certificates"))
        assert self.server.reloader is not None
        self.running = await start_server(self.server, self.options.host, self.options.port,
                                          self.server.reloader.context)
        log.info("serving", extra={"fields": {"url": self.running.url}})
        return self.running

    async def stop(self) -> None:
        if self.running is not None:
            await self.running.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for reflector in self.reflectors.values():
            await reflector.stop()
        if self.poller is not None:
            # The EC2 worker process and threads: a fetch in flight must not hold the exit past the grace period.
            self.poller.close()
        await self.api.close()

    # ---- metrics ----------------------------------------------------------------------------------------

    def _add_metrics(self) -> None:
        registry = self.server.metrics.registry

        def reflector_values(attr: str) -> Callable[[], Iterable[tuple[LabelValues, float]]]:
            return lambda: [((k,), float(getattr(r, attr))) for k, r in self.reflectors.items()]

        registry.add(Gauge("ipguard_watch_events_total", "Watch events applied, by resource.", ("resource",),
                           reflector_values("events")))
        registry.add(Gauge("ipguard_watch_errors_total", "Watch failures, by resource.", ("resource",),
                           reflector_values("errors")))
        registry.add(Gauge("ipguard_watch_relists_total", "Relists after 410 Gone, by resource.", ("resource",),
                           reflector_values("relists_410")))
        registry.add(Gauge("ipguard_watch_objects_skipped_total",
                           "Listed or watched objects that could not be applied (logged, passed over), by resource.",
                           ("resource",), reflector_values("skipped")))
        registry.add(Gauge("ipguard_config_errors_total", "ConfigMap versions refused as invalid.", (),
                           lambda: [((), float(self.feed.config_errors))]))
        registry.add(Gauge("ipguard_config_valid",
                           "1 while ipguard's ConfigMap is valid (or absent); 0 while it is refused.", (),
                           lambda: [((), 0.0 if self.feed.config_problem() else 1.0)]))
        registry.add(Gauge("ipguard_stale", "1 while decisions fail open on stale data.", (),
                           lambda: [((), 1.0 if self.stale_reason() else 0.0)]))

        def ec2_errors() -> Iterable[tuple[LabelValues, float]]:
            if self.poller is None:
                return []
            counts = [((str(kind), reason), float(n)) for kind, s in self.poller.stats.items()
                      for reason, n in s.errors_by_reason.items()]
            vpc = self.vpc_poller
            more = [(("vpc", "failed"), float(vpc.failures)), (("quotas", "failed"), float(vpc.quota_failures))
                    ] if vpc is not None else []
            return [*counts, *more, (("refresh", "unexpected"), float(self.ec2_loop_errors))]

        registry.add(Gauge("ipguard_ec2_errors_total", "EC2 call failures, by call and reason.", ("call", "reason"),
                           ec2_errors))
        registry.add(Gauge("ipguard_settings_applied_total", "Settings versions applied since start.", (),
                           lambda: [((), float(self.settings_changes))]))

        def certificate_figures(attr: str) -> Callable[[], Iterable[tuple[LabelValues, float]]]:
            keeper = self.certificates
            return lambda: [((), float(getattr(keeper, attr)))] if keeper is not None else []

        registry.add(Gauge("ipguard_certificate_secret_writes_total",
                           "Writes of the certificate Secret (creation and renewal steps).", (),
                           certificate_figures("writes")))
        registry.add(Gauge("ipguard_certificate_secret_conflicts_total",
                           "Certificate Secret writes lost to another replica (its certificate was taken).", (),
                           certificate_figures("conflicts")))
        registry.add(Gauge("ipguard_certificate_ca_bundle_patches_total",
                           "caBundle patches of ipguard's webhook configurations.", (),
                           certificate_figures("bundle_patches")))
        registry.add(Gauge("ipguard_certificate_errors_total",
                           "Failures keeping the certificate Secret or the caBundle.", (),
                           certificate_figures("errors")))

    async def wait_loaded(self, seconds: float) -> bool:
        """Start only the sources and wait until the index is loaded (for `ipguard report` on a live cluster)."""
        for reflector in self.reflectors.values():
            reflector.start()
        self._start_ec2()
        deadline = self.clock() + seconds
        while not self.loaded():
            if self.clock() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True


async def serve(api: k8s.ApiClient, options: ServeOptions) -> None:
    """Run until SIGTERM or SIGINT; then stop listening and close the watches (Kubernetes sends SIGTERM)."""
    # Fewer, cheaper collections: the index and watch pages allocate many objects that live long.
    gc.set_threshold(50_000, 20, 20)
    service = Service(api, options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("event loop", extra={"fields": {"loop": describe(loop)}})
    await service.start()
    try:
        await stop.wait()
        # Endpoints drop a pod that is not ready: until they do, keep answering, or reviews sent in the gap
        # would be admitted unchecked (failurePolicy Ignore).
        service.server.draining = True
        log.info("stopping", extra={"fields": {"delay": options.shutdown_delay}})
        await asyncio.sleep(options.shutdown_delay)
    finally:
        await service.stop()
        log.info("stopped")
