"""Container stats read straight from the guest's cgroup files and /proc/net/dev.

runc puts each container in the cgroup the agent names (crivm.agent.containers.CGROUP_PARENT),
so the agent knows where to read without asking runc. Both hierarchies are handled: the guest
kernel decides which one the init mounts.
"""

from __future__ import annotations

import os
import time

from crivm.agent.errors import NotFound
from crivm.proto import agent_pb2

CGROUP_ROOT = "/sys/fs/cgroup"

# cgroup v1 reports "no limit" as the largest page-aligned int64, not as a marker.
_V1_UNLIMITED = 1 << 62
# cpuacct.stat counts in USER_HZ ticks.
_NS_PER_TICK = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def cgroup_version(root: str = CGROUP_ROOT) -> int:
    return 2 if os.path.exists(os.path.join(root, "cgroup.controllers")) else 1


def container_stats(cgroup_path: str, root: str = CGROUP_ROOT) -> agent_pb2.StatsContainerResponse:
    relative = cgroup_path.lstrip("/")
    if cgroup_version(root) == 2:
        stats = _v2_stats(os.path.join(root, relative))
    else:
        stats = _v1_stats(root, relative)
    stats.timestamp_ns = time.time_ns()
    stats.network.extend(network_stats())
    return stats


def oom_killed(cgroup_path: str, root: str = CGROUP_ROOT) -> bool:
    """Whether the OOM killer has killed a process in the cgroup since it was made.

    The cgroup outlives its processes until runc deletes the container, so this still answers
    after the init process exited. Kernels before 4.13 (v1) lack the counter: False."""
    relative = cgroup_path.lstrip("/")
    if cgroup_version(root) == 2:
        events = _keyed(os.path.join(root, relative, "memory.events"))
    else:
        events = _keyed(os.path.join(root, "memory", relative, "memory.oom_control"))
    return events.get("oom_kill", 0) > 0


def network_stats(proc_net_dev: str = "/proc/net/dev") -> list[agent_pb2.NetworkStats]:
    """Counters of every interface but loopback. Containers share the guest's network."""
    result = []
    with open(proc_net_dev) as f:
        lines = f.read().splitlines()[2:]
    for line in lines:
        name, _, counters = line.partition(":")
        name = name.strip()
        if name == "lo" or not counters:
            continue
        v = [int(x) for x in counters.split()]
        result.append(
            agent_pb2.NetworkStats(
                interface=name,
                rx_bytes=v[0], rx_packets=v[1], rx_errors=v[2], rx_dropped=v[3],
                tx_bytes=v[8], tx_packets=v[9], tx_errors=v[10], tx_dropped=v[11],
            )
        )  # fmt: skip
    return result


def _v2_stats(directory: str) -> agent_pb2.StatsContainerResponse:
    if not os.path.isdir(directory):
        raise NotFound(f"cgroup {directory} does not exist")
    cpu = _keyed(os.path.join(directory, "cpu.stat"))
    memory = _keyed(os.path.join(directory, "memory.stat"))
    usage = _number(os.path.join(directory, "memory.current"))
    return agent_pb2.StatsContainerResponse(
        cpu=agent_pb2.CpuStats(
            usage_ns=cpu.get("usage_usec", 0) * 1000,
            user_ns=cpu.get("user_usec", 0) * 1000,
            system_ns=cpu.get("system_usec", 0) * 1000,
        ),
        memory=agent_pb2.MemoryStats(
            usage_bytes=usage,
            working_set_bytes=max(usage - memory.get("inactive_file", 0), 0),
            rss_bytes=memory.get("anon", 0),
            limit_bytes=_number(os.path.join(directory, "memory.max")),
        ),
        pids=agent_pb2.PidsStats(
            current=_number(os.path.join(directory, "pids.current")),
            limit=_number(os.path.join(directory, "pids.max")),
        ),
    )


def _v1_stats(root: str, relative: str) -> agent_pb2.StatsContainerResponse:
    memory_dir = os.path.join(root, "memory", relative)
    if not os.path.isdir(memory_dir):
        raise NotFound(f"cgroup {memory_dir} does not exist")
    cpu_dir = os.path.join(root, "cpuacct", relative)
    ticks = _keyed(os.path.join(cpu_dir, "cpuacct.stat"))
    memory = _keyed(os.path.join(memory_dir, "memory.stat"))
    usage = _number(os.path.join(memory_dir, "memory.usage_in_bytes"))
    limit = _number(os.path.join(memory_dir, "memory.limit_in_bytes"))
    pids_dir = os.path.join(root, "pids", relative)
    return agent_pb2.StatsContainerResponse(
        cpu=agent_pb2.CpuStats(
            usage_ns=_number(os.path.join(cpu_dir, "cpuacct.usage")),
            user_ns=ticks.get("user", 0) * _NS_PER_TICK,
            system_ns=ticks.get("system", 0) * _NS_PER_TICK,
        ),
        memory=agent_pb2.MemoryStats(
            usage_bytes=usage,
            working_set_bytes=max(usage - memory.get("total_inactive_file", 0), 0),
            rss_bytes=memory.get("total_rss", 0),
            limit_bytes=0 if limit >= _V1_UNLIMITED else limit,
        ),
        pids=agent_pb2.PidsStats(
            current=_number(os.path.join(pids_dir, "pids.current")),
            limit=_number(os.path.join(pids_dir, "pids.max")),
        ),
    )


def _number(path: str) -> int:
    """The integer in a one-value cgroup file; 0 for "max" or a missing controller."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return 0
    return int(text) if text.isdigit() else 0


def _keyed(path: str) -> dict[str, int]:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return {}
    values = {}
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values
