"""The QEMU command line as data: frozen dataclasses in, argv out, with no I/O.

Each device renders itself for the machine type, because q35 takes ``virtio-*-pci`` devices and
microvm takes the ``virtio-*-device`` (virtio-mmio) variants of the same device. Everything here
can be tested without QEMU; running and controlling the VM live in ``vm.py`` and ``qmp.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

MachineType = Literal["q35", "microvm"]
AccelKind = Literal["kvm", "tcg"]

MEMORY_BACKEND_ID = "mem0"
USR_BACKEND_ID = "usr0-mem"
CONSOLE_ID = "console0"
QMP_ID = "qmp0"
AGENT_PORT_NAME = "agent.0"
AGENT_VSOCK_PORT = 1024


def _opts(head: str, **props: str | int | bool | None) -> str:
    """``head,key=value,...`` with booleans as on/off; None values are left out."""
    parts = [head]
    for key, value in props.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        text = str(value)
        if "," in text:
            # QEMU escapes a comma inside an option value by doubling it.
            text = text.replace(",", ",,")
        parts.append(f"{key.replace('_', '-')}={text}")
    return ",".join(parts)


def virtio_driver(base: str, machine: MachineType) -> str:
    """``virtio-net`` -> ``virtio-net-pci`` on q35, ``virtio-net-device`` on microvm."""
    return f"{base}-device" if machine == "microvm" else f"{base}-pci"


@dataclass(frozen=True)
class Machine:
    type: MachineType = "q35"
    accel: AccelKind = "tcg"
    # TCG translation cache in MiB; 0 keeps QEMU's default (which is large, so pods lower it).
    tcg_tb_size_mb: int = 0
    # Host TSC rate, given to a microvm guest (see kernel_cmdline); 0 leaves it to calibration.
    tsc_khz: int = 0

    def argv(self) -> list[str]:
        if self.type == "microvm":
            # The guest finds virtio-mmio devices through ACPI; no PCI, no option ROMs. The PIT
            # and PIC stay: Debian's kernel hangs before its first console line without them.
            machine = _opts("microvm", memory_backend=MEMORY_BACKEND_ID, x_option_roms=False,
                            isa_serial=True, pcie=False, rtc=True)
        else:
            # Devices nobody uses cost probe time under TCG.
            machine = _opts("q35", memory_backend=MEMORY_BACKEND_ID, smbus=False, sata=False,
                            vmport="off", usb=False)
        argv = ["-machine", machine]
        if self.type == "microvm":
            # virtio-mmio defaults to the legacy (v1) interface, which virtiofsd's libvhost-user
            # rejects; modern mmio works for every device here.
            argv += ["-global", "virtio-mmio.force-legacy=false"]
        if self.accel == "kvm":
            return [*argv, "-accel", "kvm", "-cpu", "host"]
        accel = _opts("tcg", tb_size=self.tcg_tb_size_mb or None)
        return [*argv, "-accel", accel, "-cpu", "max"]


@dataclass(frozen=True)
class Kernel:
    path: str
    initrd: str
    cmdline: str

    def argv(self) -> list[str]:
        return ["-kernel", self.path, "-initrd", self.initrd, "-append", self.cmdline]


@dataclass(frozen=True)
class Memory:
    """Guest RAM as a shared memfd: vhost-user devices (virtiofsd) map it from another process."""

    size_mb: int
    vcpus: int = 1

    def argv(self, device_bytes: int = 0) -> list[str]:
        """``device_bytes``: room for memory devices (virtio-pmem) beside RAM, in one slot."""
        backend = _opts("memory-backend-memfd", id=MEMORY_BACKEND_ID, size=f"{self.size_mb}M",
                        share=True)
        size = f"{self.size_mb}M"
        if device_bytes:
            size += f",slots=1,maxmem={self.size_mb + -(-device_bytes // 2**20)}M"
        return ["-object", backend, "-m", size, "-smp", str(self.vcpus)]


@dataclass(frozen=True)
class UsrImage:
    """The guest's /usr: a read-only filesystem image on virtio-pmem (q35 only), which the guest
    mounts with DAX and so reads in place instead of keeping a copy in its RAM.

    QEMU opens the file read-only and maps it private: the pages are the host's page cache of
    the file, shared by every VM that maps it, and a guest that writes to its device changes
    nothing outside itself.
    """

    path: str
    size_bytes: int

    # The device sits in memory-hotplug space above 4 GiB, so the guest kernel would reserve
    # 64 MiB of bounce buffers for 32-bit DMA; no device here needs them (virtio without an
    # IOMMU uses guest-physical addresses), and they cost 64 MiB of host memory per VM.
    kernel_args: ClassVar[tuple[str, ...]] = ("crivm.usr=pmem", "swiotlb=noforce")

    def argv(self, machine: MachineType) -> list[str]:
        if machine != "q35":
            raise ValueError("virtio-pmem needs the q35 machine")
        return [
            "-object", _opts("memory-backend-file", id=USR_BACKEND_ID, mem_path=self.path,
                             size=self.size_bytes, share=False, readonly=True),
            "-device", _opts("virtio-pmem-pci", id="usr0", memdev=USR_BACKEND_ID),
        ]


@dataclass(frozen=True)
class VirtioFs:
    """A vhost-user-fs device served by virtiofsd on ``socket_path``; the guest mounts ``tag``."""

    id: str
    socket_path: str
    tag: str
    queue_size: int = 1024

    def argv(self, machine: MachineType) -> list[str]:
        chardev = f"{self.id}-sock"
        return [
            "-chardev", _opts("socket", id=chardev, path=self.socket_path),
            "-device", _opts(virtio_driver("vhost-user-fs", machine), id=self.id,
                             chardev=chardev, tag=self.tag, queue_size=self.queue_size),
        ]


@dataclass(frozen=True)
class VirtioSerialAgent:
    """The agent channel as a named virtio-serial port; the host side is a listening socket."""

    socket_path: str
    port_name: str = AGENT_PORT_NAME

    @property
    def kernel_arg(self) -> str:
        return f"crivm.agent=virtio-serial:{self.port_name}"

    def argv(self, machine: MachineType) -> list[str]:
        return [
            "-device", _opts(virtio_driver("virtio-serial", machine), id="vser0"),
            "-chardev", _opts("socket", id="agent0", path=self.socket_path, server=True,
                              wait=False),
            "-device", _opts("virtserialport", bus="vser0.0", chardev="agent0",
                             name=self.port_name, id="agentport0"),
        ]


@dataclass(frozen=True)
class VsockAgent:
    """The agent channel over vhost-vsock: needs /dev/vhost-vsock on the host."""

    guest_cid: int
    port: int = AGENT_VSOCK_PORT

    @property
    def kernel_arg(self) -> str:
        return f"crivm.agent=vsock:{self.port}"

    def argv(self, machine: MachineType) -> list[str]:
        return ["-device", _opts(virtio_driver("vhost-vsock", machine), id="vsock0",
                                 guest_cid=self.guest_cid)]


@dataclass(frozen=True)
class TapNetwork:
    """A tap the host made (by name, or an fd passed to QEMU) behind a virtio-net device."""

    id: str
    mac: str
    ifname: str | None = None
    fd: int | None = None

    def __post_init__(self) -> None:
        if (self.ifname is None) == (self.fd is None):
            raise ValueError("TapNetwork needs exactly one of ifname and fd")

    def netdev_props(self) -> dict[str, str]:
        """The netdev as QMP ``netdev_add`` arguments (hotplug) and as the -netdev option."""
        props = {"type": "tap", "id": self.id, "script": "no", "downscript": "no",
                 "vhost": "off"}
        if self.fd is not None:
            props["fd"] = str(self.fd)
        else:
            props["ifname"] = str(self.ifname)
        return props

    def argv(self, machine: MachineType) -> list[str]:
        props = self.netdev_props()
        netdev = _opts(props.pop("type"), **props)
        return [
            "-netdev", netdev,
            "-device", _opts(virtio_driver("virtio-net", machine), id=f"{self.id}-dev",
                             netdev=self.id, mac=self.mac),
        ]


@dataclass(frozen=True)
class Console:
    """The guest serial console, appended to a per-VM log file."""

    log_path: str

    def argv(self) -> list[str]:
        return ["-chardev", _opts("file", id=CONSOLE_ID, path=self.log_path),
                "-serial", f"chardev:{CONSOLE_ID}"]


@dataclass(frozen=True)
class Qmp:
    socket_path: str

    def argv(self) -> list[str]:
        return ["-chardev", _opts("socket", id=QMP_ID, path=self.socket_path, server=True,
                                  wait=False),
                "-mon", f"chardev={QMP_ID},mode=control"]


@dataclass(frozen=True)
class Rng:
    """virtio-rng fed from the host, so the guest's getrandom() never waits for entropy."""

    source: str = "/dev/urandom"

    def argv(self, machine: MachineType) -> list[str]:
        return ["-object", _opts("rng-random", id="rng0", filename=self.source),
                "-device", _opts(virtio_driver("virtio-rng", machine), rng="rng0")]


