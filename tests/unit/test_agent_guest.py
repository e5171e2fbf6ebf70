"""Pure parts of the agent: spec rewriting, cgroup stats parsing, netlink layouts, stdio buffers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from crivm.agent import netlink, oci_spec, runc, stats, stdio
from crivm.agent.errors import InvalidArgument, NotFound
from crivm.agent.main import transport_from_environment
from crivm.agent.reaper import exit_code_of
from crivm.agent.transport import parse_endpoint
from crivm.proto import agent_pb2 as pb

pytestmark = pytest.mark.timeout(30)

HOST_SPEC: dict[str, Any] = {
    "ociVersion": "1.0.2",
    "process": {
        "args": ["nginx"],
        "env": ["PATH=/bin"],
        "cwd": "/srv",
        "user": {"uid": 101, "gid": 101},
        "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"]},
        "consoleSize": {"height": 10, "width": 20},
    },
    "root": {"path": "/var/lib/crivm/overlay/abc/merged", "readonly": True},
    "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
    "linux": {
        "namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/pod"},
            {"type": "ipc", "path": "/proc/1234/ns/ipc"},
            {"type": "mount"},
        ],
        "cgroupsPath": "kubepods-besteffort.slice:crio:abc",
        "resources": {"memory": {"limit": 1048576}},
    },
}


def test_guest_spec_rewrites_host_only_parts() -> None:
    spec = oci_spec.guest_spec(
        oci_spec.parse_spec(json.dumps(HOST_SPEC).encode()), "/run/shared/abc", True, "/crivm/abc"
    )
    assert spec["root"] == {"path": "/run/shared/abc", "readonly": True}
    assert spec["process"]["terminal"] is True
    assert "hooks" not in spec
    assert spec["linux"]["namespaces"] == [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}]
    assert spec["linux"]["cgroupsPath"] == "/crivm/abc"
    assert spec["linux"]["resources"] == {"memory": {"limit": 1048576}}
    assert HOST_SPEC["linux"]["cgroupsPath"] == "kubepods-besteffort.slice:crio:abc"  # untouched


@pytest.mark.parametrize(
    "raw", [b"not json", b"[]", b'{"process": {}}', b'{"root": {"path": "/"}}']
)
def test_bad_specs_are_invalid_arguments(raw: bytes) -> None:
    with pytest.raises(InvalidArgument):
        oci_spec.parse_spec(raw)


def test_exec_process_inherits_the_container_process() -> None:
    process = pb.Process(args=["sh"], terminal=True, user=pb.User(uid=0, gid=0))
    out = oci_spec.exec_process(HOST_SPEC, process)
    assert out["args"] == ["sh"]
    assert out["terminal"] is True
    assert out["env"] == ["PATH=/bin"] and out["cwd"] == "/srv"
    assert out["user"] == {"uid": 0, "gid": 0}
    assert out["capabilities"] == {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"]}
    assert "consoleSize" not in out
    # Without a user, the container's user stays.
    assert oci_spec.exec_process(HOST_SPEC, pb.Process(args=["id"]))["user"]["uid"] == 101
    with pytest.raises(InvalidArgument):
        oci_spec.exec_process(HOST_SPEC, pb.Process())


def write_files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cgroup_v2_stats(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {
            "cgroup.controllers": "cpu memory pids\n",
            "crivm/c1/cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
            "crivm/c1/memory.current": "10000\n",
            "crivm/c1/memory.stat": "anon 4096\ninactive_file 3000\n",
            "crivm/c1/memory.max": "max\n",
            "crivm/c1/pids.current": "3\n",
            "crivm/c1/pids.max": "100\n",
        },
    )
    out = stats.container_stats("/crivm/c1", str(tmp_path))
    assert (out.cpu.usage_ns, out.cpu.user_ns, out.cpu.system_ns) == (1_500_000, 1_000_000, 500_000)
    assert out.memory.usage_bytes == 10000
    assert out.memory.working_set_bytes == 7000
    assert out.memory.rss_bytes == 4096
    assert out.memory.limit_bytes == 0
    assert (out.pids.current, out.pids.limit) == (3, 100)
    assert out.timestamp_ns > 0
    with pytest.raises(NotFound):
        stats.container_stats("/crivm/missing", str(tmp_path))


def test_cgroup_v1_stats(tmp_path: Path) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    write_files(
        tmp_path,
        {
            "cpuacct/crivm/c1/cpuacct.usage": "123456789\n",
            "cpuacct/crivm/c1/cpuacct.stat": f"user {ticks}\nsystem {2 * ticks}\n",
            "memory/crivm/c1/memory.usage_in_bytes": "8192\n",
            "memory/crivm/c1/memory.limit_in_bytes": "9223372036854771712\n",
            "memory/crivm/c1/memory.stat": "total_rss 2048\ntotal_inactive_file 1024\n",
            "pids/crivm/c1/pids.current": "2\n",
            "pids/crivm/c1/pids.max": "max\n",
        },
    )
    out = stats.container_stats("/crivm/c1", str(tmp_path))
    assert out.cpu.usage_ns == 123456789
    assert (out.cpu.user_ns, out.cpu.system_ns) == (1_000_000_000, 2_000_000_000)
    assert (out.memory.usage_bytes, out.memory.working_set_bytes) == (8192, 7168)
    assert out.memory.limit_bytes == 0  # v1's "unlimited" is a huge number
    assert (out.pids.current, out.pids.limit) == (2, 0)


def test_network_stats_skip_loopback(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.write_text(
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets"
        " errs drop fifo colls carrier compressed\n"
        "    lo:     100       1    0    0    0     0          0         0      100       1"
        "    0    0    0     0       0          0\n"
        "  eth0: 5000 40 1 2 0 0 0 0 7000 50 3 4 0 0 0 0\n"
    )
    (eth0,) = stats.network_stats(str(dev))
    assert eth0.interface == "eth0"
    assert (eth0.rx_bytes, eth0.rx_packets, eth0.rx_errors, eth0.rx_dropped) == (5000, 40, 1, 2)
    assert (eth0.tx_bytes, eth0.tx_packets, eth0.tx_errors, eth0.tx_dropped) == (7000, 50, 3, 4)


def test_netlink_attributes_are_padded_and_parse_back() -> None:
    packed = netlink.attr(netlink.IFLA_IFNAME, b"eth0\0") + netlink.attr(
        netlink.IFLA_MTU, (1400).to_bytes(4, "little")
    )
    assert len(packed) == 12 + 8  # 4 + 5 padded to 12, then 4 + 4
    attrs = netlink.parse_attrs(packed)
    assert attrs[netlink.IFLA_IFNAME] == b"eth0\0"
    assert int.from_bytes(attrs[netlink.IFLA_MTU], "little") == 1400
    assert netlink.mac_text(netlink.mac_bytes("02:42:AC:11:00:07")) == "02:42:ac:11:00:07"
    with pytest.raises(ValueError):
        netlink.mac_bytes("02:42:ac")


def test_exit_codes_follow_the_shell_convention() -> None:
    assert exit_code_of(3 << 8) == (3, 0)
    assert exit_code_of(signal.SIGKILL) == (137, 9)
    assert exit_code_of(signal.SIGTERM) == (143, 15)


async def test_output_buffer_keeps_order_splits_reads_and_sees_eof() -> None:
    r, w = os.pipe()
    buffer = stdio.OutputBuffer(r, "test")
    os.write(w, b"a" * 1000)
    os.write(w, b"b" * 1000)
    os.close(w)
    data = b""
    while chunk := await asyncio.wait_for(buffer.read(limit=300), 5):
        assert len(chunk) <= 300
        data += chunk
    assert data == b"a" * 1000 + b"b" * 1000
    assert buffer.at_eof
    buffer.close()


async def test_output_buffer_stops_reading_when_full() -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    buffer = stdio.OutputBuffer(r, "test")
    written = 0
    stalled = 0
    # Keep writing: the buffer takes up to its limit, then the pipe itself fills up and stays
    # full, because the agent stopped reading it.
    while stalled < 10:
        try:
            written += os.write(w, b"x" * 65536)
            stalled = 0
        except BlockingIOError:
            stalled += 1
            await asyncio.sleep(0.01)
    assert stdio.BUFFER_LIMIT <= written < stdio.BUFFER_LIMIT + 1024 * 1024
    received = 0
    os.close(w)
    while chunk := await asyncio.wait_for(buffer.read(), 5):
        received += len(chunk)
    assert received == written
    buffer.close()


@pytest.mark.parametrize(
    ("env", "transport"),
    [
        ({}, "serial"),
        (
            {"CRIVM_AGENT_TRANSPORT": "virtio-serial", "CRIVM_AGENT_DEVICE": "/dev/virtio-ports/a"},
            "serial:/dev/virtio-ports/a",
        ),
        ({"CRIVM_AGENT_TRANSPORT": "vsock", "CRIVM_AGENT_VSOCK_PORT": "2048"}, "vsock:2048"),
        ({"CRIVM_AGENT_TRANSPORT": "vsock"}, "vsock"),
    ],
)
def test_transport_comes_from_the_guest_init(env: dict[str, str], transport: str) -> None:
    assert transport_from_environment(env) == transport
    endpoint = parse_endpoint(transport)
    assert endpoint.kind in ("serial", "vsock")
    assert endpoint.address


def test_bad_transports_are_refused() -> None:
    for text in ("tcp:1", "unix:", "vsock:abc"):
        with pytest.raises(ValueError):
            parse_endpoint(text)


def test_initramfs_root_is_detected(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("rootfs / rootfs rw 0 0\nproc /proc proc rw 0 0\n")
    assert runc.root_is_initramfs(str(mounts))
    mounts.write_text("rootfs / rootfs rw 0 0\n/dev/vda / ext4 rw 0 0\n")
    assert not runc.root_is_initramfs(str(mounts))
