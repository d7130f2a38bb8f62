"""A server's Prometheus page, read with prometheus_client's parser: histogram totals, bucket counts, counters."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def families(url: str) -> list:
    return list(text_string_to_metric_families(httpx.get(url, timeout=10).text))


def histogram_totals(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of every histogram on the page, over all its label sets."""
    totals: dict[str, list[float]] = {}
    for family in families(url):
        if family.type != "histogram":
            continue
        entry = totals.setdefault(family.name, [0.0, 0.0])
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                entry[0] += sample.value
            elif sample.name.endswith("_count"):
                entry[1] += sample.value
    return {name: (s, c) for name, (s, c) in totals.items()}


def buckets(url: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts of histogram `name`: upper bound (seconds) -> observations at or below it."""
    counts: dict[float, float] = {}
    for family in families(url):
        if family.name == name:
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    counts[bound] = counts.get(bound, 0.0) + sample.value
    return counts


def _counter_samples(url: str):
    for family in families(url):
        if family.type == "counter":
            yield from (sample for sample in family.samples if sample.name.endswith("_total"))


def counters(url: str) -> dict[str, float]:
    """Every counter's total over its label sets, by sample name (`dvd_vision_images_total`)."""
    totals: dict[str, float] = {}
    for sample in _counter_samples(url):
        totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def counter_by(url: str, name: str, label: str) -> dict[str, float]:
    """Counter `name` (its sample name, `..._total`) by the value of `label`: `{"compressed": 12.0, "full": 30.0}`."""
    totals: dict[str, float] = {}
    for sample in _counter_samples(url):
        if sample.name == name:
            totals[sample.labels[label]] = totals.get(sample.labels[label], 0.0) + sample.value
    return totals
