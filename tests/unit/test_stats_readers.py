"""cgroup v1/v2 parsing (fixture trees in the kernel's file formats), /proc/net/dev parsing,
nano-cores from successive samples, and the CRI stats/metrics messages built from samples.

The real-cgroup counterparts are in tests/integration/test_cgroup_stats.py.
"""

from __future__ import annotations

from pathlib import Path

from crivm.proto import api_pb2
from crivm.runtime.stats import cri_metrics, cri_stats
from crivm.runtime.stats.cgroups import cgroup_version, read_cgroup, read_v1, read_v2
from crivm.runtime.stats.cpu_rate import CpuRates
from crivm.runtime.stats.netdev import parse_net_dev
from crivm.runtime.stats.sample import InterfaceSample, ResourceSample

MIB = 1024 * 1024

# memory.stat of a cgroup v2 memory controller (Linux 6.x key set, trimmed of keys we skip).
V2_MEMORY_STAT = """\
anon 104857600
file 20971520
kernel 1048576
kernel_stack 65536
pagetables 262144
sec_pagetables 0
percpu 0
sock 0
vmalloc 0
shmem 0
file_mapped 4194304
file_dirty 0
file_writeback 0
swapcached 0
anon_thp 0
inactive_anon 104857600
active_anon 0
inactive_file 16777216
active_file 4194304
unevictable 0
slab_reclaimable 131072
slab_unreclaimable 262144
slab 393216
workingset_refault_anon 0
workingset_refault_file 0
pgscan 0
pgsteal 0
pgactivate 12
pgdeactivate 0
pglazyfree 0
pglazyfreed 0
pgfault 30211
pgmajfault 7
"""
# cpu.stat as cgroup v2 shows it with the cpu controller enabled.
V2_CPU_STAT = """\
usage_usec 2500000
user_usec 2000000
system_usec 500000
core_sched.force_idle_usec 0
nr_periods 0
nr_throttled 0
throttled_usec 0
nr_bursts 0
burst_usec 0
"""


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_v2_full_controllers(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "cgroup.controllers": "cpuset cpu io memory hugetlb pids rdma misc\n",
        "crivm/pod-a/ctr/cpu.stat": V2_CPU_STAT,
        "crivm/pod-a/ctr/memory.current": f"{130 * MIB}\n",
        "crivm/pod-a/ctr/memory.stat": V2_MEMORY_STAT,
        "crivm/pod-a/ctr/memory.max": f"{256 * MIB}\n",
        "crivm/pod-a/ctr/memory.swap.current": "0\n",
        "crivm/pod-a/ctr/pids.current": "3\n",
    })
    assert cgroup_version(str(tmp_path)) == 2
    sample = read_cgroup("/crivm/pod-a/ctr", root=str(tmp_path))
    assert sample is not None
    assert sample.cpu_usage_ns == 2_500_000_000
    assert sample.memory_usage_bytes == 130 * MIB
    assert sample.memory_working_set_bytes == 130 * MIB - 16 * MIB
    assert sample.memory_rss_bytes == 100 * MIB
    assert sample.memory_limit_bytes == 256 * MIB
    assert (sample.page_faults, sample.major_page_faults) == (30211, 7)
    assert sample.swap_usage_bytes == 0
    assert sample.process_count == 3
    assert sample.timestamp_ns > 0


def test_v2_without_memory_controller_leaves_memory_unknown(tmp_path: Path) -> None:
    # What a v1-hybrid host's unified tree looks like: cpu.stat only, memory.max unlimited.
    write_tree(tmp_path, {"cpu.stat": "usage_usec 10\nuser_usec 6\nsystem_usec 4\n",
                          "memory.max": "max\n"})
    sample = read_v2(str(tmp_path))
    assert sample is not None
    assert sample.cpu_usage_ns == 10_000
    assert sample.memory_usage_bytes is None
    assert sample.memory_working_set_bytes is None
    assert sample.memory_limit_bytes is None
    assert sample.process_count is None
    assert read_v2(str(tmp_path / "missing")) is None


def test_v1_hierarchies(tmp_path: Path) -> None:
    rel = "crivm/pod-a/ctr"
    write_tree(tmp_path, {
        f"cpuacct/{rel}/cpuacct.usage": "1500000000\n",
        f"memory/{rel}/memory.usage_in_bytes": f"{80 * MIB}\n",
        f"memory/{rel}/memory.limit_in_bytes": "9223372036854771712\n",
        f"memory/{rel}/memory.stat": (
            "cache 1\nrss 2\ntotal_cache 12582912\ntotal_rss 62914560\n"
            f"total_inactive_file {10 * MIB}\ntotal_pgfault 500\ntotal_pgmajfault 2\n"
        ),
        f"pids/{rel}/pids.current": "4\n",
    })
    assert cgroup_version(str(tmp_path)) == 1
    sample = read_v1(str(tmp_path), "/" + rel)
    assert sample is not None
    assert sample.cpu_usage_ns == 1_500_000_000
    assert sample.memory_working_set_bytes == 70 * MIB
    assert sample.memory_rss_bytes == 62914560
    assert sample.memory_limit_bytes is None  # the "unlimited" page-aligned maximum
    assert (sample.page_faults, sample.major_page_faults) == (500, 2)
    assert sample.swap_usage_bytes is None  # no memsw files: swap accounting is off
    assert sample.process_count == 4
    assert read_v1(str(tmp_path), "/crivm/none") is None


