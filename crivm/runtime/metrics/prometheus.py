"""Metric families and the Prometheus text exposition format (version 0.0.4).

Small on purpose: counters, gauges and histograms keyed by label values, rendered on demand.
Everything runs on the event loop thread, so there is no locking.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; CRI calls range from sub-millisecond lookups to image pulls and VM boots.
DEFAULT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0)

LabelValues = tuple[str, ...]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Family:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)

    def _key(self, labels: Sequence[str]) -> LabelValues:
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError

    def render(self) -> str:
        return "\n".join(self.header() + self.samples()) + "\n"


class Counter(_Family):
    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self.values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def set_total(self, value: float, *labels: str) -> None:
        """For a running total that another component keeps (it must only go up)."""
        self.values[self._key(labels)] = value

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, key)} {format_value(value)}"
                for key, value in sorted(self.values.items())]


class Gauge(_Family):
    """Set wholesale at each scrape (``replace``) from the daemon's current state."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self.values: dict[LabelValues, float] = {}

    def replace(self, values: Iterable[tuple[LabelValues, float]]) -> None:
        self.values = {self._key(key): value for key, value in values}

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, key)} {format_value(value)}"
                for key, value in sorted(self.values.items())]


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = (),
                 buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, help_text, label_names)
        self.buckets = tuple(sorted(buckets))
        # label values -> (per-bucket counts, sum, count); +Inf is the total count.
        self.series: dict[LabelValues, tuple[list[int], float, int]] = {}

    def observe(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        counts, total, count = self.series.get(key, ([0] * len(self.buckets), 0.0, 0))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        self.series[key] = (counts, total + value, count + 1)

    def samples(self) -> list[str]:
        lines = []
        for key, (counts, total, count) in sorted(self.series.items()):
            for bound, bucket_count in zip(self.buckets, counts, strict=True):
                le = f'le="{format_value(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} "
                             f"{bucket_count}")
            inf = _labels(self.label_names, key, 'le="+Inf"')
            lines.append(f"{self.name}_bucket{inf} {count}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {format_value(total)}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {count}")
        return lines


def render(families: Iterable[_Family]) -> str:
    return "".join(family.render() for family in families)
