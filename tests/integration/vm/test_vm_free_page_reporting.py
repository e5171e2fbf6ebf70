"""Free page reporting in a VM pod: the guest hands the pages it frees back to the host, and
the pod's network keeps delivering every frame while it does.

ca4f26d turned the balloon off for pods after a VM pod's nginx was unreachable with it on
(docs/performance.md, "VM memory", has what the investigation found). This test is the guard:
it proves that QEMU really discards guest RAM (the guest RAM memfd's allocation drops after
the guest frees memory), then moves frames both ways through the tap while the guest keeps
freeing and reusing pages, and checks that none went missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from crivm.netbridge.cni import CniNetwork, PodNetwork
from crivm.netbridge.netns import call_in_netns
from crivm.proto import api_pb2
from tests.fixtures.http import http_get
from tests.fixtures.images import PushedImage
from tests.fixtures.netns import NetnsFactory
from tests.fixtures.vm_daemon import VmCrivmDaemon

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.runc, pytest.mark.registry,
              pytest.mark.timeout(600)]

BUSYBOX = "docker.io/library/busybox:latest"
MIB = 1024 * 1024
BLOB_BYTES = 4 * MIB
FILL_MIB = 48
PINGS = 64
LOST_FRAMES_TOLERATED = 4
REPORT_TIMEOUT_S = 90.0
EXEC_TIMEOUT_S = 120


def guest_ram_allocated(qemu_pid: int, ram_bytes: int) -> int:
    """Bytes the host holds for the guest's RAM: the allocated blocks of QEMU's memfd (the one
    as large as the guest's RAM)."""
    fd_dir = f"/proc/{qemu_pid}/fd"
    for fd in os.listdir(fd_dir):
        path = os.path.join(fd_dir, fd)
        try:
            if os.readlink(path).startswith("/memfd:"):
                stat = os.stat(path)
                if stat.st_size == ram_bytes:
                    return stat.st_blocks * 512
        except OSError:
            continue
    raise AssertionError(f"QEMU {qemu_pid} holds no guest RAM memfd of {ram_bytes} bytes")


def wait_for_discard(qemu_pid: int, ram_bytes: int, below: int) -> int:
    deadline = time.monotonic() + REPORT_TIMEOUT_S
    while (allocated := guest_ram_allocated(qemu_pid, ram_bytes)) >= below:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"guest RAM still holds {allocated // MIB} MiB {REPORT_TIMEOUT_S:.0f} s after "
                f"the guest freed {FILL_MIB} MiB: free page reporting returned nothing")
        time.sleep(0.5)
    return allocated


def tap_counters(tap: str) -> dict[str, int]:
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=tap)
        stats = ipr.get_links(index)[0].get_attr("IFLA_STATS64")
        return {key: int(stats[key]) for key in ("tx_packets", "tx_dropped")}



def fetch_many(url: str, times: int) -> list[bytes]:
    # httpd starts slowly in a TCG guest and answers slowly while it frees memory.
    return [http_get(url, attempts=120, timeout_s=10.0, interval_s=0.5) for _ in range(times)]


def busybox(name: str, script: str, mounts: list[api_pb2.Mount]) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name),
        image=api_pb2.ImageSpec(image=BUSYBOX),
        command=["/bin/sh", "-c", script],
        log_path=f"{name}.log",
        mounts=mounts,
    )


def guest_shell(vm_daemon: VmCrivmDaemon, ctr_id: str, script: str) -> str:
    reply = vm_daemon.cri.exec_sync(ctr_id, ["/bin/sh", "-c", script], timeout=EXEC_TIMEOUT_S)
    assert reply.exit_code == 0, (script, reply.stdout, reply.stderr)
    return reply.stdout.decode()


