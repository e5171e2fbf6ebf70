"""Stats of trusted (runc) pods through a real crivm daemon, checked against workloads whose
CPU, memory, disk and network use is known.

Tolerances (this host has 2 cores and is shared with other test runs, so CPU can be stolen):
- a one-thread busy loop's nano-cores over a ~2 s window agree within 10 % with the CPU time
  the kernel charges to the loop's process (/proc/<pid>/stat), lie in 0.3e9..1.15e9 (about
  one core; less when the shared host is busy), and agree with the cumulative
  core-nanoseconds over the same window within 5 %;
- a shell holding a 64 MiB string has a working set and RSS of at least 60 MiB and at most
  64 MiB + 48 MiB (busybox's string handling doubles buffers while it reads);
- a 4 MiB file written into the container shows as >= 4 MiB of writable layer;
- three pings to the gateway show as >= 3 * 98 bytes each way on eth0.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from crivm.proto import api_pb2
from tests.fixtures.daemon import TEST_GATEWAY, CrivmDaemon
from tests.fixtures.images import PushedImage

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.registry]

BUSYBOX = "docker.io/library/busybox:latest"
MIB = 1024 * 1024


def busybox(name: str, script: str, **labels: str) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name),
        image=api_pb2.ImageSpec(image=BUSYBOX),
        command=["/bin/sh", "-c", script],
        labels=labels,
    )


def container_stats(daemon: CrivmDaemon, ctr_id: str) -> api_pb2.ContainerStats:
    reply = daemon.cri.runtime.ContainerStats(
        api_pb2.ContainerStatsRequest(container_id=ctr_id), timeout=30
    )
    stats: api_pb2.ContainerStats = reply.stats
    return stats


def process_cpu_ns(pid: int) -> int:
    """utime + stime of one process, from /proc (USER_HZ ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def wait_for(predicate: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)


def test_busy_loop_uses_one_core(crivm_daemon: CrivmDaemon, busybox_image: PushedImage) -> None:
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("cpu")
    pod_id = cri.run_pod(pod_config)
    ctr_id = cri.create(pod_id, busybox("spin", "while :; do :; done"), pod_config)
    cri.start(ctr_id)
    pid = int(json.loads(cri.status(ctr_id, verbose=True).info["info"])["pid"])
    time.sleep(1.0)

    first = container_stats(crivm_daemon, ctr_id)
    first_truth = process_cpu_ns(pid)
    assert first.attributes.id == ctr_id
    assert first.attributes.metadata.name == "spin"
    assert first.cpu.timestamp > 0 and first.cpu.usage_core_nano_seconds.value > 0
    time.sleep(2.0)
    second = container_stats(crivm_daemon, ctr_id)
    second_truth = process_cpu_ns(pid)

    nano_cores = second.cpu.usage_nano_cores.value
    truth = (second_truth - first_truth) * 1e9 / (second.cpu.timestamp - first.cpu.timestamp)
    assert abs(nano_cores - truth) <= 0.1 * truth, (nano_cores, truth)
    assert 0.3e9 <= nano_cores <= 1.15e9, nano_cores
    used = second.cpu.usage_core_nano_seconds.value - first.cpu.usage_core_nano_seconds.value
    elapsed = second.cpu.timestamp - first.cpu.timestamp
    assert abs(used * 1e9 / elapsed - nano_cores) <= 0.05 * nano_cores

    # The pod's cgroup holds the loop too, plus the pause process.
    pod = cri.runtime.PodSandboxStats(
        api_pb2.PodSandboxStatsRequest(pod_sandbox_id=pod_id), timeout=30
    ).stats
    assert pod.attributes.id == pod_id
    assert pod.linux.cpu.usage_core_nano_seconds.value >= (
        second.cpu.usage_core_nano_seconds.value
    )
    assert pod.linux.process.process_count.value >= 2
    assert [c.attributes.id for c in pod.linux.containers] == [ctr_id]


def test_memory_disk_and_network(crivm_daemon: CrivmDaemon, busybox_image: PushedImage) -> None:
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("mem", labels={"suite": "stats"})
    pod_id = cri.run_pod(pod_config)
    hog = busybox(
        "hog",
        "dd if=/dev/zero of=/written bs=1M count=4 2>/dev/null; "
        "x=$(head -c 67108864 /dev/zero | tr '\\0' a); touch /ready; "
        # A loop, not a last "sleep": ash would exec the last command and free the string.
        "while :; do sleep 1; done",
        role="hog",
    )
    hog_id = cri.create(pod_id, hog, pod_config)
    idle_id = cri.create(pod_id, busybox("idle", "sleep 3600", role="idle"), pod_config)
    cri.start(hog_id)
    cri.start(idle_id)
    wait_for(lambda: cri.exec_sync(hog_id, ["test", "-e", "/ready"]).exit_code == 0)

    stats = container_stats(crivm_daemon, hog_id)
    memory = stats.memory
    assert memory.timestamp > 0
    assert 60 * MIB <= memory.working_set_bytes.value <= 112 * MIB, memory
    assert 60 * MIB <= memory.rss_bytes.value <= 112 * MIB, memory
    assert memory.usage_bytes.value >= memory.working_set_bytes.value
    assert memory.page_faults.value > 0
    assert memory.HasField("major_page_faults")
    assert stats.writable_layer.used_bytes.value >= 4 * MIB
    assert stats.writable_layer.inodes_used.value >= 1
    assert stats.writable_layer.fs_id.mountpoint.endswith("/storage/containers")

    # Filters: by id prefix, by pod, by label.
    def listed(**fields: object) -> list[str]:
        reply = cri.runtime.ListContainerStats(api_pb2.ListContainerStatsRequest(
            filter=api_pb2.ContainerStatsFilter(**fields)  # type: ignore[arg-type]
        ), timeout=30)
        return sorted(s.attributes.id for s in reply.stats)

    assert listed() == sorted([hog_id, idle_id])
    assert listed(id=hog_id[:12]) == [hog_id]
    assert listed(pod_sandbox_id=pod_id[:12]) == sorted([hog_id, idle_id])
    assert listed(label_selector={"role": "idle"}) == [idle_id]
    assert listed(pod_sandbox_id="ffff") == []

    reply = cri.exec_sync(idle_id, ["ping", "-c", "3", "-W", "2", TEST_GATEWAY])
    assert reply.exit_code == 0, reply.stderr
    pods = cri.runtime.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(
        filter=api_pb2.PodSandboxStatsFilter(label_selector={"suite": "stats"})
    ), timeout=30).stats
    assert [p.attributes.id for p in pods] == [pod_id]
    network = pods[0].linux.network
    assert network.default_interface.name == "eth0"
    assert network.default_interface.rx_bytes.value >= 3 * 98
    assert network.default_interface.tx_bytes.value >= 3 * 98
    assert "eth0" in [i.name for i in network.interfaces]
    assert pods[0].linux.memory.working_set_bytes.value >= memory.working_set_bytes.value
    assert pods[0].linux.process.process_count.value >= 3
    assert sorted(c.attributes.id for c in pods[0].linux.containers) == sorted([hog_id, idle_id])
    none = cri.runtime.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(
        filter=api_pb2.PodSandboxStatsFilter(id="ffff")
    ), timeout=30).stats
    assert list(none) == []
