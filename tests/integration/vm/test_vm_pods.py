"""Untrusted pods in QEMU VMs through a real crivm daemon (TCG here: slow, generous timeouts)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from crivm.netbridge.cni import CniNetwork, PodNetwork
from crivm.netbridge.netns import call_in_netns
from crivm.proto import api_pb2
from tests.fixtures.http import free_port, http_get
from tests.fixtures.images import NGINX_INDEX_HTML, PushedImage
from tests.fixtures.netns import NetnsFactory
from tests.fixtures.vm_daemon import MISSING_USR_IMAGE, VmCrivmDaemon

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.runc, pytest.mark.registry,
              pytest.mark.timeout(900)]

BUSYBOX = "docker.io/library/busybox:latest"
NGINX = "docker.io/library/nginx:latest"


def test_vm_pod_boots_and_goes(vm_daemon: VmCrivmDaemon, busybox_image: PushedImage) -> None:
    cri = vm_daemon.cri
    pod_config = vm_daemon.pod_config("vmboot")
    started = time.monotonic()
    pod_id = cri.run_pod(pod_config, handler="vm")
    print(f"VM pod ready in {time.monotonic() - started:.1f} s")
    status = cri.pod_status(pod_id).status
    assert status.state == api_pb2.SANDBOX_READY
    assert status.network.ip.startswith(vm_daemon.subnet_prefix)
    cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert cri.pod_status(pod_id).status.state == api_pb2.SANDBOX_NOTREADY
    cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def busybox(name: str, script: str, **kwargs: object) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name),
        image=api_pb2.ImageSpec(image=BUSYBOX),
        command=["/bin/sh", "-c", script],
        log_path=f"{name}.log",
        **kwargs,  # type: ignore[arg-type]
    )


def read_log(pod_config: api_pb2.PodSandboxConfig, name: str) -> list[tuple[str, str]]:
    entries = []
    with open(os.path.join(pod_config.log_directory, f"{name}.log")) as fh:
        for line in fh:
            _, stream, _, text = line.rstrip("\n").split(" ", 3)
            entries.append((stream, text))
    return entries


def test_vm_busybox_logs_exec_exit_codes(vm_daemon: VmCrivmDaemon,
                                         busybox_image: PushedImage) -> None:
    cri = vm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = vm_daemon.pod_config("vmbusy")
    pod_id = cri.run_pod(pod_config, handler="vm")

    ctr_id = cri.create(pod_id, busybox("hello", "echo hello; echo oops >&2; hostname; "
                                                 "uname -r; exit 3"), pod_config)
    assert cri.status(ctr_id).status.state == api_pb2.CONTAINER_CREATED
    cri.start(ctr_id)
    exited = cri.wait_exited(ctr_id, timeout_s=120)
    assert exited.exit_code == 3
    assert exited.reason == "Error"
    lines = read_log(pod_config, "hello")
    assert ("stderr", "oops") in lines and ("stdout", "hello") in lines
    assert ("stdout", "vmbusy") in lines
    # The guest's kernel, not the host's: the process ran in the VM.
    assert ("stdout", os.uname().release) not in lines

    sleeper = cri.create(pod_id, busybox("sleeper", "trap '' TERM; while true; do sleep 1; done"),
                         pod_config)
    cri.start(sleeper)
    assert cri.status(sleeper).status.state == api_pb2.CONTAINER_RUNNING
    reply = cri.exec_sync(sleeper, ["/bin/sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (reply.stdout, reply.stderr, reply.exit_code) == (b"out\n", b"err\n", 7)
    assert cri.exec_sync(sleeper, ["cat", "/etc/hostname"]).stdout == b"vmbusy\n"

    started = time.monotonic()
    cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=sleeper, timeout=2),
                              timeout=120)
    stopped = cri.status(sleeper).status
    assert stopped.state == api_pb2.CONTAINER_EXITED
    assert stopped.exit_code == 137
    assert time.monotonic() - started < 60
    for ctr in (ctr_id, sleeper):
        cri.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=ctr))
    cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))




# nginx starts slowly in a TCG guest: more attempts, further apart.
vm_http_get = functools.partial(http_get, attempts=150, timeout_s=3.0, interval_s=0.5)


async def test_vm_nginx_on_pod_ip_and_host_port(
    vm_daemon: VmCrivmDaemon, nginx_image: PushedImage, netns_factory: NetnsFactory,
    tmp_path: Path,
) -> None:
    cri = vm_daemon.cri
    cri.pull(NGINX)
    host_port = free_port()
    pod_config = vm_daemon.pod_config(
        "vmweb", port_mappings=[api_pb2.PortMapping(container_port=80, host_port=host_port)],
    )
    pod_id = cri.run_pod(pod_config, handler="vm")
    ctr_id = cri.create(pod_id, api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="nginx"),
        image=api_pb2.ImageSpec(image=NGINX),
        log_path="nginx.log",
    ), pod_config)
    cri.start(ctr_id)
    pod_ip = cri.pod_status(pod_id).status.network.ip

    # From a client namespace of the test's own, attached to the same CNI network: the
    # frames go through the pod's veth and the tap into the guest.
    client_ns = await netns_factory.create("vmclient")
    client_net = CniNetwork(str(vm_daemon.cni_conf_dir), ["/usr/lib/cni"],
                            str(tmp_path / "client-cni"))
    client = PodNetwork(pod_id="client-" + os.urandom(4).hex(), netns=client_ns.path)
    await client_net.add(client)
    try:
        body = await call_in_netns(client_ns.path, vm_http_get, f"http://{pod_ip}:80/")
    finally:
        await client_net.delete(client)
    assert body == NGINX_INDEX_HTML
    # Through portmap's DNAT on the host.
    assert vm_http_get(f"http://127.0.0.1:{host_port}/") == NGINX_INDEX_HTML
    # The guest answered: its interface carries the pod's IP.
    reply = cri.exec_sync(ctr_id, ["cat", "/proc/net/fib_trie"])
    assert pod_ip.encode() in reply.stdout


def test_runc_and_vm_pods_side_by_side_and_trust_annotations(
    vm_daemon: VmCrivmDaemon, busybox_image: PushedImage, tmp_path: Path,
) -> None:
    """No handler + no annotation -> runc; either untrusted annotation -> the vm handler.
    The VM pod's container also gets a read-only and a writable host volume."""
    cri = vm_daemon.cri
    cri.pull(BUSYBOX)
    host_kernel = os.uname().release
    trusted = vm_daemon.pod_config("trusted")
    cri_o = vm_daemon.pod_config(
        "crio", annotations={"io.kubernetes.cri-o.TrustedSandbox": "false"})
    containerd = vm_daemon.pod_config(
        "containerd", annotations={"io.kubernetes.cri.untrusted-workload": "true"})
    pods = {name: (config, cri.run_pod(config))
            for name, config in (("trusted", trusted), ("crio", cri_o),
                                 ("containerd", containerd))}
    handlers = {name: cri.pod_status(pod_id).status.runtime_handler
                for name, (_, pod_id) in pods.items()}
    assert handlers == {"trusted": "runc", "crio": "vm", "containerd": "vm"}

    shared_in = tmp_path / "in"
    shared_in.mkdir()
    (shared_in / "greeting").write_text("from the host\n")
    shared_out = tmp_path / "out"
    shared_out.mkdir()
    kernels = {}
    for name, (config, pod_id) in pods.items():
        mounts = []
        if name == "crio":
            mounts = [
                api_pb2.Mount(container_path="/in", host_path=str(shared_in), readonly=True),
                api_pb2.Mount(container_path="/out", host_path=str(shared_out)),
            ]
        ctr = cri.create(pod_id, busybox("main", "while true; do sleep 1; done",
                                         mounts=mounts), config)
        cri.start(ctr)
        kernels[name] = cri.exec_sync(ctr, ["uname", "-r"]).stdout.decode().strip()
        if name == "crio":
            assert cri.exec_sync(ctr, ["cat", "/in/greeting"]).stdout == b"from the host\n"
            assert cri.exec_sync(ctr, ["touch", "/in/nope"]).exit_code != 0
            reply = cri.exec_sync(ctr, ["sh", "-c", "echo from the guest > /out/reply"])
            assert reply.exit_code == 0
            assert (shared_out / "reply").read_text() == "from the guest\n"
    assert kernels["trusted"] == host_kernel
    assert kernels["crio"] != host_kernel and kernels["containerd"] != host_kernel

    # A memory limit holds inside the guest: the kernel there kills the hog.
    config, pod_id = pods["containerd"]
    hog = busybox("hog", "exec dd if=/dev/zero of=/dev/null bs=100M count=1")
    hog.linux.resources.memory_limit_in_bytes = 32 * 1024 * 1024
    hog_id = cri.create(pod_id, hog, config)
    cri.start(hog_id)
    killed = cri.wait_exited(hog_id, timeout_s=120)
    assert killed.exit_code == 137, read_log(config, "hog")
    # Told by the agent, since the shim's host cgroup never runs out: as for runc containers.
    assert killed.reason == "OOMKilled"
    # The fixture's teardown removes the pods through the CRI and runs the leak check.