@dataclass(frozen=True)
class Balloon:
    """virtio-balloon, used only for free page reporting: the guest reports the pages it frees
    (the initramfs after unpacking, exited processes) and QEMU drops them from guest RAM, so an
    idle VM's host memory follows what the guest really uses instead of its high-water mark."""

    free_page_reporting: bool = True

    def argv(self, machine: MachineType) -> list[str]:
        return ["-device", _opts(virtio_driver("virtio-balloon", machine), id="balloon0",
                                 free_page_reporting=self.free_page_reporting)]


# seccomp: no obsolete syscalls, no setuid, no fork/exec, no scheduler/affinity changes.
SANDBOX = _opts("on", obsolete="deny", elevateprivileges="deny", spawn="deny",
                resourcecontrol="deny")


@dataclass(frozen=True)
class VmConfig:
    name: str
    machine: Machine
    kernel_path: str
    initrd_path: str
    memory: Memory
    console: Console
    qmp: Qmp
    agent: VirtioSerialAgent | VsockAgent
    filesystems: tuple[VirtioFs, ...] = ()
    networks: tuple[TapNetwork, ...] = ()
    rng: Rng | None = field(default_factory=Rng)
    # Free page reporting returns what the guest freed (its initramfs copy, exited processes):
    # about 30 MiB less host memory per idle VM (bench/vm_memory.py). Pod VMs have it (the vm
    # handler's free_page_reporting); other VMs opt in.
    balloon: Balloon | None = None
    usr: UsrImage | None = None
    extra_kernel_args: tuple[str, ...] = ()
    pidfile: str | None = None
    sandbox: bool = True
    # Empty PCIe root ports (q35 only) for QMP device_add later: the root bus itself does not
    # take hotplugged devices. Ports are named hotplug0, hotplug1, ...
    hotplug_ports: int = 0


