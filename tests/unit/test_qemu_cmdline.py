"""The QEMU argv builder, checked without running QEMU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from crivm.hypervisor.qemu import accel
from crivm.hypervisor.qemu.cmdline import (
    Balloon,
    Console,
    Machine,
    Memory,
    Qmp,
    Rng,
    TapNetwork,
    UsrImage,
    VirtioFs,
    VirtioSerialAgent,
    VmConfig,
    VsockAgent,
    build_argv,
    kernel_cmdline,
)
from crivm.hypervisor.qemu.owner import die_with_owner
from crivm.hypervisor.qemu.virtiofsd import virtiofsd_argv
from crivm.hypervisor.qemu.vm import with_host_facts


def _config(**overrides: object) -> VmConfig:
    fields: dict[str, object] = dict(
        name="pod1",
        machine=Machine("q35", "tcg", tcg_tb_size_mb=64),
        kernel_path="/g/vmlinuz",
        initrd_path="/g/initrd.img",
        memory=Memory(384, vcpus=2),
        console=Console("/run/vm/console.log"),
        qmp=Qmp("/run/vm/qmp.sock"),
        agent=VirtioSerialAgent("/run/vm/agent.sock"),
    )
    fields.update(overrides)
    return VmConfig(**fields)  # type: ignore[arg-type]


def _values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_base_flags_and_sandbox() -> None:
    argv = build_argv("/usr/bin/qemu-system-x86_64", _config())
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert _values(argv, "-display") == ["none"]
    [sandbox] = _values(argv, "-sandbox")
    assert sandbox.startswith("on,")
    assert "spawn=deny" in sandbox and "elevateprivileges=deny" in sandbox
    assert "-sandbox" not in build_argv("qemu", _config(sandbox=False))


def test_q35_tcg_machine_memory_is_shared_memfd() -> None:
    argv = build_argv("qemu", _config())
    [machine] = _values(argv, "-machine")
    assert machine.startswith("q35,") and "memory-backend=mem0" in machine
    assert _values(argv, "-accel") == ["tcg,tb-size=64"]
    assert _values(argv, "-cpu") == ["max"]
    assert "memory-backend-memfd,id=mem0,size=384M,share=on" in _values(argv, "-object")
    assert _values(argv, "-m") == ["384M"]
    assert _values(argv, "-smp") == ["2"]


def test_kvm_uses_host_cpu_and_no_tb_size() -> None:
    argv = build_argv("qemu", _config(machine=Machine("q35", "kvm", tcg_tb_size_mb=64)))
    assert _values(argv, "-accel") == ["kvm"]
    assert _values(argv, "-cpu") == ["host"]


def test_tcg_default_tb_size_is_left_out() -> None:
    argv = build_argv("qemu", _config(machine=Machine("q35", "tcg")))
    assert _values(argv, "-accel") == ["tcg"]


def test_kernel_console_qmp() -> None:
    argv = build_argv("qemu", _config())
    assert _values(argv, "-kernel") == ["/g/vmlinuz"]
    assert _values(argv, "-initrd") == ["/g/initrd.img"]
    [append] = _values(argv, "-append")
    assert "console=ttyS0" in append.split()
    assert "crivm.agent=virtio-serial:agent.0" in append.split()
    chardevs = _values(argv, "-chardev")
    assert "file,id=console0,path=/run/vm/console.log" in chardevs
    assert _values(argv, "-serial") == ["chardev:console0"]
    assert "socket,id=qmp0,path=/run/vm/qmp.sock,server=on,wait=off" in chardevs
    assert _values(argv, "-mon") == ["chardev=qmp0,mode=control"]


def test_virtio_serial_agent_on_q35() -> None:
    argv = build_argv("qemu", _config())
    devices = _values(argv, "-device")
    assert "virtio-serial-pci,id=vser0" in devices
    assert "virtserialport,bus=vser0.0,chardev=agent0,name=agent.0,id=agentport0" in devices
    assert ("socket,id=agent0,path=/run/vm/agent.sock,server=on,wait=off"
            in _values(argv, "-chardev"))


def test_vsock_agent() -> None:
    config = _config(agent=VsockAgent(guest_cid=42))
    argv = build_argv("qemu", config)
    assert "vhost-vsock-pci,id=vsock0,guest-cid=42" in _values(argv, "-device")
    assert "crivm.agent=vsock:1024" in kernel_cmdline(config).split()


def test_virtiofs_device() -> None:
    argv = build_argv("qemu", _config(filesystems=(VirtioFs("fs0", "/run/vm/fs0.sock", "rootfs"),)))
    assert "socket,id=fs0-sock,path=/run/vm/fs0.sock" in _values(argv, "-chardev")
    assert ("vhost-user-fs-pci,id=fs0,chardev=fs0-sock,tag=rootfs,queue-size=1024"
            in _values(argv, "-device"))


def test_tap_by_name_and_by_fd() -> None:
    by_name = TapNetwork("net0", "02:00:00:00:00:01", ifname="tap0")
    by_fd = TapNetwork("net1", "02:00:00:00:00:02", fd=7)
    argv = build_argv("qemu", _config(networks=(by_name, by_fd)))
    netdevs = _values(argv, "-netdev")
    assert netdevs == [
        "tap,id=net0,script=no,downscript=no,vhost=off,ifname=tap0",
        "tap,id=net1,script=no,downscript=no,vhost=off,fd=7",
    ]
    devices = _values(argv, "-device")
    assert "virtio-net-pci,id=net0-dev,netdev=net0,mac=02:00:00:00:00:01" in devices
    with pytest.raises(ValueError):
        TapNetwork("net2", "02:00:00:00:00:03")
    with pytest.raises(ValueError):
        TapNetwork("net2", "02:00:00:00:00:03", ifname="tap1", fd=3)


def test_microvm_uses_mmio_devices() -> None:
    config = _config(
        machine=Machine("microvm", "tcg", tsc_khz=2_600_000),
        filesystems=(VirtioFs("fs0", "/s", "rootfs"),),
        networks=(TapNetwork("net0", "02:00:00:00:00:01", ifname="tap0"),),
    )
    argv = build_argv("qemu", config)
    [machine] = _values(argv, "-machine")
    assert machine.startswith("microvm,")
    assert "virtio-mmio.force-legacy=false" in _values(argv, "-global")
    devices = _values(argv, "-device")
    assert not [d for d in devices if d.split(",")[0].endswith("-pci")]
    for driver in ("virtio-serial-device", "vhost-user-fs-device", "virtio-net-device",
                   "virtio-rng-device"):
        assert any(d.startswith(driver + ",") for d in devices), driver
    words = kernel_cmdline(config).split()
    assert "tsc_early_khz=2600000" in words
    # q35 has timers to calibrate against: no TSC hint there.
    assert not any(w.startswith("tsc_early_khz") for w in kernel_cmdline(_config()).split())


def test_rng_optional_and_pidfile() -> None:
    with_rng = build_argv("qemu", _config(pidfile="/run/vm/qemu.pid"))
    assert "virtio-rng-pci,rng=rng0" in _values(with_rng, "-device")
    assert _values(with_rng, "-pidfile") == ["/run/vm/qemu.pid"]
    without = build_argv("qemu", _config(rng=None))
    assert not any(d.startswith("virtio-rng") for d in _values(without, "-device"))
    assert "-pidfile" not in without
    custom = build_argv("qemu", _config(rng=Rng("/dev/random")))
    assert "rng-random,id=rng0,filename=/dev/random" in _values(custom, "-object")


def test_balloon_with_free_page_reporting_per_machine() -> None:
    without = build_argv("qemu", _config())
    assert not any(d.startswith("virtio-balloon") for d in _values(without, "-device"))
    q35 = build_argv("qemu", _config(balloon=Balloon()))
    assert "virtio-balloon-pci,id=balloon0,free-page-reporting=on" in _values(q35, "-device")
    microvm = build_argv("qemu", _config(machine=Machine("microvm", "tcg"), balloon=Balloon()))
    assert "virtio-balloon-device,id=balloon0,free-page-reporting=on" in _values(microvm,
                                                                                 "-device")


def test_usr_image_on_virtio_pmem() -> None:
    plain = build_argv("qemu", _config())
    assert _values(plain, "-m") == ["384M"]
    assert "crivm.usr" not in kernel_cmdline(_config())
    config = _config(usr=UsrImage("/g/usr.img", 34 * 2**20 + 1))
    argv = build_argv("qemu", config)
    # One slot of hotplug space beside RAM, big enough for the image (rounded up to MiB).
    assert _values(argv, "-m") == ["384M,slots=1,maxmem=419M"]
    assert ("memory-backend-file,id=usr0-mem,mem-path=/g/usr.img,size=35651585,share=off,"
            "readonly=on") in _values(argv, "-object")
    assert "virtio-pmem-pci,id=usr0,memdev=usr0-mem" in _values(argv, "-device")
    words = kernel_cmdline(config).split()
    assert "crivm.usr=pmem" in words and "swiotlb=noforce" in words
    with pytest.raises(ValueError, match="q35"):
        build_argv("qemu", _config(machine=Machine("microvm", "tcg"),
                                   usr=UsrImage("/g/usr.img", 2**21)))


def test_hotplug_ports_on_q35_only() -> None:
    argv = build_argv("qemu", _config(hotplug_ports=2))
    ports = [d for d in _values(argv, "-device") if d.startswith("pcie-root-port")]
    assert ports == ["pcie-root-port,id=hotplug0,bus=pcie.0,chassis=1",
                     "pcie-root-port,id=hotplug1,bus=pcie.0,chassis=2"]
    with pytest.raises(ValueError):
        build_argv("qemu", _config(machine=Machine("microvm"), hotplug_ports=1))


def test_commas_in_values_are_escaped() -> None:
    argv = build_argv("qemu", _config(console=Console("/run/a,b/console.log")))
    assert "file,id=console0,path=/run/a,,b/console.log" in _values(argv, "-chardev")


def test_extra_kernel_args_come_last() -> None:
    config = _config(extra_kernel_args=("loglevel=7",))
    assert kernel_cmdline(config).split()[-1] == "loglevel=7"


def test_owner_prefix_and_virtiofsd_argv() -> None:
    assert die_with_owner(["qemu", "-x"]) == [
        "/usr/bin/setpriv", "--pdeathsig", "KILL", "--", "qemu", "-x"]
    argv = virtiofsd_argv("/usr/lib/qemu/virtiofsd", "/srv/rootfs", "/run/vm/fs.sock")
    assert argv[0] == "/usr/lib/qemu/virtiofsd"
    assert "--socket-path=/run/vm/fs.sock" in argv
    assert "source=/srv/rootfs" in argv and "sandbox=namespace" in argv


async def test_accel_override_skips_the_probe(tmp_path: Path) -> None:
    # No probe runs: the qemu path does not even exist.
    assert await accel.choose_accel("tcg", "/nonexistent/qemu", tmp_path) == "tcg"
    assert await accel.choose_accel("kvm", "/nonexistent/qemu", tmp_path) == "kvm"
    assert not (tmp_path / accel.CACHE_FILE).exists()


async def test_accel_auto_uses_cached_answer(tmp_path: Path) -> None:
    key = {"qemu": "/nonexistent/qemu", "host_kernel": os.uname().release}
    (tmp_path / accel.CACHE_FILE).write_text(json.dumps({"key": key, "accel": "kvm"}))
    assert await accel.choose_accel("auto", "/nonexistent/qemu", tmp_path) == "kvm"


async def test_accel_auto_probes_and_caches(tmp_path: Path) -> None:
    # A missing qemu makes the probe fail fast, so auto falls back to TCG and remembers it.
    assert await accel.choose_accel("auto", "/nonexistent/qemu", tmp_path) == "tcg"
    cached = json.loads((tmp_path / accel.CACHE_FILE).read_text())
    assert cached["accel"] == "tcg"


def test_agent_transport_choice(tmp_path: Path) -> None:
    present, absent = tmp_path / "vhost-vsock", tmp_path / "missing"
    present.touch()
    assert accel.choose_agent_transport("auto", present) == "vsock"
    assert accel.choose_agent_transport("auto", absent) == "virtio-serial"
    assert accel.choose_agent_transport("virtio-serial", present) == "virtio-serial"
    assert accel.choose_agent_transport("vsock", absent) == "vsock"


def test_host_tsc_khz(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 2596.136\n")
    assert accel.host_tsc_khz(cpuinfo) == 2596136
    cpuinfo.write_text("processor\t: 0\n")
    assert accel.host_tsc_khz(cpuinfo) == 0
    assert accel.host_tsc_khz(tmp_path / "absent") == 0


def test_launch_fills_in_the_tsc_rate_for_microvm_under_tcg() -> None:
    if accel.host_tsc_khz() == 0:
        pytest.skip("/proc/cpuinfo reports no cpu MHz here")
    filled = with_host_facts(_config(machine=Machine("microvm", "tcg")))
    assert filled.machine.tsc_khz == accel.host_tsc_khz()
    explicit = _config(machine=Machine("microvm", "tcg", tsc_khz=1234))
    assert with_host_facts(explicit) == explicit
    for machine in (Machine("q35", "tcg"), Machine("microvm", "kvm")):
        assert with_host_facts(_config(machine=machine)).machine.tsc_khz == 0
