"""CRI LinuxContainerResources → the OCI ``linux.resources`` object, for cgroup v1 (cgroupfs).

Pure functions; what the host can do (swap accounting, hugetlb, the lowest oom_score_adj we
may set) arrives as ``ResourceHost``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from crivm.proto import api_pb2

log = logging.getLogger(__name__)

OOM_SCORE_ADJ_MIN = -1000
OOM_SCORE_ADJ_MAX = 1000


@dataclass(frozen=True)
class ResourceHost:
    # memory.memsw.* exist (swapaccount=1); without it a swap limit cannot be written.
    swap_accounting: bool = False
    # The hugetlb controller is mounted.
    hugetlb: bool = False
    # Without CAP_SYS_RESOURCE a process may not lower oom_score_adj below its own value.
    oom_score_adj_floor: int = OOM_SCORE_ADJ_MIN


def clamp_oom_score_adj(value: int, host: ResourceHost) -> int:
    return max(host.oom_score_adj_floor, OOM_SCORE_ADJ_MIN, min(OOM_SCORE_ADJ_MAX, value))


def resources_section(
    resources: api_pb2.LinuxContainerResources, host: ResourceHost
) -> dict[str, Any]:
    """Only fields the request sets appear, so runc leaves the rest at the cgroup defaults."""
    section: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    if resources.cpu_shares:
        cpu["shares"] = resources.cpu_shares
    if resources.cpu_quota:
        cpu["quota"] = resources.cpu_quota
    if resources.cpu_period:
        cpu["period"] = resources.cpu_period
    if resources.cpuset_cpus:
        cpu["cpus"] = resources.cpuset_cpus
    if resources.cpuset_mems:
        cpu["mems"] = resources.cpuset_mems
    if cpu:
        section["cpu"] = cpu

    memory: dict[str, Any] = {}
    if resources.memory_limit_in_bytes:
        memory["limit"] = resources.memory_limit_in_bytes
        if host.swap_accounting:
            # No swap unless the request grants it: swap limit = memory + swap.
            memory["swap"] = resources.memory_swap_limit_in_bytes or resources.memory_limit_in_bytes
    if memory:
        section["memory"] = memory

    pids_max = resources.unified.get("pids.max", "")
    if pids_max.isdigit():
        section["pids"] = {"limit": int(pids_max)}

    if resources.hugepage_limits:
        if host.hugetlb:
            section["hugepageLimits"] = [
                {"pageSize": h.page_size, "limit": h.limit} for h in resources.hugepage_limits
            ]
        else:
            log.warning("hugepage limits requested but the hugetlb cgroup is not mounted")
    return section
