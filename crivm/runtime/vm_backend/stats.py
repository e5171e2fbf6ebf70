"""Stats of VM pods: containers as the guest's agent measures them, the pod as the host sees
its VM (the supervisor, QEMU and virtiofsd processes)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from crivm.errors import CrivmError
from crivm.proto import agent_pb2
from crivm.runtime.stats.sample import InterfaceSample, ResourceSample
from crivm.runtime.vm_backend.agent_client import AgentClient
from crivm.runtime.vm_backend.sandbox import supervisor_pid
from crivm.shim.vm_spec import PodPaths

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 10.0
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def sample_from_agent(reply: agent_pb2.StatsContainerResponse) -> ResourceSample:
    memory = reply.memory
    return ResourceSample(
        timestamp_ns=reply.timestamp_ns or time.time_ns(),
        cpu_usage_ns=reply.cpu.usage_ns if reply.HasField("cpu") else None,
        memory_usage_bytes=memory.usage_bytes if reply.HasField("memory") else None,
        memory_working_set_bytes=memory.working_set_bytes if reply.HasField("memory") else None,
        memory_rss_bytes=memory.rss_bytes if reply.HasField("memory") else None,
        memory_limit_bytes=memory.limit_bytes or None,
        process_count=reply.pids.current if reply.HasField("pids") else None,
        interfaces=tuple(
            InterfaceSample(net.interface, net.rx_bytes, net.rx_errors, net.tx_bytes,
                            net.tx_errors)
            for net in reply.network
        ),
    )


async def container_sample(paths: PodPaths, container_id: str) -> ResourceSample | None:
    """The guest's counters for the container; None when the VM does not answer."""
    try:
        async with AgentClient(paths.mux_socket, call_timeout=STATS_TIMEOUT_S,
                               connect_timeout=2.0) as agent:
            reply = await agent.stats_container(container_id)
    except CrivmError as exc:
        log.debug("no stats for container %s: %s", container_id, exc)
        return None
    return sample_from_agent(reply)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (through every thread's children)."""
    found = [pid]
    for current in found:
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
            except OSError:
                continue
            found.extend(int(child) for child in children)
    return found


def _process_usage(pid: int) -> tuple[int, int]:
    """(CPU ns, RSS bytes) of one process, 0s when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0, 0
    # Fields after the command name, which may hold spaces and ends at the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks * 1_000_000_000 // _TICKS, int(statm[1]) * _PAGE


def _host_sample(paths: PodPaths) -> ResourceSample | None:
    pid = supervisor_pid(paths)
    if not pid:
        return None
    cpu = rss = 0
    pids = process_tree(pid)
    for each in pids:
        used_cpu, used_rss = _process_usage(each)
        cpu += used_cpu
        rss += used_rss
    return ResourceSample(timestamp_ns=time.time_ns(), cpu_usage_ns=cpu,
                          memory_usage_bytes=rss, memory_working_set_bytes=rss,
                          memory_rss_bytes=rss, process_count=len(pids))


async def vm_host_sample(paths: PodPaths) -> ResourceSample | None:
    return await asyncio.to_thread(_host_sample, paths)