def hotplug_port_id(index: int) -> str:
    return f"hotplug{index}"


def _hotplug_argv(config: VmConfig) -> list[str]:
    if config.hotplug_ports and config.machine.type != "q35":
        raise ValueError("hotplug ports need the q35 machine; microvm has no PCIe")
    argv: list[str] = []
    for index in range(config.hotplug_ports):
        argv += ["-device", _opts("pcie-root-port", id=hotplug_port_id(index), bus="pcie.0",
                                  chassis=index + 1)]
    return argv


# Skip probes that find nothing in these VMs: no PS/2 keyboard or mouse, no self-tests of
# crypto algorithms, no IO-APIC timer check. Under TCG this saves about a second of boot.
_FAST_BOOT_ARGS = ("i8042.noaux=1", "i8042.nokbd=1", "i8042.nopnp=1", "cryptomgr.notests",
                   "no_timer_check", "rcupdate.rcu_expedited=1")


def kernel_cmdline(config: VmConfig) -> str:
    # panic=-1 turns a guest panic into a reboot, which -no-reboot turns into QEMU exiting.
    args = ["console=ttyS0", "panic=-1", "quiet", *_FAST_BOOT_ARGS, config.agent.kernel_arg]
    if config.machine.type == "microvm":
        # No PCI probing on microvm; reboot through the keyboard controller is absent too.
        args += ["pci=off", "reboot=t"]
        if config.machine.tsc_khz:
            # microvm has no HPET or PM timer. Under a loaded TCG host the kernel's PIT
            # calibration of the TSC fails and boot then hangs; the known rate avoids both.
            args.append(f"tsc_early_khz={config.machine.tsc_khz}")
    if config.usr is not None:
        args += config.usr.kernel_args
    args += config.extra_kernel_args
    return " ".join(args)


def build_argv(qemu_path: str, config: VmConfig) -> list[str]:
    """The full QEMU argv for ``config``."""
    machine = config.machine.type
    argv = [qemu_path, "-name", _opts(config.name, debug_threads=True),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    if config.sandbox:
        argv += ["-sandbox", SANDBOX]
    argv += config.machine.argv()
    argv += config.memory.argv(config.usr.size_bytes if config.usr is not None else 0)
    argv += Kernel(config.kernel_path, config.initrd_path, kernel_cmdline(config)).argv()
    argv += config.console.argv()
    argv += config.qmp.argv()
    argv += config.agent.argv(machine)
    for fs in config.filesystems:
        argv += fs.argv(machine)
    for net in config.networks:
        argv += net.argv(machine)
    if config.rng is not None:
        argv += config.rng.argv(machine)
    if config.balloon is not None:
        argv += config.balloon.argv(machine)
    if config.usr is not None:
        argv += config.usr.argv(machine)
    argv += _hotplug_argv(config)
    if config.pidfile:
        argv += ["-pidfile", config.pidfile]
    return argv