def test_vm_pod_survives_daemon_restart(vm_daemon: VmCrivmDaemon,
                                        busybox_image: PushedImage) -> None:
    cri = vm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = vm_daemon.pod_config("vmrestart")
    pod_id = cri.run_pod(pod_config, handler="vm")
    ticker = cri.create(pod_id, busybox("ticker", "i=0; while true; do echo tick $i; "
                                                  "i=$((i+1)); sleep 1; done"), pod_config)
    cri.start(ticker)
    quitter = cri.create(pod_id, busybox("quitter", "while true; do sleep 1; done",
                                         stdin=True), pod_config)
    cri.start(quitter)
    supervisor = next((vm_daemon.runroot / "vm").glob("*/supervisor.pid")).read_text().strip()

    vm_daemon.stop()
    # With the daemon down the VM, its supervisor and the shims keep running; a container
    # that exits meanwhile is reported as exited afterwards (conmon records it).
    assert os.path.exists(f"/proc/{supervisor}")
    shim_cli = [str(vm_daemon.runroot / "vm" / "bin" / "crivm-shim"),
                "--root", str(vm_daemon.runroot / "vm-shim" / "vm")]
    subprocess.run([*shim_cli, "kill", quitter, "KILL"], check=True, timeout=60)
    deadline = time.monotonic() + 60
    while json.loads(subprocess.run([*shim_cli, "state", quitter], check=True, timeout=60,
                                    capture_output=True).stdout)["status"] != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    vm_daemon.start()
    cri = vm_daemon.cri
    assert cri.pod_status(pod_id).status.state == api_pb2.SANDBOX_READY
    assert cri.status(ticker).status.state == api_pb2.CONTAINER_RUNNING
    assert cri.exec_sync(ticker, ["echo", "still here"]).stdout == b"still here\n"
    count = len(read_log(pod_config, "ticker"))
    time.sleep(3)
    assert len(read_log(pod_config, "ticker")) > count
    exited = cri.status(quitter).status
    assert (exited.state, exited.exit_code) == (api_pb2.CONTAINER_EXITED, 137)
    cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=ticker, timeout=5),
                              timeout=120)
    assert cri.status(ticker).status.state == api_pb2.CONTAINER_EXITED


