"""ipguard's metrics, exposed by prometheus-client: counters, histograms and gauges read at scrape time.

The request path only adds to dict entries (no lock, no per-call object: the server runs on one event loop);
prometheus-client turns them into the exposition format on scrape, as custom collectors, beside its own
process (CPU, memory, file descriptors), platform and Python GC collectors. Figures that live in the sources
(watch events, EC2 errors, the index's headroom) are read from them on scrape by a callback rather than copied
on every change; a callback figure named ``*_total`` is a monotonic count and is exposed as a counter.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

LabelValues = tuple[str, ...]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, labels
        self.values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.help, labels=self.label_names)
        for labels, value in sorted(self.values.items()):
            family.add_metric(list(labels), value)
        yield family


class Histogram:
    def __init__(
        self, name: str, help_text: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = LATENCY_BUCKETS
    ) -> None:
        self.name, self.help, self.label_names, self.buckets = name, help_text, labels, buckets
        self.counts: dict[LabelValues, list[int]] = {}
        self.sums: dict[LabelValues, float] = {}

    def observe(self, value: float, *labels: str) -> None:
        counts = self.counts.get(labels)
        if counts is None:
            counts = self.counts[labels] = [0] * (len(self.buckets) + 1)
            self.sums[labels] = 0.0
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[labels] += value

    def count(self, *labels: str) -> int:
        return sum(self.counts.get(labels, ()))

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.help, labels=self.label_names)
        bounds = [*(repr(float(b)) for b in self.buckets), "+Inf"]
        for labels, counts in sorted(self.counts.items()):
            running, cumulative = 0, []
            for bound, n in zip(bounds, counts, strict=True):
                running += n
                cumulative.append((bound, float(running)))
            family.add_metric(list(labels), cumulative, self.sums[labels])
        yield family


class Gauge:
    """Values set directly, or read from a callback at scrape time (so they are never out of date)."""

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = (),
        collect: Callable[[], Iterable[tuple[LabelValues, float]]] | None = None,
    ) -> None:
        self.name, self.help, self.label_names, self.read = name, help_text, labels, collect
        self.values: dict[LabelValues, float] = {}

    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = value

    def collect(self) -> Iterator[Metric]:
        family: Metric
        if self.name.endswith("_total"):
            family = CounterMetricFamily(self.name, self.help, labels=self.label_names)
        else:
            family = GaugeMetricFamily(self.name, self.help, labels=self.label_names)
        items = dict(self.values)
        if self.read is not None:
            items.update(self.read())
        for labels, value in sorted(items.items()):
            family.add_metric(list(labels), value)
        yield family


M = TypeVar("M", Counter, Gauge, Histogram)


class Registry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.metrics: list[Counter | Gauge | Histogram] = []

    def add(self, metric: M) -> M:
        self.registry.register(metric)
        self.metrics.append(metric)
        return metric

    def render(self) -> bytes:
        """The Prometheus text exposition format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
