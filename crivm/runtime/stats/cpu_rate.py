"""Nano-cores from cumulative CPU time: the slope between two samples of the same object.

Each object (container or pod id) keeps one reference sample. A new reading is compared with
it; the reference moves forward only once it is ``window_ns`` old, so calls that come in
quick succession (kubelet's summary plus a crictl) still measure over a useful interval
instead of over a few milliseconds of noise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_WINDOW_NS = 1_000_000_000


@dataclass(frozen=True)
class _Reference:
    timestamp_ns: int
    usage_ns: int


class CpuRates:
    def __init__(self, window_ns: int = DEFAULT_WINDOW_NS) -> None:
        self._window_ns = window_ns
        self._references: dict[str, _Reference] = {}

    def nano_cores(
        self, key: str, timestamp_ns: int, usage_ns: int, started_ns: int = 0
    ) -> int | None:
        """Cores used (x1e9) since the reference sample of ``key``.

        With no earlier sample, the average since ``started_ns`` (when the object began to
        use CPU) stands in; with neither, the rate is unknown (None). A counter that went
        backwards (the cgroup was recreated) restarts the reference.
        """
        current = _Reference(timestamp_ns, usage_ns)
        reference = self._references.get(key)
        if reference is None or usage_ns < reference.usage_ns:
            self._references[key] = current
            if started_ns and timestamp_ns > started_ns:
                return usage_ns * 1_000_000_000 // (timestamp_ns - started_ns)
            return None
        if timestamp_ns - reference.timestamp_ns >= self._window_ns:
            self._references[key] = current
        elapsed = timestamp_ns - reference.timestamp_ns
        if elapsed <= 0:
            return None
        return (usage_ns - reference.usage_ns) * 1_000_000_000 // elapsed

    def retain(self, keys: Iterable[str]) -> None:
        """Forget every object not in ``keys`` (removed containers and pods)."""
        keep = set(keys)
        for key in [k for k in self._references if k not in keep]:
            del self._references[key]
