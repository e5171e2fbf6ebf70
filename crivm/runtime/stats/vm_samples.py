"""Samples for VM pods: the guest's figures from the agent, and the VMM's host usage.

The vm backend implements the two stats methods of ``RuntimeBackend`` with these:

- ``container_stats``: ``from_agent(await agent.stats_container(container_id))``: the
  container's own cgroup inside the guest (CPU, memory, pids) and the guest's interfaces;
- ``sandbox_stats``: ``processes_sample(pids)`` over the pod's host processes (QEMU,
  virtiofsd, the shims): what the pod really costs the node, guest kernel and page cache
  included, which the guest's own numbers cannot show.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from crivm.proto import agent_pb2
from crivm.runtime.stats.sample import InterfaceSample, ResourceSample

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_NS_PER_TICK = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def from_agent(reply: agent_pb2.StatsContainerResponse) -> ResourceSample:
    memory = reply.memory
    # The agent cannot tell "0" from "unknown" for memory; a live container always uses some,
    # so 0 means the guest has no memory controller.
    known = memory.usage_bytes > 0
    return ResourceSample(
        timestamp_ns=reply.timestamp_ns or time.time_ns(),
        cpu_usage_ns=reply.cpu.usage_ns if reply.HasField("cpu") else None,
        memory_usage_bytes=memory.usage_bytes if known else None,
        memory_working_set_bytes=memory.working_set_bytes if known else None,
        memory_rss_bytes=memory.rss_bytes if known else None,
        memory_limit_bytes=memory.limit_bytes or None,
        process_count=reply.pids.current if reply.HasField("pids") else None,
        interfaces=tuple(
            InterfaceSample(name=n.interface, rx_bytes=n.rx_bytes, rx_errors=n.rx_errors,
                            tx_bytes=n.tx_bytes, tx_errors=n.tx_errors)
            for n in reply.network
        ),
    )


def _process_counters(pid: int) -> tuple[int, int, int, int] | None:
    """(cpu ns, resident bytes, minor faults, major faults) of a process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses; the rest follows the last ")".
    fields = text.rsplit(")", 1)[1].split()
    minor, major = int(fields[7]), int(fields[9])
    cpu_ticks = int(fields[11]) + int(fields[12])
    resident = int(fields[21]) * _PAGE_SIZE
    return cpu_ticks * _NS_PER_TICK, resident, minor, major


def processes_sample(pids: Iterable[int]) -> ResourceSample | None:
    """The summed usage of host processes; None when none of them runs any more."""
    timestamp = time.time_ns()
    totals = [0, 0, 0, 0]
    alive = 0
    for pid in pids:
        counters = _process_counters(pid)
        if counters is None:
            continue
        alive += 1
        totals = [a + b for a, b in zip(totals, counters, strict=True)]
    if not alive:
        return None
    cpu_ns, resident, minor, major = totals
    return ResourceSample(
        timestamp_ns=timestamp,
        cpu_usage_ns=cpu_ns,
        # Without a cgroup of its own there is no page cache to subtract: resident is all.
        memory_usage_bytes=resident,
        memory_working_set_bytes=resident,
        memory_rss_bytes=resident,
        page_faults=minor + major,
        major_page_faults=major,
        process_count=alive,
    )
