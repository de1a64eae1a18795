"""The HTTPS server: POST /mutate and /validate (AdmissionReview), GET /healthz, /readyz and /metrics.

Thin HTTP glue around `admission.handler`: read and check the body, answer, count, log. Every answer comes
from the in-memory index; nothing here calls AWS or Kubernetes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from webhook.admission.handler import AdmissionState, Stage, handle
from webhook.admission.wire import MAX_BODY_BYTES, AdmissionResponse, BadReview, parse_review, review_envelope
from webhook.callers import CallerFilter
from webhook.metrics import CONTENT_TYPE, Counter, Gauge, Histogram, LabelValues, Registry
from webhook.model.config import Mode
from webhook.tls import CertReloader

log = logging.getLogger("ipguard.server")

JSON = "application/json"


@dataclass(slots=True)
class ServerMetrics:
    registry: Registry = field(default_factory=Registry)
    requests: Counter = field(init=False)
    latency: Histogram = field(init=False)
    bad_requests: Counter = field(init=False)
    errors: Counter = field(init=False)
    objects: Counter = field(init=False)
    outside_callers: Counter = field(init=False)
    reservations_skipped: Counter = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = r.add(Counter("ipguard_admission_requests_total", "Admission reviews answered.",
                                      ("endpoint", "decision", "outcome")))
        self.latency = r.add(Histogram("ipguard_admission_duration_seconds", "Time to answer a review.",
                                       ("endpoint", "decision")))
        self.bad_requests = r.add(Counter("ipguard_bad_requests_total", "Requests refused as malformed.",
                                          ("endpoint", "status")))
        self.errors = r.add(Counter("ipguard_handler_errors_total", "Unexpected errors while answering.",
                                    ("endpoint",)))
        self.objects = r.add(Counter("ipguard_object_decisions_total",
                                     "Validations of objects other than pods (SecurityGroupPolicy, ENIConfig), "
                                     "by kind and outcome.", ("kind", "outcome")))
        self.outside_callers = r.add(Counter(
            "ipguard_outside_callers_total",
            "Reviews from callers outside the allowed sources: answered, but holding no reservation.",
            ("endpoint",)))
        self.reservations_skipped = r.add(Counter(
            "ipguard_reservations_skipped_total",
            "Pods admitted without a reservation: the zone was at its bound of unconfirmed reservations.",
            ("zone",)))


def _index_gauges(state: AdmissionState, registry: Registry) -> None:
    def zones() -> Iterable[tuple[LabelValues, float]]:
        index = state.index
        index.expire()
        return [((z,), float(index.zones[z].headroom)) for z in index.zone_names()]

    def subnets() -> Iterable[tuple[LabelValues, float]]:
        return [((s.subnet_id, s.zone), float(s.supply)) for s in state.index.subnet_figures()]

    def reservations() -> Iterable[tuple[LabelValues, float]]:
        return [((), float(len(state.index.reservations())))]

    def waiting() -> Iterable[tuple[LabelValues, float]]:
        index = state.index
        return [((z,), float(index.zones[z].waiting)) for z in index.zone_names()]

    def reserves() -> Iterable[tuple[LabelValues, float]]:
        return [((z,), float(state.settings.reserve_for_zone(z))) for z in state.index.zone_names()]

    registry.add(Gauge("ipguard_zone_headroom_pod_ips", "Pod IPs a zone can still take.", ("zone",), zones))
    registry.add(Gauge("ipguard_zone_reserve_pod_ips", "Pod IPs a zone keeps back (zoneReserve/zoneReserves).",
                       ("zone",), reserves))

    def branch_zones() -> Iterable[tuple[LabelValues, float]]:
        index = state.index
        index.expire()
        return [((z,), float(max(index.zones[z].branch_headroom, 0))) for z in index.zone_names()]

    registry.add(Gauge("ipguard_zone_branch_headroom", "Branch-ENI pods (security groups for pods) a zone can "
                       "still take: branch room, within its pod subnets' addresses.", ("zone",), branch_zones))
    registry.add(Gauge("ipguard_subnet_free_pod_ips", "Pod IPs a subnet can still supply.", ("subnet", "zone"),
                       subnets))
    registry.add(Gauge("ipguard_zone_pods_waiting_for_ip",
                       "Pods on a zone's nodes beyond the IPs their nodes hold: waiting for ipamd to get them an "
                       "address (FailedCreatePodSandBox while it cannot).", ("zone",), waiting))
    pods_help = ("Pods in the capacity index: every pod not Succeeded or Failed, bound to a node or not (steered "
                 "or not), those that take no pod IP (host network, Fargate, Windows) included.")
    registry.add(Gauge("ipguard_index_pods", pods_help, (), lambda: [((), float(len(state.index.pods)))]))
    registry.add(Gauge("ipguard_index_nodes", "Nodes in the capacity index.", (),
                       lambda: [((), float(sum(1 for n in state.index.nodes.values() if n.known)))]))
    registry.add(Gauge("ipguard_reservations", "Admitted pods holding an IP until the watch shows them.", (),
                       reservations))
    registry.add(Gauge("ipguard_reservations_unconfirmed", "Reservations whose pod the watch has not shown yet.",
                       ("zone",), lambda: [((z,), float(n)) for z, n in state.guard.counts().items()]))
    registry.add(Gauge("ipguard_reservations_unconfirmed_released_total",
                       "Reservations released because the watch never showed their pod.", (),
                       lambda: [((), float(state.guard.released))]))


@dataclass(slots=True)
class WebhookServer:
    state: AdmissionState
    reloader: CertReloader | None = None
    index_loaded: Callable[[], bool] = lambda: True
    source_ages: Callable[[], dict[str, float]] = dict  # source -> seconds since it was last current
    notes: Callable[[], list[str]] = list  # what an admin should know while ready (shown by /readyz)
    waiting_for: Callable[[], str] = str  # while not loaded: the sources not in yet, with their last errors
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    log_allows: bool = False
    draining: bool = False  # shutting down: not ready, still answering
    callers: CallerFilter = field(default_factory=CallerFilter)
    sweep_period: float = 1.0  # how often unconfirmed reservations are looked at without a review arriving

    def __post_init__(self) -> None:
        _index_gauges(self.state, self.metrics.registry)
        self.metrics.registry.add(
            Gauge("ipguard_index_age_seconds", "Seconds since each data source was last current.", ("source",),
                  lambda: [((k,), v) for k, v in self.source_ages().items()])
        )
        self.metrics.registry.add(
            Gauge("ipguard_certificate_expiry_timestamp_seconds", "Serving certificate notAfter.", (),
                  self._cert_expiry)
        )

    def _cert_expiry(self) -> Iterable[tuple[LabelValues, float]]:
        if self.reloader is not None and self.reloader.not_after is not None:
            return [((), self.reloader.not_after.timestamp())]
        return []

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting down"
        if not self.index_loaded():
            waiting = self.waiting_for()
            return False, "capacity index not loaded yet" + (f"; waiting for {waiting}" if waiting else "")
        if self.reloader is not None and not self.reloader.ready:
            return False, "serving certificate not loaded"
        return True, "; ".join(["ok", *self.notes()])

    def app(self) -> web.Application:
        # The body limit is enforced by hand (with a clear reason); aiohttp's own check is a backstop.
        app = web.Application(client_max_size=MAX_BODY_BYTES + 1)
        app.router.add_post("/mutate", self._mutate)
        app.router.add_post("/validate", self._validate)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        if self.reloader is not None:
            app.cleanup_ctx.append(self._watch_certificates)
        app.cleanup_ctx.append(self._sweep_reservations)
        return app

    async def _sweep_reservations(self, _app: web.Application) -> AsyncIterator[None]:
        async def sweep() -> None:
            while True:
                await asyncio.sleep(self.sweep_period)
                self.state.guard.sweep()

        task = asyncio.create_task(sweep())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _watch_certificates(self, _app: web.Application) -> AsyncIterator[None]:
        assert self.reloader is not None
        task = asyncio.create_task(self.reloader.watch(5.0))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _mutate(self, request: web.Request) -> web.Response:
        return await self._review(request, "mutate")

    async def _validate(self, request: web.Request) -> web.Response:
        return await self._review(request, "validate")

    async def _review(self, request: web.Request, stage: Stage) -> web.Response:
        started = time.perf_counter()
        # A caller outside the known control-plane addresses may be the control plane itself, moved (EKS gives it
        # new network interfaces on a version update, seen at the next EC2 poll): refusing it would fail every pod
        # under failurePolicy Fail. It is answered; only its reviews take no reservation, the one thing a
        # made-up review could take from real pods.
        trusted = self.callers.allowed(request.remote)
        if not trusted:
            self._note_outside_caller(request, stage)
        uid: str | None = None
        api_version = "admission.k8s.io/v1"
        try:
            body = await self._body(request)
            review = parse_review(body)
            uid, api_version = review.uid, review.api_version
            answer = handle(review, stage, self.state, reserve=trusted)
            payload = orjson.dumps(review_envelope(review.api_version, answer.response))
        except BadReview as exc:
            self.metrics.bad_requests.inc(stage, str(exc.status))
            log.warning("bad admission request", extra={"fields": {"endpoint": stage, "status": exc.status,
                                                                     "reason": exc.reason, "uid": exc.uid}})
            return web.json_response({"error": exc.reason, "status": exc.status}, status=exc.status)
        except Exception:
            self.metrics.errors.inc(stage)
            log.exception("error answering admission review", extra={"fields": {"endpoint": stage, "uid": uid}})
            if uid is None:  # not even a review to answer
                body_500 = {"apiVersion": api_version, "kind": "AdmissionReview",
                            "response": {"uid": "", "allowed": False,
                                         "status": {"code": 500, "message": "ipguard: internal error; see its log"}}}
                return web.json_response(body_500, status=500)
            # When unsure, admit, and say so: a failed call would refuse the object under failurePolicy Fail.
            payload = orjson.dumps(review_envelope(api_version, self._unchecked(uid)))
            return web.Response(body=payload, content_type=JSON)
        elapsed = time.perf_counter() - started
        decision = answer.decision.verdict.value
        self.metrics.requests.inc(stage, decision, answer.outcome)
        if review.kind != "Pod" and stage == "validate":
            self.metrics.objects.inc(review.kind, answer.outcome)
        self.metrics.latency.observe(elapsed, stage, decision)
        if answer.reservation == "skipped":
            zone = answer.decision.reserve_zone or ""
            self.metrics.reservations_skipped.inc(zone)
            log.warning("admitted without a reservation: the zone is at its bound of unconfirmed reservations",
                        extra={"fields": {"zone": zone, "uid": review.uid, "pod": answer.decision.pod,
                                          "bound": self.state.settings.max_unconfirmed}})
        if answer.outcome not in ("allowed", "not-applicable") or self.log_allows:
            log.info(
                "admission decision",
                extra={"fields": {
                    "endpoint": stage, "uid": review.uid, "pod": answer.decision.pod,
                    "decision": decision, "outcome": answer.outcome, "reason": answer.decision.reason,
                    "dryRun": review.dry_run, **answer.response.get("auditAnnotations", {}),
                    "ms": round(elapsed * 1000, 3),
                }},
            )
        return web.Response(body=payload, content_type=JSON)

    def _unchecked(self, uid: str) -> AdmissionResponse:
        """The answer to a review ipguard failed to judge: admitted, with a warning (none in dry-run, which only
        records) and audit annotations that say so."""
        mode = self.state.settings.mode
        response: AdmissionResponse = {"uid": uid, "allowed": True, "auditAnnotations": {
            "decision": "error", "outcome": "error", "mode": mode.value, "reason": "internal error; see ipguard's log"}}
        if mode is not Mode.DRY_RUN:
            response["warnings"] = ["ipguard: admitted unchecked: internal error; see ipguard's log"]
        return response

    def _note_outside_caller(self, request: web.Request, stage: Stage) -> None:
        counter = self.metrics.outside_callers
        counter.inc(stage)
        if counter.get(stage) in (1, 10, 100) or counter.get(stage) % 1000 == 0:  # a flood logs a few lines
            log.warning("review from a caller outside the allowed sources: answered without a reservation",
                        extra={"fields": {"endpoint": stage, "remote": request.remote,
                                          "count": int(counter.get(stage))}})

    async def _body(self, request: web.Request) -> bytes:
        # aiohttp reports a missing Content-Type as application/octet-stream: look at the header itself.
        content_type = request.content_type if request.headers.get("Content-Type") else None
        if content_type != JSON:
            given = repr(content_type) if content_type else "missing"
            raise BadReview(f"Content-Type must be {JSON}, not {given}", 400)
        length = request.content_length
        if length is not None and length > MAX_BODY_BYTES:
            raise BadReview(f"request body is {length} bytes; at most {MAX_BODY_BYTES} are accepted", 413)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadReview(f"request body is over {MAX_BODY_BYTES} bytes", 413) from None

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        ok, reason = self.ready()
        return web.Response(text=reason + "\n", status=200 if ok else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.registry.render(),
                            headers={"Content-Type": CONTENT_TYPE, "X-Content-Type-Options": "nosniff"})


@dataclass(slots=True)
class RunningServer:
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_server(
    server: WebhookServer, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> RunningServer:
    """Listen on host:port (0 picks a free port); HTTPS when given a context."""
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return RunningServer(runner, host, int(bound))