async def test_vm_pod_network_while_free_pages_are_reported(
    vm_daemon: VmCrivmDaemon, busybox_image: PushedImage, netns_factory: NetnsFactory,
    tmp_path: Path,
) -> None:
    cri = vm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = vm_daemon.pod_config("vmfpr")
    pod_id = cri.run_pod(pod_config, handler="vm")
    # The blob comes from the host through virtio-fs: virtiofsd writes it into guest pages
    # (maybe ones just discarded) that virtio-net then sends.
    served, written = tmp_path / "served", tmp_path / "written"
    served.mkdir()
    written.mkdir()
    blob = os.urandom(BLOB_BYTES)
    (served / "blob").write_bytes(blob)
    ctr_id = cri.create(pod_id, busybox(
        "web", "exec httpd -f -p 80 -h /served",
        mounts=[api_pb2.Mount(container_path="/served", host_path=str(served), readonly=True),
                api_pb2.Mount(container_path="/written", host_path=str(written))],
    ), pod_config)
    cri.start(ctr_id)
    verbose = cri.runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True), timeout=60)
    info: dict[str, Any] = json.loads(verbose.info["info"])
    qemu_pid, tap, netns = info["vm"]["qemu_pid"], info["vm"]["tap"], info["netns_path"]
    ram_bytes = info["vm"]["memory_mb"] * MIB
    pod_ip = verbose.status.network.ip

    # 1. Reporting really returns memory: fill the guest's tmpfs, free it, and QEMU's memfd
    # must shrink by most of it (nothing else punches holes into guest RAM).
    guest_shell(vm_daemon, ctr_id, f"head -c {FILL_MIB * MIB} /dev/zero > /dev/shm/fill")
    filled = guest_ram_allocated(qemu_pid, ram_bytes)
    guest_shell(vm_daemon, ctr_id, "rm /dev/shm/fill")
    returned = wait_for_discard(qemu_pid, ram_bytes, below=filled - FILL_MIB * MIB // 2)
    print(f"guest RAM on the host: {filled // MIB} MiB filled, {returned // MIB} MiB after "
          "the guest freed the fill")

    # 2. Frames into the guest while it keeps freeing (and so reporting) and reusing pages.
    churn = asyncio.create_task(asyncio.to_thread(
        guest_shell, vm_daemon, ctr_id,
        "for i in 1 2 3 4; do head -c 33554432 /dev/zero > /dev/shm/churn; "
        "rm /dev/shm/churn; sleep 3; done"))
    client_ns = await netns_factory.create("fprclient")
    client_net = CniNetwork(str(vm_daemon.cni_conf_dir), ["/usr/lib/cni"],
                            str(tmp_path / "client-cni"))
    client = PodNetwork(pod_id="client-" + os.urandom(4).hex(), netns=client_ns.path)
    await client_net.add(client)
    try:
        bodies = await call_in_netns(client_ns.path, fetch_many, f"http://{pod_ip}/blob", 3)
    finally:
        await client_net.delete(client)
    await churn
    assert [len(body) for body in bodies] == [BLOB_BYTES] * 3
    assert all(body == blob for body in bodies)
    # And the other way: virtiofsd reads what the guest wrote out of guest RAM.
    in_guest = guest_shell(vm_daemon, ctr_id, f"head -c {BLOB_BYTES} /dev/urandom > /written/blob"
                                              " && sha256sum /written/blob").split()[0]
    assert hashlib.sha256((written / "blob").read_bytes()).hexdigest() == in_guest

    # 3. Every echo reply the tap hands to QEMU reaches the guest (ca4f26d saw 2 of 64).
    before = await call_in_netns(netns, tap_counters, tap)
    received_before = int(guest_shell(vm_daemon, ctr_id,
                                      "cat /sys/class/net/eth0/statistics/rx_packets"))
    pinged = guest_shell(
        vm_daemon, ctr_id,
        f"gw=$(ip route | awk '/^default/ {{print $3}}'); ping -c {PINGS} -i 0.2 -W 5 $gw")
    received = int(guest_shell(vm_daemon, ctr_id,
                               "cat /sys/class/net/eth0/statistics/rx_packets")) - received_before
    after = await call_in_netns(netns, tap_counters, tap)
    passed = after["tx_packets"] - before["tx_packets"]
    print(f"pings: {pinged.strip().splitlines()[-2:]}; tap passed {passed} frames to QEMU, "
          f"the guest received {received}")
    assert re.search(rf"{PINGS} packets transmitted, {PINGS} packets received", pinged)
    assert after["tx_dropped"] == before["tx_dropped"]
    assert received >= PINGS
    # A few frames may be the host's own multicast, which QEMU filters for the guest.
    assert passed - received <= LOST_FRAMES_TOLERATED

    cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
    cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                 timeout=120)