def test_vm_pod_sysctls_apply_in_the_guest(vm_daemon: VmCrivmDaemon,
                                           busybox_image: PushedImage) -> None:
    """The pod's namespaced sysctls (critest's safe and unsafe sysctl specs use these two) are
    the guest's; a sysctl the guest kernel does not have fails RunPodSandbox, leaving nothing."""
    cri = vm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = vm_daemon.pod_config("vmsysctl", linux=api_pb2.LinuxPodSandboxConfig(
        sysctls={"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "100"}))
    pod_id = cri.run_pod(pod_config, handler="vm")
    sleeper = cri.create(pod_id, busybox("sleeper", "sleep 600"), pod_config)
    cri.start(sleeper)
    for path, value in (("/proc/sys/kernel/shm_rmid_forced", b"1\n"),
                        ("/proc/sys/fs/mqueue/msg_max", b"100\n")):
        assert cri.exec_sync(sleeper, ["cat", path]).stdout == value
    cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    bad = vm_daemon.pod_config("vmbadsysctl", linux=api_pb2.LinuxPodSandboxConfig(
        sysctls={"kernel.no_such_knob": "1"}))
    with pytest.raises(grpc.RpcError) as info:
        cri.run_pod(bad, handler="vm")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "kernel.no_such_knob" in (info.value.details() or "")
    assert cri.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items == []


def test_missing_guest_image_is_a_precondition_error(vm_daemon: VmCrivmDaemon) -> None:
    """A handler whose /usr image was never built: RunPodSandbox says which file is missing,
    and the fixture's leak check finds nothing left behind."""
    cri = vm_daemon.cri
    with pytest.raises(grpc.RpcError) as info:
        cri.run_pod(vm_daemon.pod_config("vmnousr"), handler="vm-no-usr")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert MISSING_USR_IMAGE in (info.value.details() or "")
    assert "crivm guest-image build" in (info.value.details() or "")
    assert cri.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items == []


@pytest.mark.parametrize("handler", ["vm-bad-kernel", "vm-no-agent"])
def test_failed_vm_start_leaves_nothing(vm_daemon: VmCrivmDaemon, handler: str) -> None:
    """QEMU that refuses its kernel, and a guest that never runs the agent (it panics without
    a root filesystem): RunPodSandbox fails, and the fixture's leak check finds no netns,
    mount, tap, process or row."""
    cri = vm_daemon.cri
    with pytest.raises(grpc.RpcError) as info:
        cri.run_pod(vm_daemon.pod_config(handler), handler=handler)
    assert info.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED,
                                 grpc.StatusCode.UNAVAILABLE)
    assert cri.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items == []


def test_vm_container_makes_a_bridge_its_guest_loads_on_demand(
    vm_daemon: VmCrivmDaemon, busybox_image: PushedImage
) -> None:
    """bridge is not loaded at boot; the guest kernel's modprobe loads it when a container
    with CAP_NET_ADMIN asks for a bridge (critest's "Privileged is true" does this)."""
    cri = vm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = vm_daemon.pod_config("vmbridge")
    pod_id = cri.run_pod(pod_config, handler="vm")
    security = api_pb2.LinuxContainerSecurityContext(
        capabilities=api_pb2.Capability(add_capabilities=["NET_ADMIN"]))
    ctr_id = cri.create(pod_id, busybox("bridger", "sleep 600",
                                        linux=api_pb2.LinuxContainerConfig(
                                            security_context=security)), pod_config)
    cri.start(ctr_id)
    assert b"bridge" not in cri.exec_sync(ctr_id, ["cat", "/proc/modules"]).stdout
    reply = cri.exec_sync(ctr_id, ["busybox", "brctl", "addbr", "crivmbr0"])
    assert reply.exit_code == 0, reply.stderr
    reply = cri.exec_sync(ctr_id, ["busybox", "ip", "link", "add", "crivmbr1", "type", "bridge"])
    assert reply.exit_code == 0, reply.stderr
    links = cri.exec_sync(ctr_id, ["ls", "/sys/class/net"]).stdout.split()
    assert {b"crivmbr0", b"crivmbr1"} <= set(links)
    assert b"bridge" in cri.exec_sync(ctr_id, ["cat", "/proc/modules"]).stdout
    cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                               timeout=60)
    cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                 timeout=60)
