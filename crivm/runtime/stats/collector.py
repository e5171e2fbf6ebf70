"""The daemon's "stats" component: CRI ContainerStats and PodSandboxStats for any backend.

The backend measures (``container_stats``/``sandbox_stats``: cgroups for runc, the agent and
the VMM for a VM pod); this layer adds what is the same for every backend: nano-cores from
successive samples, the writable layer (the container's overlay upper dir on the host) and
the pod's network counters, read inside its netns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from crivm.errors import CrivmError
from crivm.proto import api_pb2
from crivm.runtime.backend import CONTAINER_EXITED, POD_READY
from crivm.runtime.cri_messages import container_config, pod_config
from crivm.runtime.records import backend_of
from crivm.runtime.stats import cri_stats
from crivm.runtime.stats.cpu_rate import CpuRates
from crivm.runtime.stats.netdev import netns_interfaces
from crivm.runtime.stats.sample import InterfaceSample, ResourceSample
from crivm.storage import rootfs as rootfs_layout
from crivm.storage.disk_usage import measure
from crivm.storage.service import ImageService

if TYPE_CHECKING:
    from crivm.runtime.daemon import Daemon
    from crivm.runtime.store import ContainerRecord, PodRecord

log = logging.getLogger(__name__)


class StatsCollector:
    def __init__(self) -> None:
        self.rates = CpuRates()

    async def container_stats(
        self, daemon: Daemon, pod: PodRecord, ctr: ContainerRecord
    ) -> api_pb2.ContainerStats:
        config = container_config(ctr)
        stats = api_pb2.ContainerStats(attributes=api_pb2.ContainerAttributes(
            id=ctr.id, metadata=config.metadata, labels=dict(config.labels),
            annotations=dict(config.annotations),
        ))
        # An exited container uses no CPU or memory; its leftover cgroup (until removal)
        # holds only page cache.
        sample = None
        if ctr.state != CONTAINER_EXITED:
            sample = await backend_of(daemon, pod).container_stats(pod, ctr)
        if sample is not None:
            stats.cpu.CopyFrom(cri_stats.cpu_usage(sample, self._nano_cores(
                ctr.id, sample, ctr.started_at)))
            stats.memory.CopyFrom(cri_stats.memory_usage(sample))
            if sample.swap_usage_bytes is not None:
                stats.swap.CopyFrom(cri_stats.swap_usage(sample))
        writable = await _writable_layer(daemon, ctr.id)
        if writable is not None:
            stats.writable_layer.CopyFrom(writable)
        return stats

    async def pod_stats(self, daemon: Daemon, pod: PodRecord) -> api_pb2.PodSandboxStats:
        config = pod_config(pod)
        stats = api_pb2.PodSandboxStats(attributes=api_pb2.PodSandboxAttributes(
            id=pod.id, metadata=config.metadata, labels=dict(config.labels),
            annotations=dict(config.annotations),
        ))
        linux = stats.linux
        sample = None
        if pod.state == POD_READY:
            sample = await backend_of(daemon, pod).sandbox_stats(pod)
        if sample is not None:
            linux.cpu.CopyFrom(cri_stats.cpu_usage(sample, self._nano_cores(
                pod.id, sample, pod.created_at)))
            linux.memory.CopyFrom(cri_stats.memory_usage(sample))
            linux.process.CopyFrom(cri_stats.process_usage(sample))
        interfaces = await _pod_interfaces(pod, sample)
        if interfaces:
            timestamp = sample.timestamp_ns if sample is not None else time.time_ns()
            linux.network.CopyFrom(cri_stats.network_usage(timestamp, interfaces))
        containers = daemon.store.list_containers(pod.id)
        linux.containers.extend(await asyncio.gather(
            *(self.container_stats(daemon, pod, ctr) for ctr in containers)
        ))
        return stats

    def prune(self, daemon: Daemon) -> None:
        """Forget the CPU references of pods and containers that no longer exist."""
        ids = [pod.id for pod in daemon.store.list_pods()]
        ids += [ctr.id for ctr in daemon.store.list_containers()]
        self.rates.retain(ids)

    def _nano_cores(self, key: str, sample: ResourceSample, started_ns: int) -> int | None:
        if sample.cpu_usage_ns is None:
            return None
        return self.rates.nano_cores(key, sample.timestamp_ns, sample.cpu_usage_ns, started_ns)


async def _writable_layer(daemon: Daemon, container_id: str) -> api_pb2.FilesystemUsage | None:
    images = daemon.components.get("images")
    if not isinstance(images, ImageService):
        return None
    # The upper dir is what the container wrote; the label matches ImageFsInfo's container
    # filesystem so kubelet attributes the bytes to the right filesystem.
    upper = rootfs_layout.container_dir(images.containers_dir, container_id) / "upper"
    if not upper.is_dir():
        return None
    usage = await asyncio.to_thread(measure, images.containers_dir, [upper])
    return cri_stats.filesystem_usage(
        usage.timestamp_ns, usage.mountpoint, usage.used_bytes, usage.inodes_used
    )


async def _pod_interfaces(
    pod: PodRecord, sample: ResourceSample | None
) -> tuple[InterfaceSample, ...]:
    """The pod netns' interfaces as the host sees them; a backend's own view (a VM guest's)
    when the pod has no netns of its own."""
    netns_path = str(pod.extra.get("netns_path") or "")
    if netns_path and pod.state == POD_READY:
        try:
            return await netns_interfaces(netns_path)
        except CrivmError as exc:
            log.info("no network stats for pod %s: %s", pod.id, exc, extra={"pod_id": pod.id})
    return sample.interfaces if sample is not None else ()


def collector_of(daemon: Daemon) -> StatsCollector:
    collector: StatsCollector = daemon.component("stats")
    return collector


async def open_component(daemon: Daemon) -> StatsCollector:
    """The daemon's opener for the "stats" component (see crivm.runtime.daemon)."""
    return StatsCollector()
