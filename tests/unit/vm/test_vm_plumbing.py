"""Pure parts of the vm backend: VM sizing, the guest network message, the supervisor's VM
config and the shim launcher."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

from crivm.hypervisor.qemu.cmdline import build_argv
from crivm.netbridge.tap import GuestNetwork, GuestRoute
from crivm.proto import api_pb2
from crivm.runtime.config import RuntimeHandler
from crivm.runtime.vm_backend import guest_network
from crivm.runtime.vm_backend.sandbox import vm_size
from crivm.runtime.vm_backend.shim_launcher import write_launcher
from crivm.shim.vm_spec import VmSpec
from crivm.shim.vm_supervisor import vm_config


def test_vm_size_from_pod_limits_plus_overhead() -> None:
    handler = RuntimeHandler(runtime_type="vm", default_vcpus=1, default_memory_mb=256,
                             memory_overhead_mb=128)
    assert vm_size(handler, api_pb2.PodSandboxConfig()) == (1, 384)
    config = api_pb2.PodSandboxConfig()
    config.linux.resources.memory_limit_in_bytes = 1024 * 1024 * 1024
    config.linux.resources.cpu_quota = 150000
    config.linux.resources.cpu_period = 100000
    vcpus, memory = vm_size(handler, config)
    assert memory == 1024 + 128
    assert 1 <= vcpus <= 2  # capped at the host's CPUs


def test_guest_interface_and_routes() -> None:
    net = GuestNetwork(
        tap_name="tap0_crivm", mac="0a:58:0a:5b:00:02", mtu=1450,
        addresses=(ipaddress.ip_interface("10.91.0.2/16"),),
        routes=(GuestRoute("0.0.0.0/0", "10.91.0.1"), GuestRoute("10.0.0.0/8")),
    )
    nic = guest_network.interface(net)
    assert (nic.mac, nic.name, nic.mtu) == ("0a:58:0a:5b:00:02", "eth0", 1450)
    assert [(a.address, a.prefix_len) for a in nic.addresses] == [("10.91.0.2", 16)]
    routes = guest_network.routes(net)
    assert [(r.destination, r.gateway, r.device) for r in routes] == [
        ("default", "10.91.0.1", "eth0"), ("10.0.0.0/8", "", "eth0")]


def test_supervisor_vm_config(tmp_path: Path) -> None:
    spec = VmSpec(name="pod1", pod_dir=str(tmp_path), qemu_path="/usr/bin/qemu-system-x86_64",
                  virtiofsd_path="/usr/lib/qemu/virtiofsd", kernel="/k", initrd="/i",
                  vcpus=2, memory_mb=512, tap_name="tap0_crivm", mac="0a:58:0a:5b:00:02")
    assert VmSpec.from_json(spec.to_json()) == spec
    argv = " ".join(build_argv(spec.qemu_path, vm_config(spec)))
    assert "size=512M" in argv and "-smp 2" in argv
    assert "ifname=tap0_crivm" in argv and "mac=0a:58:0a:5b:00:02" in argv
    assert f"path={tmp_path}/agent.sock" in argv and "tag=crivm-shared" in argv
    assert "virtio-balloon-pci,id=balloon0,free-page-reporting=on" in argv
    no_nic = vm_config(VmSpec(name="p", pod_dir="/d", qemu_path="q", virtiofsd_path="v",
                              kernel="/k", initrd="/i", free_page_reporting=False))
    assert no_nic.networks == ()
    assert no_nic.balloon is None


def test_shim_launcher_runs_this_crivm(tmp_path: Path) -> None:
    launcher = write_launcher(str(tmp_path))
    assert Path(launcher).read_text().startswith(f"#!{sys.executable}\n")
    result = subprocess.run([launcher, "--version"], capture_output=True, text=True,  # noqa: S603
                            timeout=60, check=True)
    assert result.stdout.startswith("crivm-shim version")
