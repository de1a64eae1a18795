"""One place for how ipguard talks to EC2: the boto3 client, the thread pool it blocks in, retries, backoff and
error classification, shared by every provider in this package.

boto3 blocks and the event loop must not, so each fetch runs in a small dedicated thread pool. The large ones
(`Ec2.fetch`: every node's ENIs, a few MB of XML per 1,000 ENIs that botocore parses in pure Python) can run in a
worker process instead, with its own boto3 client, and ship back compact figures: a thread would hold the GIL
against the event loop for seconds per refresh on a large cluster. Outcomes are
counted per call kind (`Call`); a kind that fails backs off exponentially and, while it does, is not asked at
all (`CallFailed("backoff")`), so the index keeps the last good figures. Credentials come from the standard
boto3 chain (IRSA / Pod Identity env, instance profile, ...); nothing here reads or holds them.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ReadTimeoutError,
)

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import FilterTypeDef

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]
RetryMode = Literal["standard", "adaptive", "legacy"]

# EC2 caps the values of one filter; larger id sets are asked in chunks.
FILTER_VALUES_MAX = 200
THROTTLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "SlowDown",
    }
)
DENIED_CODES = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "AuthFailure"})


class Call(enum.StrEnum):
    """A kind of EC2 call, as errors, backoff and `last_success` are tracked."""

    VPC = "vpc"  # DescribeInstances, to find the cluster's VPC
    ENIS = "enis"  # DescribeNetworkInterfaces of the nodes
    SUBNET_ENIS = "subnet_enis"  # DescribeNetworkInterfaces of the pod subnets (prefix delegation)
    SUBNETS = "subnets"  # DescribeSubnets: the pod subnets by id, and those tagged for subnet discovery
    CIDR_RESERVATIONS = "cidr_reservations"  # GetSubnetCidrReservations of the pod subnets (prefix delegation)
    INSTANCE_TYPES = "instance_types"
    SECURITY_GROUPS = "security_groups"
    CONTROL_PLANE = "control_plane"  # DescribeNetworkInterfaces `Amazon EKS <cluster>`, and their subnets


@dataclass(slots=True)
class CallStats:
    """Per call kind, for metrics and /readyz."""

    attempts: int = 0
    errors: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    consecutive_errors: int = 0
    last_success: float | None = None  # clock (monotonic) time of the last good answer
    last_error: str | None = None
    next_attempt: float = 0.0  # backing off until then


class CallFailed(Exception):
    """A call kind failed (or is backing off); the reason is already counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def classify_error(exc: BaseException) -> str:
    """A short reason for metrics: throttled, unreachable, timeout, denied, credentials, config, server, client,
    other."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in THROTTLE_CODES:
            return "throttled"
        if code in DENIED_CODES or code.startswith("UnauthorizedOperation"):
            return "denied"
        return "server" if status >= 500 else "client"
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, EndpointConnectionError | ConnectionClosedError):
        return "unreachable"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return "credentials"
    if isinstance(exc, NoRegionError):
        return "config"
    return "other"


def chunks(values: Iterable[str], size: int = FILTER_VALUES_MAX) -> Iterator[list[str]]:
    """Sorted, de-duplicated values in filter-sized chunks."""
    ordered = sorted(set(values))
    for i in range(0, len(ordered), size):
        yield ordered[i : i + size]


def vpc_filter(vpc_id: str | None) -> list[FilterTypeDef]:
    return [{"Name": "vpc-id", "Values": [vpc_id]}] if vpc_id else []


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """What makes ipguard's boto3 EC2 client: in this process, or in a worker process (picklable)."""

    region: str | None
    endpoint_url: str | None
    retry_mode: RetryMode
    max_attempts: int
    connect_timeout: float
    read_timeout: float

    def client(self, session: boto3.session.Session | None = None) -> EC2Client:
        config = Config(
            retries={"mode": self.retry_mode, "max_attempts": self.max_attempts},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            user_agent_extra="ipguard",
        )
        session = session or boto3.session.Session()
        return session.client("ec2", region_name=self.region, endpoint_url=self.endpoint_url, config=config)


_worker_client: EC2Client | None = None  # in a worker process: its own client (credentials from the same chain)


WORKER_NICENESS = 19  # where SCHED_IDLE is not available


def _start_worker(spec: ClientSpec) -> None:
    """Background work: on a shared core, the worker runs only when the event loop's process does not want
    the CPU (Linux's SCHED_IDLE, which any process may take for itself; else the lowest priority)."""
    global _worker_client
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(WORKER_NICENESS)
    _worker_client = spec.client()