def test_working_set_never_negative(tmp_path: Path) -> None:
    write_tree(tmp_path, {"memory.current": "100\n", "memory.stat": "inactive_file 4096\n"})
    sample = read_v2(str(tmp_path))
    assert sample is not None and sample.memory_working_set_bytes == 0


def test_parse_net_dev() -> None:
    text = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets "
        "errs drop fifo colls carrier compressed\n"
        "    lo:     100       2    0    0    0     0          0         0      100       2    "
        "0    0    0     0       0          0\n"
        "  eth0: 5000 40 1 0 0 0 0 0 3000 30 2 0 0 0 0 0\n"
    )
    assert parse_net_dev(text) == (
        InterfaceSample(name="eth0", rx_bytes=5000, rx_errors=1, tx_bytes=3000, tx_errors=2),
    )


def test_nano_cores_from_successive_samples() -> None:
    rates = CpuRates(window_ns=1_000_000_000)
    second = 1_000_000_000
    # No earlier sample and no start time: unknown.
    assert rates.nano_cores("c", 10 * second, 5 * second) is None
    # Half a core over 2 s.
    assert rates.nano_cores("c", 12 * second, 6 * second) == 500_000_000
    # A quick second call measures against the same reference (now 12 s)...
    assert rates.nano_cores("c", 12 * second + second // 2, 6 * second + second // 4) == (
        500_000_000
    )
    # ...which only moves once it is a window old.
    assert rates.nano_cores("c", 13 * second, 7 * second) == second
    # With a start time, the first call is the average since the start.
    assert rates.nano_cores("d", 4 * second, 2 * second, started_ns=2 * second) == second
    # A counter that went backwards (cgroup recreated) starts over.
    assert rates.nano_cores("c", 14 * second, 1) is None
    rates.retain(["d"])
    assert rates.nano_cores("c", 15 * second, 2) is None


def test_cri_messages_leave_unknown_values_unset() -> None:
    sample = ResourceSample(timestamp_ns=7, cpu_usage_ns=100, memory_working_set_bytes=10,
                            memory_limit_bytes=50)
    cpu = cri_stats.cpu_usage(sample, None)
    assert cpu.usage_core_nano_seconds.value == 100 and not cpu.HasField("usage_nano_cores")
    memory = cri_stats.memory_usage(sample)
    assert memory.working_set_bytes.value == 10
    assert memory.available_bytes.value == 40
    assert not memory.HasField("rss_bytes") and not memory.HasField("page_faults")
    eth1 = InterfaceSample("eth1", 1, 0, 2, 0)
    eth0 = InterfaceSample("eth0", 3, 0, 4, 0)
    network = cri_stats.network_usage(7, (eth1, eth0))
    assert network.default_interface.name == "eth0"
    assert [i.name for i in network.interfaces] == ["eth1", "eth0"]


def test_pod_metrics_follow_the_descriptors() -> None:
    sample = ResourceSample(timestamp_ns=7, cpu_usage_ns=3_500_000_000,
                            memory_usage_bytes=20, memory_working_set_bytes=10,
                            page_faults=5, process_count=2)
    stats = api_pb2.PodSandboxStats()
    stats.attributes.id = "pod1"
    stats.attributes.metadata.name = "web"
    stats.linux.cpu.CopyFrom(cri_stats.cpu_usage(sample, 1))
    stats.linux.memory.CopyFrom(cri_stats.memory_usage(sample))
    stats.linux.process.CopyFrom(cri_stats.process_usage(sample))
    stats.linux.network.CopyFrom(
        cri_stats.network_usage(7, (InterfaceSample("eth0", 11, 0, 12, 1),)))
    container = stats.linux.containers.add()
    container.attributes.id = "ctr1"
    container.attributes.metadata.name = "app"
    container.cpu.CopyFrom(cri_stats.cpu_usage(sample, 1))
    container.writable_layer.CopyFrom(cri_stats.filesystem_usage(7, "/var/lib/x", 4096, 3))

    metrics = cri_metrics.pod_metrics(stats, {"ctr1": "busybox:latest"})
    keys = {d.name: d.label_keys for d in cri_metrics.DESCRIPTORS}
    pod = {(m.name, tuple(m.label_values)): m for m in metrics.metrics}
    assert pod[("container_cpu_usage_seconds_total", ("pod1", "web", "", "total"))].value.value == 3
    assert pod[("container_network_transmit_errors_total", ("pod1", "web", "", "eth0"))
               ].value.value == 1
    assert ("container_memory_rss", ("pod1", "web", "")) not in pod  # unknown, not zero
    (ctr,) = metrics.container_metrics
    by_name = {m.name: m for m in ctr.metrics}
    assert list(by_name["container_fs_usage_bytes"].label_values) == [
        "ctr1", "app", "busybox:latest", "/var/lib/x"]
    for metric in [*metrics.metrics, *ctr.metrics]:
        assert len(metric.label_values) == len(keys[metric.name])

