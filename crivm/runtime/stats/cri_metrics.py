"""cAdvisor-style metrics for ListMetricDescriptors and ListPodSandboxMetrics.

kubelet (with PodAndContainerStatsFromCRI) serves these under /metrics/cadvisor, adding its
own pod/namespace/container labels; the names and label keys follow cAdvisor's so dashboards
keep working. Every value is derived from the same PodSandboxStats that PodSandboxStats
answers, so the two never disagree. CRI metric values are integers: CPU seconds are whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from crivm.proto import api_pb2

BASE_LABELS = ("id", "name", "image")

COUNTER = api_pb2.COUNTER
GAUGE = api_pb2.GAUGE


@dataclass(frozen=True)
class Descriptor:
    name: str
    help: str
    extra_labels: tuple[str, ...] = ()
    metric_type: int = GAUGE

    @property
    def label_keys(self) -> tuple[str, ...]:
        return BASE_LABELS + self.extra_labels

    def message(self) -> api_pb2.MetricDescriptor:
        return api_pb2.MetricDescriptor(name=self.name, help=self.help,
                                        label_keys=list(self.label_keys))


CPU_USAGE = Descriptor("container_cpu_usage_seconds_total",
                       "Cumulative cpu time consumed in seconds.", ("cpu",), COUNTER)
MEMORY_USAGE = Descriptor("container_memory_usage_bytes",
                          "Current memory usage in bytes, including all memory regardless of "
                          "when it was accessed.")
MEMORY_WORKING_SET = Descriptor("container_memory_working_set_bytes",
                                "Current working set in bytes.")
MEMORY_RSS = Descriptor("container_memory_rss", "Size of RSS in bytes.")
MEMORY_SWAP = Descriptor("container_memory_swap", "Container swap usage in bytes.")
MEMORY_FAILURES = Descriptor("container_memory_failures_total",
                             "Cumulative count of memory allocation failures.",
                             ("failure_type", "scope"), COUNTER)
FS_USAGE = Descriptor("container_fs_usage_bytes",
                      "Number of bytes that are consumed by the container on this filesystem.",
                      ("device",))
FS_INODES = Descriptor("container_fs_inodes_used",
                       "Number of inodes used by the container on this filesystem.",
                       ("device",))
PROCESSES = Descriptor("container_processes", "Number of processes running inside the container.")
NETWORK_RX_BYTES = Descriptor("container_network_receive_bytes_total",
                              "Cumulative count of bytes received.", ("interface",), COUNTER)
NETWORK_RX_ERRORS = Descriptor("container_network_receive_errors_total",
                               "Cumulative count of errors encountered while receiving.",
                               ("interface",), COUNTER)
NETWORK_TX_BYTES = Descriptor("container_network_transmit_bytes_total",
                              "Cumulative count of bytes transmitted.", ("interface",), COUNTER)
NETWORK_TX_ERRORS = Descriptor("container_network_transmit_errors_total",
                               "Cumulative count of errors encountered while transmitting.",
                               ("interface",), COUNTER)

DESCRIPTORS = (CPU_USAGE, MEMORY_USAGE, MEMORY_WORKING_SET, MEMORY_RSS, MEMORY_SWAP,
               MEMORY_FAILURES, FS_USAGE, FS_INODES, PROCESSES, NETWORK_RX_BYTES,
               NETWORK_RX_ERRORS, NETWORK_TX_BYTES, NETWORK_TX_ERRORS)

_NS_PER_S = 1_000_000_000


class _Collected:
    """Metrics of one object (pod or container) sharing its base label values."""

    def __init__(self, base: tuple[str, str, str]) -> None:
        self.base = base
        self.metrics: list[api_pb2.Metric] = []

    def add(self, descriptor: Descriptor, timestamp: int, value: api_pb2.UInt64Value | int,
            *extra: str, scale: Callable[[int], int] | None = None) -> None:
        if isinstance(value, api_pb2.UInt64Value):
            number = value.value
        else:
            number = value
        metric = api_pb2.Metric(
            name=descriptor.name, timestamp=timestamp,
            metric_type=descriptor.metric_type,  # type: ignore[arg-type]
            label_values=[*self.base, *extra],
        )
        metric.value.value = scale(number) if scale else number
        self.metrics.append(metric)


def _cpu_and_memory(out: _Collected, cpu: api_pb2.CpuUsage, memory: api_pb2.MemoryUsage) -> None:
    if cpu.HasField("usage_core_nano_seconds"):
        out.add(CPU_USAGE, cpu.timestamp, cpu.usage_core_nano_seconds, "total",
                scale=lambda ns: ns // _NS_PER_S)
    for descriptor, field in ((MEMORY_USAGE, "usage_bytes"),
                              (MEMORY_WORKING_SET, "working_set_bytes"),
                              (MEMORY_RSS, "rss_bytes")):
        if memory.HasField(field):
            out.add(descriptor, memory.timestamp, getattr(memory, field))
    for failure_type, field in (("pgfault", "page_faults"), ("pgmajfault", "major_page_faults")):
        if memory.HasField(field):
            out.add(MEMORY_FAILURES, memory.timestamp, getattr(memory, field), failure_type,
                    "container")


def container_metrics(stats: api_pb2.ContainerStats, image: str) -> api_pb2.ContainerMetrics:
    attributes = stats.attributes
    out = _Collected((attributes.id, attributes.metadata.name, image))
    _cpu_and_memory(out, stats.cpu, stats.memory)
    if stats.swap.HasField("swap_usage_bytes"):
        out.add(MEMORY_SWAP, stats.swap.timestamp, stats.swap.swap_usage_bytes)
    layer = stats.writable_layer
    if layer.HasField("used_bytes"):
        out.add(FS_USAGE, layer.timestamp, layer.used_bytes, layer.fs_id.mountpoint)
        out.add(FS_INODES, layer.timestamp, layer.inodes_used, layer.fs_id.mountpoint)
    return api_pb2.ContainerMetrics(container_id=attributes.id, metrics=out.metrics)


def pod_metrics(
    stats: api_pb2.PodSandboxStats, images: Mapping[str, str]
) -> api_pb2.PodSandboxMetrics:
    """``images`` maps container id to the image the container runs."""
    linux = stats.linux
    out = _Collected((stats.attributes.id, stats.attributes.metadata.name, ""))
    _cpu_and_memory(out, linux.cpu, linux.memory)
    if linux.process.HasField("process_count"):
        out.add(PROCESSES, linux.process.timestamp, linux.process.process_count)
    network = linux.network
    for interface in network.interfaces:
        for descriptor, field in ((NETWORK_RX_BYTES, "rx_bytes"),
                                  (NETWORK_RX_ERRORS, "rx_errors"),
                                  (NETWORK_TX_BYTES, "tx_bytes"),
                                  (NETWORK_TX_ERRORS, "tx_errors")):
            out.add(descriptor, network.timestamp, getattr(interface, field), interface.name)
    return api_pb2.PodSandboxMetrics(
        pod_sandbox_id=stats.attributes.id,
        metrics=out.metrics,
        container_metrics=[
            container_metrics(c, images.get(c.attributes.id, "")) for c in linux.containers
        ],
    )