def _in_worker(fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    assert _worker_client is not None, "not in an EC2 worker process"
    return fn(_worker_client, *args)


class Ec2:
    """The shared EC2 connection: one lazily created boto3 client, its thread pool, and per-kind stats; with
    `fetch_in_process`, a worker process (started on first use) for `fetch`."""

    def __init__(
        self,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        retry_mode: RetryMode = "standard",
        max_attempts: int = 3,
        connect_timeout: float = 3.0,
        read_timeout: float = 15.0,
        page_size: int = 1000,
        backoff_base: float = 30.0,
        backoff_max: float = 300.0,
        max_workers: int = 2,
        clock: Clock = time.monotonic,
        session: boto3.session.Session | None = None,
        fetch_in_process: bool = False,
    ) -> None:
        if fetch_in_process and session is not None:
            raise ValueError("a worker process makes its own boto3 session: fetch_in_process takes no session")
        self.region = region
        self.endpoint_url = endpoint_url
        self.page_size = page_size
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.clock = clock
        self._client_settings = (retry_mode, max_attempts, connect_timeout, read_timeout)
        self._session = session
        self._client: EC2Client | None = None
        self._client_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ipguard-ec2")
        self.fetch_in_process = fetch_in_process
        self._processes: ProcessPoolExecutor | None = None
        self.stats: dict[Call, CallStats] = {kind: CallStats() for kind in Call}

    @property
    def spec(self) -> ClientSpec:
        return ClientSpec(self.region, self.endpoint_url, *self._client_settings)

    @property
    def client(self) -> EC2Client:
        """The boto3 EC2 client, created on first use (blocking: call it from the thread pool or tests)."""
        with self._client_lock:
            if self._client is None:
                self._client = self.spec.client(self._session)
            return self._client

    @property
    def connected(self) -> bool:
        return self._client is not None

    def size(self, low: int, high: int) -> int:
        """The configured page size, within what the operation accepts."""
        return max(low, min(high, self.page_size))

    def due(self, kind: Call) -> bool:
        return self.clock() >= self.stats[kind].next_attempt

    def next_retry_in(self) -> float | None:
        """Seconds until the first backoff ends, if any kind is backing off."""
        now = self.clock()
        waits = [s.next_attempt - now for s in self.stats.values() if s.consecutive_errors and s.next_attempt > now]
        return min(waits) if waits else None

    async def call(self, kind: Call, fn: Callable[[], T]) -> T:
        """Run one blocking fetch in the thread pool, counting the outcome; raise CallFailed on any error."""
        return await self._run(kind, self._executor, fn)

    async def fetch(self, kind: Call, fn: Callable[..., T], *args: Any) -> T:
        """`fn(client, *args)`, blocking, where it holds the event loop least: in the worker process with its
        own client when `fetch_in_process` (fn a module-level function, args and answer picklable: let fn
        reduce what it fetched to what the caller needs), else in the thread pool with the shared client.
        Counted like `call`; raises CallFailed."""
        if not self.fetch_in_process:
            return await self._run(kind, self._executor, lambda: fn(self.client, *args))
        if self._processes is None:
            # spawn: a fork of a process running an event loop and threads is not safe.
            self._processes = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                initargs=(self.spec,),
            )  # fmt: skip
        return await self._run(kind, self._processes, functools.partial(_in_worker, fn, args))

    async def _run(self, kind: Call, executor: Executor, fn: Callable[[], T]) -> T:
        stats = self.stats[kind]
        if not self.due(kind):
            raise CallFailed("backoff")
        stats.attempts += 1
        try:
            result = await asyncio.get_running_loop().run_in_executor(executor, fn)
        except Exception as exc:
            if isinstance(exc, BrokenProcessPool) and executor is self._processes:
                self._processes = None  # the worker died (killed, out of memory): a new one next time
                executor.shutdown(wait=False, cancel_futures=True)
            reason = classify_error(exc)
            stats.errors += 1
            stats.errors_by_reason[reason] = stats.errors_by_reason.get(reason, 0) + 1
            stats.consecutive_errors += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            delay = min(self.backoff_max, self.backoff_base * 2 ** (stats.consecutive_errors - 1))
            stats.next_attempt = self.clock() + delay
            if reason == "other" and not isinstance(exc, BotoCoreError):
                log.exception("EC2 %s: unexpected error; retrying in %.0fs", kind, delay)
            else:
                log.warning(
                    "EC2 %s failed (%s, %d in a row): %s; keeping the last good data, retrying in %.0fs",
                    kind, reason, stats.consecutive_errors, exc, delay,
                )  # fmt: skip
            raise CallFailed(reason) from exc
        if stats.consecutive_errors:
            log.info("EC2 %s recovered after %d errors", kind, stats.consecutive_errors)
        stats.consecutive_errors = 0
        stats.next_attempt = 0.0
        stats.last_success = self.clock()
        return result

    def close(self) -> None:
        """Release the thread pool (a running boto3 call finishes in the background) and the worker process."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._processes is not None:
            # A worker still fetching is of no use any more, and would hold up this process's exit until its
            # call ends (Python 3.14's ProcessPoolExecutor.terminate_workers does this).
            workers: dict[int, multiprocessing.process.BaseProcess] = getattr(self._processes, "_processes", None) or {}
            for worker in list(workers.values()):
                worker.terminate()
            self._processes.shutdown(wait=False, cancel_futures=True)
            self._processes = None
