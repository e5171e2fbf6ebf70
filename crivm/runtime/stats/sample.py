"""What a backend measures about a container or a pod: raw counters at one instant.

Backends fill in what they can read and leave the rest ``None`` ("not known"), which the CRI
layer turns into unset fields rather than zeros: kubelet treats a zero working set as real.
Rates (nano-cores) are not here; the CRI layer derives them from successive samples.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InterfaceSample:
    name: str
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int


@dataclass(frozen=True)
class ResourceSample:
    timestamp_ns: int
    # CPU time used since the cgroup was made, summed over all cores.
    cpu_usage_ns: int | None = None
    memory_usage_bytes: int | None = None
    # Usage minus inactive file cache: what kubelet evicts on.
    memory_working_set_bytes: int | None = None
    memory_rss_bytes: int | None = None
    # None when there is no limit.
    memory_limit_bytes: int | None = None
    page_faults: int | None = None
    major_page_faults: int | None = None
    swap_usage_bytes: int | None = None
    process_count: int | None = None
    # Network counters, when the sample's source sees the interfaces (a VM's guest).
    interfaces: tuple[InterfaceSample, ...] = ()
