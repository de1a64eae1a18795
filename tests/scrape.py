"""Reading a /metrics page as Prometheus does (prometheus-client's own parser), not by text matching."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample on the page: (sample name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample, or None when the page does not have it."""
    return samples(text).get((name, frozenset(labels.items())))


def families(text: str) -> dict[str, str]:
    """Metric family name -> type, for every family on the page (with or without samples)."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}
