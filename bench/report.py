"""Summaries of the samples: median and p90 per operation and runtime, as Markdown and JSON."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RUNTIMES = ("crivm", "containerd")


@dataclass(frozen=True)
class Summary:
    count: int
    median_ms: float
    p90_ms: float

    @staticmethod
    def of(samples_s: Sequence[float]) -> Summary | None:
        if not samples_s:
            return None
        ordered = sorted(samples_s)
        # Nearest-rank p90: a value that was actually measured.
        p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]
        return Summary(len(ordered), statistics.median(ordered) * 1000, p90 * 1000)


def summarize(samples: Mapping[str, Mapping[str, Sequence[float]]],
              order: Sequence[str]) -> dict[str, dict[str, Summary | None]]:
    """{op: {runtime: Summary}} for the ops in ``order`` that any runtime measured."""
    table: dict[str, dict[str, Summary | None]] = {}
    for op in order:
        row = {rt: Summary.of(samples.get(rt, {}).get(op, [])) for rt in RUNTIMES}
        if any(row.values()):
            table[op] = row
    return table


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _ratio(crivm: float, containerd: float) -> str:
    return f"{crivm / containerd:.2f}" if containerd > 0 else "-"


def latency_markdown(table: Mapping[str, Mapping[str, Summary | None]]) -> str:
    lines = [
        "| operation | n | crivm median ms | crivm p90 ms | containerd median ms "
        "| containerd p90 ms | ratio median | ratio p90 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for op, row in table.items():
        mine, theirs = row["crivm"], row["containerd"]
        cells = [op, str(mine.count if mine else theirs.count if theirs else 0)]
        for summary in (mine, theirs):
            cells += [_ms(summary.median_ms), _ms(summary.p90_ms)] if summary else ["-", "-"]
        if mine and theirs:
            cells += [_ratio(mine.median_ms, theirs.median_ms),
                      _ratio(mine.p90_ms, theirs.p90_ms)]
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def memory_markdown(memory: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """memory[state][runtime] = {"daemon_rss_kib", "daemon_pss_kib", "helpers": {...}}."""
    lines = [
        "| state | crivm daemon RSS MiB | containerd daemon RSS MiB | ratio "
        "| crivm helpers (n, PSS MiB) | containerd helpers (n, PSS MiB) |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for state, by_runtime in memory.items():
        mine, theirs = by_runtime.get("crivm"), by_runtime.get("containerd")
        if mine is None or theirs is None:
            continue
        rss_mine = mine["daemon_rss_kib"] / 1024
        rss_theirs = theirs["daemon_rss_kib"] / 1024
        lines.append(
            f"| {state} | {rss_mine:.1f} | {rss_theirs:.1f} | {_ratio(rss_mine, rss_theirs)} "
            f"| {_helpers(mine)} | {_helpers(theirs)} |"
        )
    return "\n".join(lines) + "\n"


def _helpers(entry: Mapping[str, Any]) -> str:
    parts = []
    for name, group in entry["helpers"].items():
        parts.append(f"{group['count']} {name}, {group['pss_kib'] / 1024:.1f}")
    return "; ".join(parts) or "none"


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    def default(value: object) -> object:
        if isinstance(value, Summary):
            return asdict(value)
        raise TypeError(f"cannot encode {type(value).__name__}")

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=default) + "\n")
