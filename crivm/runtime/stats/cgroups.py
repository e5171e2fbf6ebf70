"""Resource counters read from a cgroup, for both cgroup versions.

``read_cgroup(path)`` takes a cgroupfs path relative to the hierarchy root (what runc's
``cgroupsPath`` names, e.g. ``/crivm/pod-<id>/crivm-<ctr>``) and reads it from whichever
layout the host mounts: the v1 controllers (``cpuacct``, ``memory``, ``pids`` as separate
hierarchies) or the v2 unified tree. A controller that is not mounted, or a file the kernel
does not offer, leaves its fields ``None``; a cgroup that does not exist at all gives ``None``.

Figures are hierarchical (the v1 ``total_*`` keys; v2 is hierarchical by design), so a pod's
cgroup counts every container in it.
"""

from __future__ import annotations

import os
import time

from crivm.runtime.stats.sample import ResourceSample

CGROUP_ROOT = "/sys/fs/cgroup"

# cgroup v1 reports "no limit" as the largest page-aligned int64, not as a marker.
_V1_UNLIMITED = 1 << 62


def cgroup_version(root: str = CGROUP_ROOT) -> int:
    """2 when ``root`` is a unified (v2) mount, else 1 (v1 or hybrid)."""
    return 2 if os.path.exists(os.path.join(root, "cgroup.controllers")) else 1


def read_cgroup(path: str, root: str = CGROUP_ROOT) -> ResourceSample | None:
    if cgroup_version(root) == 2:
        return read_v2(os.path.join(root, path.lstrip("/")))
    return read_v1(root, path)


def read_v1(root: str, path: str) -> ResourceSample | None:
    relative = path.lstrip("/")
    cpu_dir = os.path.join(root, "cpuacct", relative)
    memory_dir = os.path.join(root, "memory", relative)
    pids_dir = os.path.join(root, "pids", relative)
    if not (os.path.isdir(cpu_dir) or os.path.isdir(memory_dir)):
        return None
    timestamp = time.time_ns()
    memory = _keyed(os.path.join(memory_dir, "memory.stat"))
    usage = _number(os.path.join(memory_dir, "memory.usage_in_bytes"))
    limit = _number(os.path.join(memory_dir, "memory.limit_in_bytes"))
    with_swap = _number(os.path.join(memory_dir, "memory.memsw.usage_in_bytes"))
    return ResourceSample(
        timestamp_ns=timestamp,
        cpu_usage_ns=_number(os.path.join(cpu_dir, "cpuacct.usage")),
        memory_usage_bytes=usage,
        memory_working_set_bytes=_working_set(usage, memory.get("total_inactive_file")),
        memory_rss_bytes=memory.get("total_rss"),
        memory_limit_bytes=None if limit is None or limit >= _V1_UNLIMITED else limit,
        page_faults=memory.get("total_pgfault"),
        major_page_faults=memory.get("total_pgmajfault"),
        swap_usage_bytes=(
            max(with_swap - usage, 0) if with_swap is not None and usage is not None else None
        ),
        process_count=_number(os.path.join(pids_dir, "pids.current")),
    )


def read_v2(directory: str) -> ResourceSample | None:
    if not os.path.isdir(directory):
        return None
    timestamp = time.time_ns()
    cpu = _keyed(os.path.join(directory, "cpu.stat"))
    memory = _keyed(os.path.join(directory, "memory.stat"))
    usage = _number(os.path.join(directory, "memory.current"))
    usage_usec = cpu.get("usage_usec")
    return ResourceSample(
        timestamp_ns=timestamp,
        cpu_usage_ns=usage_usec * 1000 if usage_usec is not None else None,
        memory_usage_bytes=usage,
        memory_working_set_bytes=_working_set(usage, memory.get("inactive_file")),
        memory_rss_bytes=memory.get("anon"),
        # "max" (no limit) reads as None.
        memory_limit_bytes=_number(os.path.join(directory, "memory.max")),
        page_faults=memory.get("pgfault"),
        major_page_faults=memory.get("pgmajfault"),
        swap_usage_bytes=_number(os.path.join(directory, "memory.swap.current")),
        process_count=_number(os.path.join(directory, "pids.current")),
    )


def _working_set(usage: int | None, inactive_file: int | None) -> int | None:
    if usage is None:
        return None
    return max(usage - (inactive_file or 0), 0)


def _number(path: str) -> int | None:
    """The integer in a one-value cgroup file; None for "max" or a file that is not there."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() else None


def _keyed(path: str) -> dict[str, int]:
    """A flat-keyed cgroup file ("key value" per line) as a dict; {} when absent."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    values = {}
    for line in lines:
        key, _, value = line.partition(" ")
        value = value.strip()
        if value.isdigit():
            values[key] = int(value)
    return values
