"""ResourceSample → the CRI stats messages. Unknown values stay unset, never zero."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime.stats.sample import InterfaceSample, ResourceSample

# The interface kubelet reports as the pod's network when there are several.
DEFAULT_INTERFACE = "eth0"


def _set(field: api_pb2.UInt64Value, value: int | None) -> None:
    if value is not None:
        field.value = value


def cpu_usage(sample: ResourceSample, nano_cores: int | None) -> api_pb2.CpuUsage:
    usage = api_pb2.CpuUsage(timestamp=sample.timestamp_ns)
    _set(usage.usage_core_nano_seconds, sample.cpu_usage_ns)
    _set(usage.usage_nano_cores, nano_cores)
    return usage


def memory_usage(sample: ResourceSample) -> api_pb2.MemoryUsage:
    usage = api_pb2.MemoryUsage(timestamp=sample.timestamp_ns)
    _set(usage.working_set_bytes, sample.memory_working_set_bytes)
    _set(usage.usage_bytes, sample.memory_usage_bytes)
    _set(usage.rss_bytes, sample.memory_rss_bytes)
    _set(usage.page_faults, sample.page_faults)
    _set(usage.major_page_faults, sample.major_page_faults)
    if sample.memory_limit_bytes is not None and sample.memory_working_set_bytes is not None:
        usage.available_bytes.value = max(
            sample.memory_limit_bytes - sample.memory_working_set_bytes, 0
        )
    return usage


def swap_usage(sample: ResourceSample) -> api_pb2.SwapUsage:
    usage = api_pb2.SwapUsage(timestamp=sample.timestamp_ns)
    _set(usage.swap_usage_bytes, sample.swap_usage_bytes)
    return usage


def process_usage(sample: ResourceSample) -> api_pb2.ProcessUsage:
    usage = api_pb2.ProcessUsage(timestamp=sample.timestamp_ns)
    _set(usage.process_count, sample.process_count)
    return usage


def _interface(sample: InterfaceSample) -> api_pb2.NetworkInterfaceUsage:
    usage = api_pb2.NetworkInterfaceUsage(name=sample.name)
    usage.rx_bytes.value = sample.rx_bytes
    usage.rx_errors.value = sample.rx_errors
    usage.tx_bytes.value = sample.tx_bytes
    usage.tx_errors.value = sample.tx_errors
    return usage


def network_usage(
    timestamp_ns: int, interfaces: tuple[InterfaceSample, ...]
) -> api_pb2.NetworkUsage:
    usage = api_pb2.NetworkUsage(timestamp=timestamp_ns)
    if not interfaces:
        return usage
    default = next((i for i in interfaces if i.name == DEFAULT_INTERFACE), interfaces[0])
    usage.default_interface.CopyFrom(_interface(default))
    # Like kubelet's summary (from cAdvisor), the list holds every interface, default too.
    usage.interfaces.extend(_interface(i) for i in interfaces)
    return usage


def filesystem_usage(
    timestamp_ns: int, mountpoint: str, used_bytes: int, inodes_used: int
) -> api_pb2.FilesystemUsage:
    usage = api_pb2.FilesystemUsage(
        timestamp=timestamp_ns, fs_id=api_pb2.FilesystemIdentifier(mountpoint=mountpoint)
    )
    usage.used_bytes.value = used_bytes
    usage.inodes_used.value = inodes_used
    return usage
