"""Admission server benchmark: ipguard's real HTTPS server beside a bare aiohttp TLS handler and kopf.

Three servers run side by side on 127.0.0.1, each in its own (spawned) process, with the same certificate, the
same TLS settings (all listen with a `CertReloader` context) and the same event loop (--loop: asyncio's, then
uvloop's, each measured in turn):

  A  ipguard   the real `WebhookServer` on the synthetic 5,000-node / 150,000-pod index of bench/index.py,
               mode enforce, a zone reserve that leaves us-east-1a out of pod IPs (so some pods steer and a
               pod pinned there is denied), JSON logs at info written to /dev/null.
  B  bare      an aiohttp TLS handler that parses the review with orjson and answers `allowed: true` with
               the uid echoed: the floor for "an aiohttp webhook over TLS" on this machine.
  C  kopf      kopf's own admission path (its `WebhookServer` and `serve_admission_request`, wired as its
               operator wires them, without the watchers) with one validating and one mutating handler that
               do nothing; its logs as `kopf run` sets them up, to /dev/null.

One load generator drives all three with the same payloads (real apiserver review bodies from
shared/fixtures/apiserver plus Deployment pods built like webhook/demo.py; /mutate and /validate; with and
without affinity; a fresh uid on every request):

  closed loop  N keep-alive connections, each sends its next review as soon as the last is answered, for
               --duration seconds after a --warmup; throughput, p50/p99 latency, errors. Rounds rotate the
               order (bare, kopf, ipguard / kopf, ipguard, bare / ...) and the median of rounds is reported.
  open loop    a fixed rate (--rate, default 1,000 reviews/s) against ipguard; each request has a scheduled
               send time and its latency is measured from that time, so queueing behind a slow answer is
               counted (no coordinated omission).

Generator: `wrk` (closed loop) when it is on PATH, else a Python asyncio client (a lean HTTP/1.1 protocol
over asyncio's TLS transport, or aiohttp's client with --generator aiohttp) in this process; the open loop is
always the Python client. With 2 cores the servers are pinned to CPU 0 (only one is under load at a time)
and the generator to CPU 1; --no-pin leaves placement to the kernel. See bench/README.md for how to read it.

    python bench/server.py [--duration 5] [--connections 32] [--rate 1000] [--rounds 3] [--quick] [--profile]
                           [--loop asyncio uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import functools
import gc
import importlib.util
import inspect
import io
import itertools
import json
import logging
import multiprocessing
import os
import pstats
import random
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import orjson
from aiohttp import web

from bench.index import build
from webhook.admission.handler import AdmissionState
from webhook.admission.handler import handle as handle_review
from webhook.admission.wire import parse_review, review_envelope
from webhook.demo import admission_review, deployment_pod
from webhook.eventloop import LoopChoice, loop_factory
from webhook.eventloop import run as run_loop
from webhook.model.config import Mode, Settings
from webhook.model.index import CapacityIndex, PodUse
from webhook.model.pods import ZONE_LABEL
from webhook.server import WebhookServer, start_server
from webhook.tls import CertReloader, write_cert_bundle

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "apiserver"
SERVICE, NAMESPACE = "ipguard", "ipguard"
SERVER_NAME = f"{SERVICE}.{NAMESPACE}.svc"  # the name the apiserver dials and checks
HOST = "127.0.0.1"
SERVER_CPU, CLIENT_CPU = 0, 1

# us-east-1a keeps back more than it has: out of pod IPs, so pods that may go there are steered away and a
# pod pinned there is denied. Every other zone keeps back 50 and has ~25,000 (full index) of headroom, far
# more than the bench's bounded set of reservations (pod names cycle through NAME_POOL) can use up.
SETTINGS = Settings(mode=Mode.ENFORCE, zone_reserve=50, zone_reserves={"us-east-1a": 1_000_000})
NAME_POOL = 8192
UID_MARK, SFX_MARK = b"@@UID@@", b"@@SFX@@"
UID_LEN, SFX_LEN = 36, 5


# --- payloads --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Template:
    label: str  # what the pod is and what ipguard is expected to do with it
    path: str  # request target, as the apiserver sends it
    body: bytes  # compact JSON with UID_MARK (request.uid) and SFX_MARK (the pod name's random suffix)

    def render(self, uid: bytes, sfx: bytes) -> bytes:
        return self.body.replace(UID_MARK, uid).replace(SFX_MARK, sfx)

    @property
    def size(self) -> int:
        return len(self.body) - len(UID_MARK) + UID_LEN - self.body.count(SFX_MARK) * (len(SFX_MARK) - SFX_LEN)


def _marked(review: dict[str, Any], base_name: str | None) -> bytes:
    """The review as the apiserver sends it (compact JSON) with the uid and the name suffix marked."""
    request = review["request"]
    request["uid"] = UID_MARK.decode()
    if base_name is not None:  # /validate, and pods created with a fixed name: the name is in two places
        name = base_name + SFX_MARK.decode()
        request["name"] = name
        request["object"]["metadata"]["name"] = name
    return orjson.dumps(review)


def _fixture(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_bytes())
    return document


def _with_zone_affinity(pod: dict[str, Any], operator: str, zones: list[str]) -> dict[str, Any]:
    pod["spec"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": ZONE_LABEL, "operator": operator, "values": zones}]}]
    }}}
    return pod


def _pair(label: str, pod: dict[str, Any], namespace: str, fixed_name: str | None = None) -> list[Template]:
    """The /mutate review (generateName only, unless the pod has a fixed name) and the /validate one."""
    base = pod["metadata"].get("generateName") or ""
    mutate = admission_review(json.loads(json.dumps(pod)), namespace, fixed_name)
    validate = admission_review(json.loads(json.dumps(pod)), namespace, fixed_name or base)
    return [
        Template(label, "/mutate?timeout=5s", _marked(mutate, fixed_name)),
        Template(label, "/validate?timeout=5s", _marked(validate, fixed_name or base)),
    ]


def build_payloads() -> tuple[list[Template], list[Template]]:
    """The distinct templates, and the weighted sequence every generator cycles through (same for both servers).

    Weights per pod shape (each sent to /mutate and to /validate):
      4  real fixture pod-create-generatename: Deployment pod, no affinity       -> steer (mutate patches)
      2  real fixture pod-create-affinity: required zone In [1a, 1c], a preferred -> steer away from 1a
      3  Deployment pod, required zone In [1b, 1d]                                 -> allow (full index; the
         --quick index has few enough full nodes that /mutate steers away from them)
      1  Deployment pod, nodeSelector zone 1a                                      -> deny (403 at /validate)
    """
    shapes: list[tuple[int, list[Template]]] = []
    generate = _fixture("pod-create-generatename.validate")
    generate_mutate = _fixture("pod-create-generatename.mutate")
    name = generate["request"]["object"]["metadata"]["generateName"]
    shapes.append((4, [
        Template("no affinity (fixture generatename)", "/mutate?timeout=5s", _marked(generate_mutate, None)),
        Template("no affinity (fixture generatename)", "/validate?timeout=5s", _marked(generate, name)),
    ]))
    affinity = _fixture("pod-create-affinity.validate")
    affinity_mutate = _fixture("pod-create-affinity.mutate")
    base = affinity["request"]["name"] + "-"
    label = "zone In [1a,1c] + preferred (fixture affinity)"
    shapes.append((2, [Template(label, "/mutate?timeout=5s", _marked(affinity_mutate, base)),
                       Template(label, "/validate?timeout=5s", _marked(affinity, base))]))
    web_pod = _with_zone_affinity(deployment_pod("web", "shop", "5f7c9d8b6", None), "In", ["us-east-1b", "us-east-1d"])
    shapes.append((3, _pair("zone In [1b,1d] (built, demo)", web_pod, "shop")))
    pinned = deployment_pod("cache", "shop", "7b8c6d5f4", {ZONE_LABEL: "us-east-1a"})
    shapes.append((1, _pair("nodeSelector zone 1a (built, demo)", pinned, "shop")))

    distinct = [t for _, pair in shapes for t in pair]
    sequence = [t for weight, pair in shapes for _ in range(weight) for t in pair]
    random.Random(5).shuffle(sequence)
    return distinct, sequence


class UidSource:
    """Fresh, unique, uuid-shaped uids (a random run prefix and a counter) and pod-name suffixes."""

    def __init__(self) -> None:
        self.prefix = str(uuid.uuid4())[:23]  # 8-4-4-4
        self.counter = itertools.count()

    def next(self) -> tuple[int, bytes, bytes]:
        n = next(self.counter)
        return n, f"{self.prefix}-{n:012x}".encode(), f"{n % NAME_POOL:05x}".encode()


def request_head(template: Template, port: int) -> bytes:
    # The apiserver's headers (see the fixtures' .meta.json), with Host the name it dials.
    return (
        f"POST {template.path} HTTP/1.1\r\nHost: {SERVER_NAME}:{port}\r\nUser-Agent: kube-apiserver-admission\r\n"
        f"Content-Length: {template.size}\r\nAccept: application/json, */*\r\nContent-Type: application/json\r\n"
        "Accept-Encoding: gzip\r\n\r\n"
    ).encode()


# --- servers (each in its own spawned process) -----------------------------------------------------------


def _bare_app() -> web.Application:
    async def review(request: web.Request) -> web.Response:
        document = orjson.loads(await request.read())
        answer = {"apiVersion": document["apiVersion"], "kind": "AdmissionReview",
                  "response": {"uid": document["request"]["uid"], "allowed": True}}
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    app = web.Application()
    app.router.add_post("/mutate", review)
    app.router.add_post("/validate", review)
    return app


# --profile: CPU time (time.thread_time) in these parts of ipguard, by wrapping the names where the caller
# looks them up at call time. (label, module, attribute, parent label); a parent's time includes its children.
STAGES: list[tuple[str, str, str, str]] = [
    ("callers.allowed", "webhook.callers", "CallerFilter.allowed", "_review"),
    ("_body (content checks, read)", "webhook.server", "WebhookServer._body", "_review"),
    ("parse_review", "webhook.server", "parse_review", "_review"),
    ("orjson.loads", "webhook.admission.wire", "orjson.loads", "parse_review"),
    ("handle", "webhook.server", "handle", "_review"),
    ("without_steering", "webhook.admission.handler", "without_steering", "handle"),
    ("decide", "webhook.admission.handler", "decide", "handle"),
    ("index.expire", "webhook.model.index", "CapacityIndex.expire", "decide"),
    ("pods.allowed_zones", "webhook.model.pods", "allowed_zones", "decide"),
    ("_zone_check (per allowed zone)", "webhook.model.decide", "_zone_check", "decide"),
    ("_avoid_nodes", "webhook.model.decide", "_avoid_nodes", "decide"),
    ("_preferences", "webhook.model.decide", "_preferences", "decide"),
    ("steering_patch", "webhook.admission.handler", "steering_patch", "handle"),
    ("guard.reserve (/validate)", "webhook.admission.reservations", "ReservationGuard.reserve", "handle"),
    ("index.reserve", "webhook.model.index", "CapacityIndex.reserve", "guard.reserve (/validate)"),
    ("steer_warning", "webhook.admission.handler", "steer_warning", "handle"),
    ("denial_message", "webhook.admission.handler", "denial_message", "handle"),
    ("audit_annotations", "webhook.admission.handler", "audit_annotations", "handle"),
    ("orjson.dumps (answer)", "webhook.server", "orjson.dumps", "_review"),
    ("log (JSON line)", "webhook.server", "log", "_review"),
    ("metrics (Counter.inc)", "webhook.metrics", "Counter.inc", "_review"),
    ("metrics (Histogram.observe)", "webhook.metrics", "Histogram.observe", "_review"),
]


class _Proxy:
    """Stands in for a module or logger: the given attributes replaced, every other one forwarded."""

    def __init__(self, target: Any, **replaced: Any) -> None:
        self._target = target
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class StageTimers:
    """--profile only: CPU time and calls inside WebhookServer._review and the STAGES (monkeypatched here)."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}  # label -> [thread seconds, calls]
        self.missing: list[str] = []
        self.patched: list[tuple[Any, str, Any]] = []  # (owner, attribute, original) to put back
        self.overhead_us = self._overhead()

    def timed(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        entry = self.totals.setdefault(label, [0.0, 0.0])
        clock = time.thread_time

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                entry[0] += clock() - t
                entry[1] += 1
        return wrapper

    def timed_async(self, label: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        # For coroutines that do not really wait (the body has arrived by the time the handler runs, and
        # nothing in the handler awaits I/O): the thread time between start and end is theirs.
        entry = self.totals.setdefault(label, [0.0, 0.0])
        clock = time.thread_time

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = clock()
            try:
                return await fn(*args, **kwargs)
            finally:
                entry[0] += clock() - t
                entry[1] += 1
        return wrapper

    def _overhead(self, n: int = 20000) -> float:
        """What one timed call adds to its caller, in us (two clock reads and a wrapper call)."""
        def noop() -> None:
            return None

        wrapped = self.timed("(calibration)", noop)
        t = time.thread_time()
        for _ in range(n):
            wrapped()
        with_wrapper = time.thread_time() - t
        t = time.thread_time()
        for _ in range(n):
            noop()
        plain = time.thread_time() - t
        del self.totals["(calibration)"]
        return max(0.0, with_wrapper - plain) / n * 1e6

    def install(self) -> None:
        import importlib

        for label, module_name, attr, _ in STAGES:
            owner: Any = importlib.import_module(module_name)
            function = ""
            if attr.startswith("orjson."):  # this module's `orjson`: a stand-in with one function timed
                attr, function = attr.split(".")
            elif "." in attr:  # Class.method: wrap it on the class
                class_name, attr = attr.split(".")
                owner = getattr(owner, class_name, None)
            original = getattr(owner, attr, None)
            if original is None:  # the code moved on: time what is still there
                self.missing.append(f"{module_name}.{attr}")
                continue
            if function:
                wrapped: Any = _Proxy(original, **{function: self.timed(label, getattr(original, function))})
            elif inspect.iscoroutinefunction(original):
                wrapped = self.timed_async(label, original)
            elif attr == "log":  # the module's logger: time its info (decisions other than a plain allow)
                wrapped = _Proxy(original, info=self.timed(label, original.info))
            else:
                wrapped = self.timed(label, original)
            self.patched.append((owner, attr, original))
            setattr(owner, attr, wrapped)
        self.patched.append((WebhookServer, "_review", WebhookServer._review))
        setattr(WebhookServer, "_review", self.timed_async("_review", WebhookServer._review))  # noqa: B010

    def uninstall(self) -> None:
        while self.patched:
            owner, attr, original = self.patched.pop()
            setattr(owner, attr, original)

    def take(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stages": {k: tuple(v) for k, v in self.totals.items()},
                               "missing": list(self.missing), "overhead_us": self.overhead_us}
        for entry in self.totals.values():
            entry[0] = entry[1] = 0.0
        return out


class GcWatch:
    """Collections and the time they took, per generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.stats: dict[int, list[float]] = {0: [0, 0.0, 0.0], 1: [0, 0.0, 0.0], 2: [0, 0.0, 0.0]}
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started is not None:
            took = time.perf_counter() - self.started
            entry = self.stats[info["generation"]]
            entry[0] += 1
            entry[1] += took
            entry[2] = max(entry[2], took)
            self.started = None

    def take(self) -> dict[int, list[float]]:
        out = self.stats
        self.stats = {g: [0, 0.0, 0.0] for g in (0, 1, 2)}
        return out


def server_process(kind: str, cert: str, key: str, sizes: tuple[int, int, int], cpu: int | None, log_mode: str,
                   profile: bool, micro: list[tuple[str, str, bytes]], loop: LoopChoice, conn: Connection) -> None:
    """Entry point of a server process (spawned): serve until told to stop on `conn`."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if kind == "ipguard" and log_mode == "devnull":
        from webhook.logs import setup_logging

        setup_logging("info", open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    if kind == "kopf" and log_mode == "devnull":
        from kopf._core.actions import loggers

        loggers.configure()  # what `kopf run` does without flags: its formatter, level INFO, to stderr
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    run_loop(_serve(kind, cert, key, sizes, profile, micro, conn), loop)


async def _start_kopf(cert: str, key: str, reloader: CertReloader) -> tuple[int, Callable[[], Awaitable[None]]]:
    """kopf's own admission path, wired as `kopf.spawn_tasks` wires it, without the watchers: its
    `admission_webhook_server` runs its `WebhookServer`, which hands each review to `serve_admission_request`
    (partially bound to the operator's settings, registry, insights, memories and indices). The resource
    discovery that the operator does against the API server is replaced by the one resource it would find (core
    v1 pods), revised into the insights by kopf's own `revise_resources`. One validating and one mutating
    handler, both async and empty, with the ids the bench's paths name (kopf maps /<id> to the handler)."""
    import kopf
    from kopf._cogs.aiokits import aiovalues
    from kopf._cogs.structs import ephemera, references
    from kopf._core.engines import admission, indexing
    from kopf._core.reactor import inventory, observation

    registry = kopf.OperatorRegistry()

    @kopf.on.validate("pods", id="validate", registry=registry)
    async def validate(**_: Any) -> None:
        return None

    @kopf.on.mutate("pods", id="mutate", registry=registry)
    async def mutate(**_: Any) -> None:
        return None

    settings = kopf.OperatorSettings()
    # The same certificate and listener context as the other servers (kopf loads the same pair into it again).
    settings.admission.server = kopf.WebhookServer(addr=HOST, context=reloader.context, certfile=cert, pkeyfile=key)
    insights = references.Insights()
    pods = references.Resource(group="", version="v1", plural="pods", kind="Pod", singular="pod",
                               shortcuts=frozenset({"po"}), namespaced=True, preferred=True,
                               verbs=frozenset({"create", "delete", "get", "list", "patch", "update", "watch"}))
    observation.revise_resources(resources={pods}, insights=insights, registry=registry, group=None)
    insights.ready_resources.set()
    indexers = indexing.OperatorIndexers()
    indexers.ensure(registry._indexing.get_all_handlers())
    memories = inventory.ResourceMemories()
    memo = ephemera.AnyMemo(ephemera.Memo())
    container: aiovalues.Container[Any] = aiovalues.Container()
    task = asyncio.create_task(admission.admission_webhook_server(
        container=container, settings=settings, registry=registry, insights=insights,
        webhookfn=functools.partial(admission.serve_admission_request, settings=settings, registry=registry,
                                    insights=insights, memories=memories, memobase=memo,
                                    indices=indexers.indices)))
    client_config = await asyncio.wait_for(container.wait(), 30)
    port = urllib.parse.urlsplit(client_config["url"]).port

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert port is not None
    return port, stop


async def _serve(kind: str, cert: str, key: str, sizes: tuple[int, int, int], profile: bool,
                 micro: list[tuple[str, str, bytes]], conn: Connection) -> None:
    reloader = CertReloader(cert, key)
    stop: Callable[[], Awaitable[None]]
    info: dict[str, Any] = {"pid": os.getpid(), "loop": type(asyncio.get_running_loop()).__module__}
    timers = StageTimers()
    if kind == "ipguard":
        t = time.perf_counter()
        index, _ = build(*sizes)
        info["build_s"] = time.perf_counter() - t
        info["zones"] = {z: (index.zone_headroom(z), SETTINGS.reserve_for_zone(z)) for z in index.zone_names()}
        state = AdmissionState(index, SETTINGS)
        if micro:
            info["micro"] = micro_breakdown(state, micro)  # before the timers go in
        running = await start_server(WebhookServer(state, reloader), HOST, 0, reloader.context)
        port, stop = running.port, running.stop
    elif kind == "kopf":
        port, stop = await _start_kopf(cert, key, reloader)
    else:
        logging.getLogger().setLevel(logging.WARNING)
        runner = web.AppRunner(_bare_app(), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, HOST, 0, ssl_context=reloader.context, backlog=1024).start()
        port, stop = int(runner.addresses[0][1]), runner.cleanup
    t = time.perf_counter()
    gc.collect()
    info["gc_full_ms"] = (time.perf_counter() - t) * 1000
    info["gc_objects"] = len(gc.get_objects())
    if kind == "ipguard":
        gc.freeze()  # as `ipguard serve` does once the index is loaded (webhook/service.py)
        t = time.perf_counter()
        gc.collect()
        info["gc_frozen_ms"] = (time.perf_counter() - t) * 1000
    gcwatch = GcWatch()
    profiler: cProfile.Profile | None = None
    done = asyncio.Event()

    def command() -> None:
        nonlocal profiler
        try:
            message = conn.recv()
        except EOFError:
            done.set()
            return
        op = message[0]
        if op == "cpu":
            conn.send(time.process_time())
        elif op == "gc":
            conn.send(gcwatch.take())
        elif op == "timers-install":  # from now on (the measured rounds ran without)
            if profile and not timers.totals:
                timers.install()
            conn.send(True)
        elif op == "timers":
            conn.send(timers.take())
        elif op == "profile-start":
            timers.uninstall()  # cProfile sees the code as it is
            profiler = cProfile.Profile()
            profiler.enable()
            conn.send(True)
        elif op == "profile-stop":
            text = ""
            if profiler is not None:
                profiler.disable()
                text = _profile_text(profiler, message[1])
                profiler = None
            conn.send(text)
        elif op == "stop":
            done.set()
            conn.send(True)

    loop = asyncio.get_running_loop()
    loop.add_reader(conn.fileno(), command)
    conn.send(("ready", port, info))
    await done.wait()
    loop.remove_reader(conn.fileno())
    await stop()


def micro_breakdown(state: AdmissionState, bodies: list[tuple[str, str, bytes]],
                    n: int = 2000) -> list[tuple[str, str, str, float, float, float]]:
    """In-process, no network: mean CPU us per call of parse_review, handle and orjson.dumps of the answer, per
    payload shape (label, endpoint, outcome, parse, handle, dumps). Thread time, so other load on the machine
    does not count (though it still costs cache)."""
    rows = []
    clock = time.thread_time
    for label, path, body in bodies:
        stage: Any = path.strip("/")
        t = clock()
        for _ in range(n):
            review = parse_review(body)
        parse_us = (clock() - t) / n * 1e6
        t = clock()
        for _ in range(n):
            answer = handle_review(review, stage, state)
        handle_us = (clock() - t) / n * 1e6
        envelope = review_envelope(review.api_version, answer.response)
        t = clock()
        for _ in range(n):
            orjson.dumps(envelope)
        dumps_us = (clock() - t) / n * 1e6
        rows.append((label, path, answer.outcome, parse_us, handle_us, dumps_us))
    return rows


class _Afresh(CapacityIndex):
    """The same index with nothing kept between its changes: every decision works its figures out afresh."""

    @property
    def memo(self) -> dict[Any, Any]:
        return {}

    @property
    def node_memo(self) -> dict[Any, Any]:
        return {}


@dataclass(slots=True)
class AnswersCheck:
    reviews: int = 0
    identical: int = 0
    events: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    first_difference: str = ""


def answers_check(sizes: tuple[int, int, int], sequence: list[Template], reviews: int,
                  every: int = 10) -> AnswersCheck:
    """The bench's reviews, in its order, answered by two indexes built alike: one keeping figures between its
    changes (as served), one working them out afresh for every decision. Every `every` reviews both see the same
    pod event (a pod moved to another node), and a simulated clock moves 1 ms per review, so kept figures are
    dropped and reservations and cooldowns expire as they would. Answers are compared whole (patch, warnings,
    audit annotations, status)."""
    now = [0.0]

    def clock() -> float:
        return now[0]

    kept, node_names = build(*sizes, clock=clock)
    afresh, _ = build(*sizes, kind=_Afresh, clock=clock)
    states = [AdmissionState(kept, SETTINGS), AdmissionState(afresh, SETTINGS)]
    rng = random.Random(13)
    keys = list(kept.pods)
    uids = UidSource()
    check = AnswersCheck()
    for i in range(reviews):
        template = sequence[i % len(sequence)]
        _, uid, sfx = uids.next()
        review = parse_review(template.render(uid, sfx))
        stage: Any = template.path.split("?")[0].strip("/")
        answers = [handle_review(review, stage, state) for state in states]
        bodies = [orjson.dumps(a.response, option=orjson.OPT_SORT_KEYS) for a in answers]
        check.reviews += 1
        check.outcomes[answers[0].outcome] += 1
        if bodies[0] == bodies[1]:
            check.identical += 1
        elif not check.first_difference:
            check.first_difference = f"review {i} ({template.label}, {template.path}): {bodies[0]!r} != {bodies[1]!r}"
        now[0] += 0.001
        if i % every == every - 1:
            key, node = keys[rng.randrange(len(keys))], node_names[rng.randrange(len(node_names))]
            for index in (kept, afresh):
                index.remove_pod(key)
                index.upsert_pod(key, node, PodUse.IP)
            check.events += 1
    return check


def _profile_text(profiler: cProfile.Profile, top: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


@dataclass
class ServerHandle:
    name: str
    process: multiprocessing.process.BaseProcess
    conn: Connection
    port: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def ask(self, *message: Any) -> Any:
        self.conn.send(message)
        return self.conn.recv()


# --- the Python load generator ---------------------------------------------------------------------------


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection over asyncio's TLS transport; one request in flight at a time.

    Just enough HTTP for a webhook answer (status line, Content-Length body), so that one core of generator
    can outrun one core of server; aiohttp's client (--generator aiohttp) does more per request.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        if waiter is None:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower() + b"\r\n"
        at = head.find(b"\r\ncontent-length:")
        length = int(head[at + 17:head.find(b"\r\n", at + 2)]) if at >= 0 else 0
        total = end + 4 + length
        if len(self.buffer) < total:
            return
        status = int(self.buffer[9:12])
        body = bytes(self.buffer[end + 4:total])
        del self.buffer[:total]
        self.waiter = None
        if not waiter.done():
            waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection closed: {exc}"))
        self.waiter = None

    async def request(self, data: bytes) -> tuple[int, bytes]:
        if self.transport is None:
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def client_context(ca_file: Path) -> ssl.SSLContext:
    """What the kube-apiserver does: trust only the webhook's caBundle, check the DNS name, never the CN."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.hostname_checks_common_name = False
    context.set_alpn_protocols(["http/1.1"])
    return context


Sender = Callable[[Template, bytes, bytes], Awaitable[tuple[int, bytes]]]


class Client:
    """N senders to one server: raw HttpConnections, or one aiohttp session with a pool of N."""

    def __init__(self, kind: str, port: int, context: ssl.SSLContext, connections: int) -> None:
        self.kind = kind
        self.port = port
        self.context = context
        self.n = connections
        self.conns: list[HttpConnection] = []
        self.session: aiohttp.ClientSession | None = None
        self.heads: dict[str, bytes] = {}
        self.tls: str = ""

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        if self.kind == "aiohttp":
            connector = aiohttp.TCPConnector(ssl=self.context, limit=self.n, force_close=False)
            self.session = aiohttp.ClientSession(connector=connector)
            self.tls = "(aiohttp session)"
            return
        for _ in range(self.n):
            _, protocol = await loop.create_connection(HttpConnection, HOST, self.port, ssl=self.context,
                                                       server_hostname=SERVER_NAME)
            self.conns.append(protocol)
        transport = self.conns[0].transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is not None:
            cipher = ssl_object.cipher()
            alpn = ssl_object.selected_alpn_protocol()
            self.tls = f"{ssl_object.version()} {cipher[0] if cipher else '?'} ALPN {alpn}"

    def sender(self, i: int) -> Sender:
        if self.session is not None:
            session = self.session
            url = f"https://{HOST}:{self.port}"
            headers = {"Content-Type": "application/json", "User-Agent": "kube-apiserver-admission",
                       "Accept": "application/json, */*", "Host": f"{SERVER_NAME}:{self.port}"}

            async def send_aiohttp(template: Template, uid: bytes, sfx: bytes) -> tuple[int, bytes]:
                async with session.post(url + template.path, data=template.render(uid, sfx), headers=headers,
                                        server_hostname=SERVER_NAME) as response:
                    return response.status, await response.read()
            return send_aiohttp
        conn = self.conns[i]
        heads = self.heads

        async def send_raw(template: Template, uid: bytes, sfx: bytes) -> tuple[int, bytes]:
            head = heads.get(template.path + template.label)
            if head is None:
                head = heads[template.path + template.label] = request_head(template, self.port)
            return await conn.request(head + template.render(uid, sfx))
        return send_raw

    async def close(self) -> None:
        for conn in self.conns:
            conn.close()
        if self.session is not None:
            await self.session.close()
        await asyncio.sleep(0)


@dataclass
class Phase:
    server: str
    mode: str  # closed | open
    duration: float
    latencies: list[float] = field(default_factory=list)  # seconds
    lags: list[float] = field(default_factory=list)  # open loop: how late the generator sent (seconds)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    denied: int = 0
    patched: int = 0
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    irq_cpu: float = 0.0  # interrupt and softirq time (the loopback network path, mostly)
    other_cpu: float = 0.0  # every other process the machine ran meanwhile (other workloads, the idle server)
    requests_override: int | None = None  # wrk: its own count
    p50_override: float | None = None
    p99_override: float | None = None

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 3:
            self.error_samples.append(what)

    def check(self, uid: bytes, status: int, body: bytes) -> None:
        if status != 200:
            self.error(f"HTTP {status}: {body[:200]!r}")
        elif uid not in body:
            self.error(f"uid not echoed: {body[:200]!r}")
        else:
            if b'"allowed":false' in body:
                self.denied += 1
            if b'"patch":"' in body:
                self.patched += 1

    @property
    def requests(self) -> int:
        return self.requests_override if self.requests_override is not None else len(self.latencies)

    @property
    def rate(self) -> float:
        return self.requests / self.duration

    def pct(self, q: float) -> float:
        """Latency percentile in ms (nearest rank)."""
        if q == 0.5 and self.p50_override is not None:
            return self.p50_override
        if q == 0.99 and self.p99_override is not None:
            return self.p99_override
        return _percentile(self.latencies, q) * 1000

    def server_us(self) -> float:
        return self.server_cpu / self.requests * 1e6 if self.requests else 0.0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def machine_busy() -> tuple[float, float]:
    """CPU seconds all cores have spent busy since boot, and the part in interrupts (loopback TCP is mostly
    softirq time, charged to no process), from /proc/stat; NaN where there is no /proc."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan"), float("nan")
    ticks = [int(x) for x in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    guest = sum(ticks[8:10])  # guest time is already inside user/nice
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle - guest) / hz, (ticks[5] + ticks[6]) / hz


def _charge(phase: Phase, before: tuple[float, float], after: tuple[float, float]) -> None:
    phase.irq_cpu = after[1] - before[1]
    phase.other_cpu = max(0.0, (after[0] - before[0]) - phase.irq_cpu - phase.server_cpu - phase.client_cpu)


async def _measure_window(phase: Phase, server: ServerHandle, start: float, end: float) -> None:
    """Sample the server's, our own and the whole machine's CPU time at the window's edges."""
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    s0, c0, m0 = server.ask("cpu"), time.process_time(), machine_busy()
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    s1, c1, m1 = server.ask("cpu"), time.process_time(), machine_busy()
    phase.server_cpu, phase.client_cpu = s1 - s0, c1 - c0
    _charge(phase, m0, m1)


async def closed_loop(server: ServerHandle, client: Client, sequence: list[Template], uids: UidSource,
                      warmup: float, duration: float) -> Phase:
    phase = Phase(server.name, "closed", duration)
    start = time.perf_counter() + 0.01
    window_start, window_end = start + warmup, start + warmup + duration
    clock = time.perf_counter
    n = len(sequence)

    async def worker(i: int) -> None:
        send = client.sender(i)
        while True:
            k, uid, sfx = uids.next()
            t0 = clock()
            if t0 >= window_end:
                return
            try:
                status, body = await send(sequence[k % n], uid, sfx)
            except (OSError, aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
                if t0 >= window_start:
                    phase.error(f"{type(exc).__name__}: {exc}")
                return
            t1 = clock()
            if window_start <= t1 < window_end:
                phase.latencies.append(t1 - t0)
                phase.check(uid, status, body)

    await asyncio.sleep(max(0.0, start - clock()))
    await asyncio.gather(_measure_window(phase, server, window_start, window_end),
                         *(worker(i) for i in range(client.n)))
    return phase


async def open_loop(server: ServerHandle, client: Client, sequence: list[Template], uids: UidSource, rate: float,
                    warmup: float, duration: float) -> Phase:
    """Request i is due at start + i/rate; a free connection takes the next due request, sleeping until its
    time. When every connection is busy, due requests wait, and that wait is in their latency."""
    phase = Phase(server.name, "open", duration)
    start = time.perf_counter() + 0.01
    window_start, window_end = start + warmup, start + warmup + duration
    total = int((warmup + duration) * rate)
    slots = itertools.count()
    clock = time.perf_counter
    n = len(sequence)

    async def worker(i: int) -> None:
        send = client.sender(i)
        while True:
            slot = next(slots)
            if slot >= total:
                return
            due = start + slot / rate
            wait = due - clock()
            if wait > 0:
                await asyncio.sleep(wait)
            k, uid, sfx = uids.next()
            sent = clock()
            try:
                status, body = await send(sequence[k % n], uid, sfx)
            except (OSError, aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
                phase.error(f"{type(exc).__name__}: {exc}")
                return
            if due >= window_start:
                phase.latencies.append(clock() - due)
                phase.lags.append(sent - due)
                phase.check(uid, status, body)

    await asyncio.gather(_measure_window(phase, server, window_start, window_end),
                         *(worker(i) for i in range(client.n)))
    return phase


# --- wrk -------------------------------------------------------------------------------------------------

_LUA = """-- generated by bench/server.py: POST real-shaped reviews with a fresh uid each
local T = {
%s
}
local prefix = "%s"
local headers = { ["Content-Type"] = "application/json", ["User-Agent"] = "kube-apiserver-admission",
                  ["Accept"] = "application/json, */*", ["Host"] = "%s" }
local counter = 0
bad, denied, patched = 0, 0, 0  -- globals: done() reads them with thread:get()
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

request = function()
  counter = counter + 1
  local t = T[(counter %% #T) + 1]
  local uid = string.format("%%s-%%012x", prefix, counter)
  local sfx = string.format("%%05x", counter %% %d)
  local buf = {}
  for k, p in ipairs(t[2]) do
    if p == 1 then buf[k] = uid elseif p == 2 then buf[k] = sfx else buf[k] = p end
  end
  return wrk.format("POST", t[1], headers, table.concat(buf))
end

response = function(status, hdrs, body)
  if status ~= 200 or not string.find(body, '"uid":"' .. prefix, 1, true) then
    bad = bad + 1
  else
    if string.find(body, '"allowed":false', 1, true) then denied = denied + 1 end
    if string.find(body, '"patch":"', 1, true) then patched = patched + 1 end
  end
end

done = function(summary, latency, requests)
  local b, d, p = 0, 0, 0
  for _, thread in ipairs(threads) do
    b = b + thread:get("bad"); d = d + thread:get("denied"); p = p + thread:get("patched")
  end
  local e = summary.errors
  io.write(string.format("IPGUARD-BENCH %%d %%d %%d %%d %%d %%d %%d %%d %%d %%d\\n", summary.requests,
    summary.duration, e.connect + e.read + e.write + e.timeout, e.status, b, d, p,
    latency:percentile(50), latency:percentile(99), 0))
end
"""


def write_lua(path: Path, sequence: list[Template], prefix: str, port: int) -> None:
    entries = []
    for template in sequence:
        parts = re.split(b"(" + re.escape(UID_MARK) + b"|" + re.escape(SFX_MARK) + b")", template.body)
        lua_parts = []
        for part in parts:
            if part == UID_MARK:
                lua_parts.append("1")
            elif part == SFX_MARK:
                lua_parts.append("2")
            elif part:
                text = part.decode()
                assert "]=====]" not in text
                lua_parts.append(f"[=====[{text}]=====]")
        entries.append(f'  {{"{template.path}", {{{", ".join(lua_parts)}}}}},')
    path.write_text(_LUA % ("\n".join(entries), prefix, f"{SERVER_NAME}:{port}", NAME_POOL))


def wrk_phase(wrk: str, script: Path, server: ServerHandle, connections: int, warmup: float,
              duration: float) -> Phase:
    url = f"https://{HOST}:{server.port}"

    def run_wrk(seconds: float) -> subprocess.CompletedProcess[str]:
        # wrk takes whole seconds; one thread (one core for the generator).
        command = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", str(script), url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    if warmup > 0:
        run_wrk(warmup)
    phase = Phase(server.name, "closed", duration)
    s0, c0, m0 = server.ask("cpu"), _children_cpu(), machine_busy()
    done = run_wrk(duration)
    phase.server_cpu, phase.client_cpu = server.ask("cpu") - s0, _children_cpu() - c0
    _charge(phase, m0, machine_busy())
    line = next((x for x in done.stdout.splitlines() if x.startswith("IPGUARD-BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")
    requests, micros, socket_errors, status_errors, bad, denied, patched, p50, p99, _ = map(int, line.split()[1:])
    phase.duration = micros / 1e6
    phase.requests_override = requests
    phase.errors = socket_errors + max(status_errors, 0) + bad
    phase.denied, phase.patched = denied, patched
    phase.p50_override, phase.p99_override = p50 / 1000, p99 / 1000
    return phase


def tree_state() -> str:
    """The commit measured, and whether webhook/ had uncommitted changes (they are measured too)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "webhook"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"commit {head}" + (f" + uncommitted changes to {len(dirty)} file(s) under webhook/" if dirty else "")


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


# --- the run ---------------------------------------------------------------------------------------------


SERVERS = ("bare", "kopf", "ipguard")  # the floor, the framework a user would otherwise pick, ipguard


def start_servers(paths: Any, sizes: tuple[int, int, int], pin: bool, log_mode: str, profile: bool,
                  micro: list[tuple[str, str, bytes]], loop: LoopChoice) -> dict[str, ServerHandle]:
    ctx = multiprocessing.get_context("spawn")
    handles: dict[str, ServerHandle] = {}
    for name in SERVERS:
        parent, child = ctx.Pipe()
        process = ctx.Process(target=server_process, name=f"bench-{name}", daemon=True, args=(
            name, str(paths.tls_cert), str(paths.tls_key), sizes, SERVER_CPU if pin else None, log_mode, profile,
            micro if name == "ipguard" else [], loop, child))
        process.start()
        child.close()
        handles[name] = ServerHandle(name, process, parent)
    for handle in handles.values():
        if not handle.conn.poll(120):
            raise RuntimeError(f"{handle.name} server did not start")
        _, handle.port, handle.info = handle.conn.recv()
    return handles


def stop_servers(handles: dict[str, ServerHandle]) -> None:
    for handle in handles.values():
        with contextlib.suppress(OSError, EOFError):
            handle.conn.send(("stop",))
            if handle.conn.poll(10):
                handle.conn.recv()
    for handle in handles.values():
        handle.process.join(10)
        if handle.process.is_alive():
            handle.process.terminate()
            handle.process.join(5)


def _fmt_row(label: str, phase: Phase) -> str:
    wall = phase.duration
    return (f"  {label:<18} {phase.rate:9.0f} {phase.pct(0.5):8.2f} {phase.pct(0.99):8.2f} {phase.errors:7d}"
            f" {phase.server_us():10.0f} {phase.server_cpu / wall * 100:7.0f}% {phase.client_cpu / wall * 100:7.0f}%"
            f" {phase.irq_cpu / wall * 100:7.0f}% {phase.other_cpu / wall * 100:7.0f}%")


HEADER = (f"  {'':<18} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'srv us/req':>10} "
          f"{'srv cpu':>8} {'gen cpu':>8} {'irq':>8} {'others':>8}")


@dataclass
class LoopResult:
    """One event loop's medians per server (closed loop) and ipguard's open-loop p99."""

    loop: str
    med: dict[str, dict[str, float]]
    open_p99: float | None


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


async def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    busy0, wall0 = machine_busy()[0], time.perf_counter()
    await asyncio.sleep(0.5)
    idle_load = (machine_busy()[0] - busy0) / (time.perf_counter() - wall0)
    distinct, sequence = build_payloads()
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    wrk = shutil.which("wrk")
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if wrk else "python"
    if generator == "wrk" and not wrk:
        print("--generator wrk: wrk is not on PATH (apt-get install wrk; this bench never installs it)")
        return 2
    sizes = (args.nodes, args.pods, args.zones)
    results: list[LoopResult] = []

    print(f"ipguard server benchmark ({time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, kopf {_version('kopf')})")
    print(f"code: {tree_state()}")
    print(f"other load before the run: {idle_load * 100:.0f}% of one core (0.5 s sample; the 'others' column "
          "below gives it for each phase)")
    print(f"event loops (every server on the same one, one after the other): "
          f"{', '.join(loop_factory(loop)[0] for loop in args.loop)}")
    same_answers = True
    if args.answers:
        t = time.perf_counter()
        check = answers_check(sizes, sequence, args.answers)
        same_answers = check.identical == check.reviews
        mix = ", ".join(f"{outcome} {count}" for outcome, count in sorted(check.outcomes.items()))
        print(f"answers with figures kept between index changes (as served) and worked out afresh for each review: "
              f"{check.identical} of {check.reviews} identical ({mix}; {check.events} pod events between them; "
              f"{time.perf_counter() - t:.0f} s)")
        if not same_answers:
            print(f"  first difference: {check.first_difference}")
    with tempfile.TemporaryDirectory(prefix="ipguard-bench-") as tmp:
        paths = write_cert_bundle(Path(tmp), SERVICE, NAMESPACE, [HOST])
        micro = [(t.label, t.path.split("?")[0], t.render(b"0" * UID_LEN, b"0" * SFX_LEN)) for t in distinct]
        context = client_context(paths.ca_cert)
        uids = UidSource()
        for n, loop in enumerate(args.loop):
            profile = args.profile and n == 0
            servers = start_servers(paths, sizes, pin, args.log, profile, micro if profile else [], loop)
            try:
                if pin:
                    os.sched_setaffinity(0, {CLIENT_CPU})
                print(f"\n=== event loop: {loop_factory(loop)[0]} (all three servers)")
                results.append(await run_loop_rounds(args, servers, loop, n == 0, distinct, sequence, uids, context,
                                                     generator, wrk, Path(tmp) / "review.lua", pin))
            finally:
                stop_servers(servers)

    print("\nsummary (median of rounds; per core = reviews per CPU-second of the server process, 1e6 / srv us/req)")
    print(f"  {'loop':<14} {'server':<8} {'req/s':>8} {'p99 ms':>7} {'errors':>6} {'us/req':>7} {'per core':>9}")
    for result in results:
        for name in SERVERS:
            m = result.med[name]
            print(f"  {result.loop:<14} {name:<8} {m['rate']:8.0f} {m['p99']:7.2f} {int(m['errors']):6d} "
                  f"{m['us']:7.0f} {_ratio(1e6, m['us']):9.0f}")
    met = True
    for result in results:
        med = result.med
        ip_bare, ip_kopf = _ratio(med["ipguard"]["rate"], med["bare"]["rate"]), _ratio(
            med["ipguard"]["rate"], med["kopf"]["rate"])
        kopf_bare = _ratio(med["kopf"]["rate"], med["bare"]["rate"])
        cpu = {k: _ratio(med[a]["us"], med[b]["us"]) for k, a, b in (
            ("ipguard/bare", "bare", "ipguard"), ("ipguard/kopf", "kopf", "ipguard"), ("kopf/bare", "bare", "kopf"))}
        print(f"  {result.loop}: throughput ratios ipguard/bare {ip_bare:.2f} (target >= 0.50), ipguard/kopf "
              f"{ip_kopf:.2f} (target >= 1.7), kopf/bare {kopf_bare:.2f}; by CPU per review (what a whole free core "
              f"each would give): ipguard/bare {cpu['ipguard/bare']:.2f}, ipguard/kopf {cpu['ipguard/kopf']:.2f}, "
              f"kopf/bare {cpu['kopf/bare']:.2f}")
        if result.open_p99 is not None:
            print(f"  {result.loop}: ipguard p99 at {args.rate:g}/s {result.open_p99:.2f} ms (target <= 5 ms)")
        met = met and ip_bare >= 0.5 and ip_kopf >= 1.7
    if len(results) > 1:
        base = results[0]
        for result in results[1:]:
            gains = ", ".join(f"{name} {_ratio(base.med[name]['us'], result.med[name]['us']):.2f}x" for name in SERVERS)
            print(f"  per-core throughput, {result.loop} / {base.loop}: {gains}")
    print(f"  targets (ipguard >= 0.50 of bare and >= 1.7x kopf, on every loop): {'MET' if met else 'NOT MET'}")
    if not same_answers:
        print("  ANSWERS DIFFER with and without kept figures (see above): a stale kept figure is a bug")
    print(f"  run time {time.perf_counter() - started:.0f} s")
    return 0 if met and same_answers else 1


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


async def run_loop_rounds(args: argparse.Namespace, servers: dict[str, ServerHandle], loop: LoopChoice, first: bool,
                          distinct: list[Template], sequence: list[Template], uids: UidSource,
                          context: ssl.SSLContext, generator: str, wrk: str | None, script: Path,
                          pin: bool) -> LoopResult:
    """The closed-loop rounds against the three servers and the open loop against ipguard, on one event loop."""
    ip = servers["ipguard"]
    if first:
        print(f"index: {args.nodes} nodes, {args.pods} pods, {args.zones} zones (built in "
              f"{ip.info['build_s']:.1f} s); settings: mode {SETTINGS.mode.value}, zoneReserve "
              f"{SETTINGS.zone_reserve}, zoneReserves us-east-1a={SETTINGS.reserve_for_zone('us-east-1a')}"
              f" (1a out of pod IPs); server logs: {args.log} (ipguard: its JSON lines at info; kopf: as `kopf run` "
              "configures them, info, with aiohttp's access log)")
        zones = ip.info["zones"]
        print("zones at start, headroom/reserve: " + ", ".join(f"{z}={h}/{r}" for z, (h, r) in zones.items()))
        if all(h <= r for h, r in zones.values()):
            print("  WARNING: every zone is out of pod IPs: every pod is denied, nothing is steered")
        print("payloads (each pod shape to /mutate and /validate; fresh uid per request; weights 4:2:3:1):")
        for template in distinct:
            print(f"  {template.path.split('?')[0]:<10} {template.size:5d} B  {template.label}")
        placement = (f"servers pinned to CPU {SERVER_CPU} (one under load at a time), generator to CPU "
                     f"{CLIENT_CPU}" if pin else "not pinned (--no-pin)")
        print(f"cores: {placement}")
        gen_text = {"wrk": f"wrk ({wrk}) -t1 -c{args.connections}, Lua script POSTs the payloads",
                    "python": f"Python asyncio HTTP/1.1 client, {args.connections} keep-alive connections",
                    "aiohttp": f"aiohttp ClientSession, pool of {args.connections} keep-alive connections"}
        print(f"closed loop: {gen_text[generator]}, {args.warmup:g} s warm-up + {args.duration:g} s per server"
              f", {args.rounds} round(s), the order rotating")
        print(f"open loop: Python client, {args.rate:g} reviews/s to ipguard, {args.open_warmup:g} s warm-up + "
              f"{args.open_duration:g} s, latency from each request's scheduled send time")
        print("client TLS: ssl.create_default_context(cafile=<generated ca.crt>) -> trusts only that CA; "
              f"verify_mode={context.verify_mode.name}, check_hostname={context.check_hostname}, "
              f"hostname_checks_common_name={context.hostname_checks_common_name}, "
              f"server_hostname={SERVER_NAME} (SNI + SAN check), ALPN http/1.1")
        if generator == "wrk":
            print("  (wrk itself does not verify the certificate: the TLS check above is the Python client's)")
    seen = {name: servers[name].info["loop"] for name in SERVERS}
    print(f"loop in each server process: {', '.join(f'{k} {v}' for k, v in seen.items())}")

    closed: dict[str, list[Phase]] = {name: [] for name in SERVERS}
    opened: list[Phase] = []
    opened_bare: list[Phase] = []
    tls_seen = ""
    for r in range(args.rounds):
        order = [*SERVERS[r % len(SERVERS):], *SERVERS[:r % len(SERVERS)]]
        for name in order:
            server = servers[name]
            if generator == "wrk":
                assert wrk is not None
                # A uid prefix of its own for each wrk run (8-4-4-4, the last group: round and server).
                prefix = uids.prefix[:19] + f"{r:02x}{'abc'[SERVERS.index(name)]}0"
                write_lua(script, sequence, prefix, server.port)
                phase = await asyncio.to_thread(wrk_phase, wrk, script, server, args.connections,
                                                args.warmup, args.duration)
            else:
                client = Client("aiohttp" if generator == "aiohttp" else "raw", server.port, context,
                                args.connections)
                await client.open()
                tls_seen = tls_seen or client.tls
                try:
                    phase = await closed_loop(server, client, sequence, uids, args.warmup, args.duration)
                finally:
                    await client.close()
            closed[name].append(phase)
        for name in (["bare", "ipguard"] if args.open_bare else ["ipguard"]) if args.rate > 0 else []:
            server = servers[name]
            client = Client("raw", server.port, context, args.connections)
            await client.open()
            tls_seen = tls_seen or client.tls
            try:
                phase = await open_loop(server, client, sequence, uids, args.rate, args.open_warmup,
                                        args.open_duration)
            finally:
                await client.close()
            (opened if name == "ipguard" else opened_bare).append(phase)
    if tls_seen:
        print(f"negotiated: {tls_seen}")

    print("\nclosed loop, per round (srv us/req: server process CPU per review; srv cpu, gen cpu, irq, "
          "others: share of one core used by the server, the generator, interrupts (the loopback network), "
          "and every other process on the machine)")
    print(HEADER)
    for r in range(args.rounds):
        for name in SERVERS:
            print(_fmt_row(f"round {r + 1} {name}", closed[name][r]))
    med: dict[str, dict[str, float]] = {}
    for name in SERVERS:
        phases = closed[name]
        med[name] = {
            "rate": statistics.median(p.rate for p in phases),
            "p50": statistics.median(p.pct(0.5) for p in phases),
            "p99": statistics.median(p.pct(0.99) for p in phases),
            "errors": float(sum(p.errors for p in phases)),
            "us": statistics.median(p.server_us() for p in phases),
            "srv": statistics.median(p.server_cpu / p.duration for p in phases),
            "gen": statistics.median(p.client_cpu / p.duration for p in phases),
            "irq": statistics.median(p.irq_cpu / p.duration for p in phases),
            "oth": statistics.median(p.other_cpu / p.duration for p in phases),
        }
    print(f"\nmedian of {args.rounds} round(s):")
    print(HEADER)
    for name in SERVERS:
        m = med[name]
        print(f"  {name:<18} {m['rate']:9.0f} {m['p50']:8.2f} {m['p99']:8.2f} {int(m['errors']):7d}"
              f" {m['us']:10.0f} {m['srv'] * 100:7.0f}% {m['gen'] * 100:7.0f}% {m['irq'] * 100:7.0f}%"
              f" {m['oth'] * 100:7.0f}%")
    for name in ("kopf", "ipguard"):
        total = sum(p.requests for p in closed[name])
        print(f"  {name} answers: {sum(p.denied for p in closed[name]) / max(total, 1):.0%} denied, "
              f"{sum(p.patched for p in closed[name]) / max(total, 1):.0%} with a patch")
    for name in SERVERS:
        for p in closed[name]:
            for sample in p.error_samples:
                print(f"  error ({name}): {sample}")
    if med["bare"]["gen"] > 0.9 and med["bare"]["srv"] < 0.9:
        print("  NOTE: the generator used ~all of its core while the bare server did not: generator-bound; "
              "the bare figure (and so the ratios against it) is a lower bound")

    open_p99: float | None = None
    print(f"\nopen loop, {args.rate:g} reviews/s (latency from each request's scheduled send time)")
    if opened:
        print(f"  {'':<18} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'srv us/req':>10} "
              f"{'srv cpu':>8} {'others':>8} {'lag p99':>8}")
        rows = [(f"round {r + 1} ipguard", p) for r, p in enumerate(opened)]
        rows += [(f"round {r + 1} bare", p) for r, p in enumerate(opened_bare)]
        for label, p in rows:
            print(f"  {label:<18} {p.rate:9.0f} {p.pct(0.5):8.2f} {p.pct(0.99):8.2f} "
                  f"{p.errors:7d} {p.server_us():10.0f} {p.server_cpu / p.duration * 100:7.0f}% "
                  f"{p.other_cpu / p.duration * 100:7.0f}% {_percentile(p.lags, 0.99) * 1000:8.2f}")
            for sample in p.error_samples:
                print(f"  error: {sample}")
        open_p50 = statistics.median(p.pct(0.5) for p in opened)
        open_p99 = statistics.median(p.pct(0.99) for p in opened)
        pooled = [x for p in opened for x in p.latencies]
        print(f"  ipguard, median of rounds: p50 {open_p50:.2f} ms, p99 {open_p99:.2f} ms "
              f"(all rounds pooled: p99 {_percentile(pooled, 0.99) * 1000:.2f} ms, "
              f"max {max(pooled, default=0) * 1000:.2f} ms); lag p99 = how late the generator sent, "
              "included in the latency")
        if opened_bare:
            print(f"  bare, median of rounds: p50 {statistics.median(p.pct(0.5) for p in opened_bare):.2f} ms"
                  f", p99 {statistics.median(p.pct(0.99) for p in opened_bare):.2f} ms")

    if args.profile and first:
        await profile_phase(servers, context, sequence, uids, args, med["ipguard"]["us"])
    return LoopResult(loop_factory(loop)[0], med, open_p99)


async def profile_phase(servers: dict[str, ServerHandle], context: ssl.SSLContext, sequence: list[Template],
                        uids: UidSource, args: argparse.Namespace, untimed_us: float) -> None:
    """Where ipguard's time goes: per-shape handler cost, stage timers and GC over one closed-loop phase per
    server, then one phase under cProfile."""
    ip, bare = servers["ipguard"], servers["bare"]
    print("\nprofile (--profile; the figures above ran without the stage timers used here)")
    print("  handler cost per payload shape, in ipguard's process before serving (no network; mean us per call):")
    print(f"    {'endpoint':<10} {'outcome':<15} {'parse':>6} {'handle':>7} {'dumps':>6} {'sum':>6}  shape")
    for label, path, outcome, parse_us, handle_us, dumps_us in ip.info.get("micro", []):
        print(f"    {path:<10} {outcome:<15} {parse_us:6.1f} {handle_us:7.1f} {dumps_us:6.1f} "
              f"{parse_us + handle_us + dumps_us:6.1f}  {label}")
    print(f"  ipguard's heap after the index build: {ip.info['gc_objects']:,} GC-tracked objects; a full collection "
          f"took {ip.info['gc_full_ms']:.0f} ms, and {ip.info['gc_frozen_ms']:.1f} ms once gc.freeze() moved them out "
          "of the collector's way (as `ipguard serve` does after loading, and this bench too)")

    for server in (bare, ip):
        server.ask("gc")
    ip.ask("timers-install")
    phases: dict[str, Phase] = {}
    for server in (bare, ip):
        client = Client("raw", server.port, context, args.connections)
        await client.open()
        try:
            phases[server.name] = await closed_loop(server, client, sequence, uids, args.warmup, args.duration)
        finally:
            await client.close()
    timers: dict[str, Any] = ip.ask("timers")
    stages: dict[str, tuple[float, float]] = timers["stages"]
    gc_stats = {server.name: server.ask("gc") for server in (bare, ip)}
    count = max(stages.get("_review", (0.0, 0.0))[1], 1.0)
    total_us = phases["ipguard"].server_us()
    bare_us = phases["bare"].server_us()
    overhead = float(timers["overhead_us"])
    wrapped_calls = sum(calls for _, calls in stages.values()) / count

    def us(label: str) -> float:
        return stages.get(label, (0.0, 0.0))[0] / count * 1e6

    def calls(label: str) -> float:
        return stages.get(label, (0.0, 0.0))[1] / count

    def tree(parent: str, depth: int) -> None:
        children = [label for label, _, _, up in STAGES if up == parent and label in stages]
        pad = "  " * depth
        for label in children:
            print(f"    {pad}{label:<{44 - len(pad)}} {us(label):6.1f} {calls(label):7.2f}")
            tree(label, depth + 1)
        if children:
            rest = us(parent) - sum(us(label) for label in children)
            print(f"    {pad}{'(rest of ' + parent + ')':<{44 - len(pad)}} {rest:6.1f}")

    print(f"\n  one closed-loop phase each: ipguard {phases['ipguard'].rate:.0f}/s, bare {phases['bare'].rate:.0f}/s;"
          f" server process CPU per review: ipguard {total_us:.0f} us, bare {bare_us:.0f} us "
          f"(ipguard's extra: {total_us - bare_us:.0f} us)")
    print("  ipguard by stage, per review (CPU us by thread time, and calls; a stage includes those under it):")
    print(f"    {'WebhookServer._review (the handler)':<44} {us('_review'):6.1f} {calls('_review'):7.2f}")
    tree("_review", 1)
    print(f"    {'outside _review (aiohttp, TLS, asyncio)':<44} {total_us - us('_review'):6.1f}"
          f"           (the bare server: {bare_us:.0f} us per review for everything)")
    timers_us = wrapped_calls * overhead
    print(f"    the timers themselves: {wrapped_calls:.1f} timed calls per review x {overhead:.2f} us = "
          f"{timers_us:.1f} us, inside the figures above (mostly in the parents)")
    print(f"    without timers (the rounds above: {untimed_us:.0f} us per review): _review ~"
          f"{us('_review') - timers_us:.0f} us, outside it ~{untimed_us - (us('_review') - timers_us):.0f} us "
          "(slower serving under the timers batches less, so 'outside' grows here)")
    if timers["missing"]:
        print(f"    (not timed, no longer in the code: {', '.join(timers['missing'])})")
    for name, stats in gc_stats.items():
        text = ", ".join(f"gen{g} {int(v[0])}x {v[1] * 1000:.1f} ms (max {v[2] * 1000:.2f})" for g, v in stats.items())
        print(f"  GC in {name} during that phase: {text}")

    ip.ask("profile-start")
    client = Client("raw", ip.port, context, args.connections)
    await client.open()
    try:
        profiled = await closed_loop(ip, client, sequence, uids, 0.2, min(args.duration, 3.0))
    finally:
        await client.close()
    text = ip.ask("profile-stop", 30)
    print(f"\n  cProfile of ipguard's process over {profiled.requests} reviews ({profiled.rate:.0f}/s under the "
          "profiler, which inflates small Python calls); seconds over the phase:")
    print("\n".join("    " + line for line in text.splitlines() if line.strip()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=None, help="closed-loop seconds per server per round "
                        "(default 5; --quick 1.5)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds before each closed-loop "
                        "window (default 1; --quick 0.5)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections (default 32)")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop reviews/s to ipguard (0: skip)")
    parser.add_argument("--open-duration", type=float, default=None, help="open-loop seconds per round "
                        "(default 4; --quick 1.5)")
    parser.add_argument("--open-warmup", type=float, default=None, help="open-loop warm-up (default 0.5)")
    parser.add_argument("--open-bare", action="store_true", help="also run the open loop against the bare server "
                        "(the floor: generator, TLS and event-loop wake-ups at that rate)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 500-node index, short phases, 1 round")
    parser.add_argument("--generator", choices=["auto", "wrk", "python", "aiohttp"], default="auto",
                        help="closed-loop generator: auto = wrk if on PATH, else python (lean asyncio client)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers/generator to separate CPUs")
    parser.add_argument("--log", choices=["devnull", "off"], default="devnull",
                        help="ipguard's JSON logs at info to /dev/null (as deployed, minus the pipe) or off")
    parser.add_argument("--profile", action="store_true", help="also time ipguard's stages, GC, and cProfile it")
    parser.add_argument("--answers", type=int, default=4000, help="reviews answered in-process, before serving, "
                        "by an index keeping figures between changes and by one working them out afresh, to "
                        "compare the answers (0: skip)")
    parser.add_argument("--nodes", type=int, default=None)
    parser.add_argument("--pods", type=int, default=None)
    parser.add_argument("--zones", type=int, default=6)
    parser.add_argument("--loop", nargs="+", choices=["asyncio", "uvloop"], default=None,
                        help="event loop(s) of the servers, each measured in turn (default: asyncio uvloop; "
                        "asyncio alone when uvloop is not installed)")
    args = parser.parse_args()
    if args.loop is None:
        args.loop = ["asyncio", "uvloop"] if importlib.util.find_spec("uvloop") else ["asyncio"]
    quick = args.quick
    defaults = {"duration": (5.0, 1.5), "warmup": (1.0, 0.5), "open_duration": (4.0, 1.5),
                "open_warmup": (0.5, 0.3), "rounds": (3, 1), "nodes": (5000, 500), "pods": (150_000, 15_000)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    if args.rounds < 1 or args.connections < 1 or args.duration <= 0:
        parser.error("--rounds, --connections and --duration must be positive")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
