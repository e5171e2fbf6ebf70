"""Warm VMs (handler key warm_vms): a VM booted ahead of its pod, taken by RunPodSandbox."""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from pyroute2 import IPRoute

from crivm.netbridge.netns import call_in_netns
from crivm.proto import api_pb2
from tests.fixtures.http import http_get
from tests.fixtures.images import PushedImage
from tests.fixtures.vm_daemon import VM_BOOT_TIMEOUT_S, VmCrivmDaemon, warm_vm_daemon  # noqa: F401
from tests.integration.vm.test_vm_pods import BUSYBOX, busybox

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.runc, pytest.mark.registry,
              pytest.mark.timeout(900)]

HANDLER = "vm-warm"
vm_http_get = functools.partial(http_get, attempts=150, timeout_s=3.0, interval_s=0.5)


def warm_info(daemon: VmCrivmDaemon) -> dict[str, Any]:
    reply = daemon.cri.runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=10)
    info: dict[str, Any] = json.loads(reply.info["handlers"])[HANDLER]["warm_vms"]
    return info


def wait_warm(daemon: VmCrivmDaemon) -> None:
    deadline = time.monotonic() + VM_BOOT_TIMEOUT_S
    while (info := warm_info(daemon))["ready"] < 1:
        assert time.monotonic() < deadline, f"no warm VM in time: {info}"
        time.sleep(0.5)


def warm_dirs(daemon: VmCrivmDaemon) -> list[Path]:
    return sorted((daemon.runroot / "vm").glob("warm-*"))


def link_mac(name: str) -> str:
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=name)
        return str(ipr.get_links(index)[0].get_attr("IFLA_ADDRESS"))


def running(pid: int) -> bool:
    """Alive and not a zombie (the killed daemon's orphans wait for a reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def nice_of(pid: int | str) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[16])


def thread_nices(pid: int) -> set[int]:
    return {nice_of(f"{pid}/task/{tid}") for tid in os.listdir(f"/proc/{pid}/task")}


def autogroup_nice(pid: int | str) -> int:
    return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])


def qemu_of(pod_dir: Path) -> int:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
            comm = Path(entry.path, "comm").read_text()
        except OSError:
            continue
        if comm.startswith("qemu") and str(pod_dir).encode() in cmdline:
            return int(entry.name)
    raise AssertionError(f"no QEMU of {pod_dir}")


async def test_pod_takes_a_warm_vm(warm_vm_daemon: VmCrivmDaemon,  # noqa: F811
                                   busybox_image: PushedImage) -> None:
    daemon = warm_vm_daemon
    cri = daemon.cri
    cri.pull(BUSYBOX)
    wait_warm(daemon)
    (booted,) = warm_dirs(daemon)
    # A waiting VM boots behind running pods: its threads and its session's autogroup.
    qemu = qemu_of(booted)
    assert thread_nices(qemu) == {10}
    assert autogroup_nice(qemu) == 10

    pod_config = daemon.pod_config("warmweb")
    started = time.monotonic()
    pod_id = cri.run_pod(pod_config, handler=HANDLER)
    print(f"pod on a warm VM ready in {time.monotonic() - started:.2f} s")
    reply = cri.runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True), timeout=10)
    extra = json.loads(reply.info["info"])
    assert extra["vm"]["warm"] is True
    assert extra["vm"]["pod_dir"] == str(booted)
    # The pod's VM runs at the daemon's priority, every thread of it.
    assert extra["vm"]["qemu_pid"] == qemu
    assert thread_nices(qemu) == {0}
    assert autogroup_nice(qemu) == 0
    # The warm VM's own netns is unpinned: only its directory's files are left.
    assert not (booted / "netns").exists()

    ctr_id = cri.create(pod_id, busybox(
        "web", "mkdir -p /www && echo warm > /www/index.html && exec httpd -f -p 8080 -h /www"),
        pod_config)
    cri.start(ctr_id)
    pod_ip = reply.status.network.ip
    assert pod_ip.startswith(daemon.subnet_prefix)
    assert vm_http_get(f"http://{pod_ip}:8080/") == b"warm\n"
    # The guest NIC took the CNI veth's MAC, and the pod files are the pod's.
    veth_mac = await call_in_netns(extra["netns_path"], link_mac, "eth0")
    assert cri.exec_sync(ctr_id, ["cat", "/sys/class/net/eth0/address"]).stdout == (
        veth_mac.encode() + b"\n")
    assert cri.exec_sync(ctr_id, ["cat", "/etc/hostname"]).stdout == b"warmweb\n"

    # The pool boots the next one while the pod runs (the pod keeps its warm- directory).
    wait_warm(daemon)
    assert len(warm_dirs(daemon)) == 2

    # A restarted daemon finds the pod by its record, and discards only what no pod names.
    daemon.restart()
    cri = daemon.cri
    assert booted.exists()
    assert cri.pod_status(pod_id).status.state == api_pb2.SANDBOX_READY
    assert vm_http_get(f"http://{pod_ip}:8080/") == b"warm\n"
    assert cri.exec_sync(ctr_id, ["cat", "/etc/hostname"]).stdout == b"warmweb\n"
    wait_warm(daemon)

    cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                               timeout=60)
    cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                 timeout=60)
    assert not booted.exists()
    # Stopping the daemon stops the waiting VM too (the fixture's leak check).


def test_a_failed_claim_discards_the_warm_vm(
    warm_vm_daemon: VmCrivmDaemon,  # noqa: F811
) -> None:
    """A sysctl the guest kernel lacks fails the pod after its warm VM was configured: that VM
    is discarded (never handed to another pod), and the pool boots a new one."""
    daemon = warm_vm_daemon
    wait_warm(daemon)
    (booted,) = warm_dirs(daemon)
    config = daemon.pod_config("warmbad")
    config.linux.sysctls["net.ipv4.crivm_no_such_sysctl"] = "1"
    with pytest.raises(grpc.RpcError) as err:
        daemon.cri.run_pod(config, handler=HANDLER)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not booted.exists()
    wait_warm(daemon)
    assert warm_dirs(daemon) != [booted]


def test_warm_vms_of_a_killed_daemon_are_removed(
    warm_vm_daemon: VmCrivmDaemon,  # noqa: F811
) -> None:
    daemon = warm_vm_daemon
    wait_warm(daemon)
    (old,) = warm_dirs(daemon)
    supervisor = int((old / "supervisor.pid").read_text())
    assert daemon.process is not None
    daemon.process.kill()  # no close(): the VM outlives the daemon
    daemon.process.wait()
    assert running(supervisor)
    daemon.start()
    assert not old.exists()
    assert not running(supervisor)
    wait_warm(daemon)
    (new,) = warm_dirs(daemon)
    assert new != old


@pytest.mark.parametrize("after_s", [0.0, 1.0, 3.0])
def test_daemon_stopped_while_a_warm_vm_boots_leaves_nothing(
    warm_vm_daemon: VmCrivmDaemon, after_s: float,  # noqa: F811
) -> None:
    """The pool's boot is cancelled at whatever step it is in (the supervisor not yet started,
    QEMU starting, the agent not yet answering); its undo steps must still find everything."""
    daemon = warm_vm_daemon
    time.sleep(after_s)
    assert warm_info(daemon)["ready"] == 0, "booted already: this test needs a slower boot"
    daemon.stop()
    assert daemon.find_leaks() == []
