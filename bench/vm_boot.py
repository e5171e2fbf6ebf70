"""VM boot benchmark: QEMU start to agent ready, beside the bare-kernel floor of the same run.

    python3 -m bench.vm_boot [--runs N] [--machine q35 microvm] [--image-dir DIR]

For every run, on the same kernel, accelerator, machine type and device set, it measures:
- the floor: QEMU start until QEMU exits, booting an initramfs whose only content is a static
  busybox with an init that runs ``poweroff -f``;
- the guest image: QEMU start until init prints its marker, and until the agent answers its
  health check over the agent channel (virtio-serial here), as the vm backend would see it.

Floor and image runs alternate so that drift in host load hits both. The medians go to stdout
and to the "VM boot" section of docs/performance.md; other sections of that file are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import stat
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from crivm.guestimage import cpio, elf
from crivm.guestimage.build import BuildResult, build
from crivm.guestimage.init_script import INIT_DONE_MARKER
from crivm.hypervisor.qemu import accel as accelmod
from crivm.hypervisor.qemu import virtiofsd
from crivm.hypervisor.qemu.cmdline import (
    AccelKind,
    Console,
    Machine,
    MachineType,
    Memory,
    Qmp,
    VirtioFs,
    VirtioSerialAgent,
    VmConfig,
)
from crivm.hypervisor.qemu.vm import QemuVm
from crivm.runtime.vm_backend.agent_client import AgentClient

QEMU = "/usr/bin/qemu-system-x86_64"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
DEFAULT_IMAGE_DIR = Path("/var/tmp/crivm-guest-cache/out")
DEFAULT_CACHE_DIR = Path("/var/tmp/crivm-guest-cache")
PERFORMANCE_DOC = Path(__file__).resolve().parents[1] / "docs/performance.md"
SECTION = "## VM boot"
TIMEOUT_S = 120.0
FLOOR_MARKER = "crivm-floor: init"
FLOOR_INIT = f"#!/bin/busybox sh\n/bin/busybox echo {FLOOR_MARKER}\n/bin/busybox poweroff -f\n"
AGENT_LISTENING_MARKER = "serving on"


@dataclass
class Samples:
    floor_init: list[float] = field(default_factory=list)
    floor_exit: list[float] = field(default_factory=list)
    init: list[float] = field(default_factory=list)
    listening: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)


def busybox_initrd(dest: Path, busybox: Path, init: str,
                   files: dict[str, bytes] | None = None) -> None:
    """An uncompressed initramfs holding /bin/busybox, ``init`` as /init, and ``files`` (by path
    relative to /)."""
    if elf.needed_libraries(busybox):
        raise SystemExit(f"{busybox} is not static; install busybox-static")
    entries = [
        cpio.Entry("bin", stat.S_IFDIR | 0o755),
        cpio.Entry("bin/busybox", stat.S_IFREG | 0o755, data=busybox.read_bytes()),
        cpio.Entry("dev", stat.S_IFDIR | 0o755),
        cpio.Entry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1),
        cpio.Entry("init", stat.S_IFREG | 0o755, data=init.encode()),
        *(cpio.Entry(path, stat.S_IFREG | 0o644, data=data)
          for path, data in (files or {}).items()),
    ]
    out = io.BytesIO()
    cpio.write_archive(out, entries)
    dest.write_bytes(out.getvalue())


def floor_initrd(dest: Path, busybox: Path) -> None:
    """The boot floor: an init that prints its marker and powers off at once."""
    busybox_initrd(dest, busybox, FLOOR_INIT)


def vm_config(work: Path, name: str, machine: MachineType, accel: AccelKind, kernel: Path,
              initrd: Path, fs_socket: str | os.PathLike[str], *, memory_mb: int = 256,
              tb_size_mb: int = 64) -> VmConfig:
    return VmConfig(
        name=name,
        machine=Machine(machine, accel, tcg_tb_size_mb=tb_size_mb,
                        tsc_khz=accelmod.host_tsc_khz()),
        kernel_path=str(kernel), initrd_path=str(initrd), memory=Memory(memory_mb),
        console=Console(str(work / f"{name}-console.log")),
        qmp=Qmp(str(work / f"{name}-qmp.sock")),
        agent=VirtioSerialAgent(str(work / f"{name}-agent.sock")),
        filesystems=(VirtioFs("fs0", str(fs_socket), "rootfs"),),
    )


async def _start_share(work: Path, name: str) -> virtiofsd.Virtiofsd:
    share = work / "share"
    share.mkdir(exist_ok=True)
    return await virtiofsd.start(VIRTIOFSD, share, work / f"{name}-fs.sock",
                                 work / f"{name}-fs.log")


async def run_floor(work: Path, name: str, machine: MachineType, accel: AccelKind,
                    kernel: Path, initrd: Path, samples: Samples, tb_size_mb: int = 64) -> None:
    fs = await _start_share(work, name)
    config = vm_config(work, name, machine, accel, kernel, initrd, fs.socket_path,
                       tb_size_mb=tb_size_mb)
    started = time.monotonic()
    vm = await QemuVm.launch(QEMU, config, work / f"{name}-qemu.err")
    try:
        await vm.wait_for_console(FLOOR_MARKER, TIMEOUT_S)
        samples.floor_init.append(time.monotonic() - started)
        await asyncio.wait_for(vm.process.wait(), TIMEOUT_S)
        samples.floor_exit.append(time.monotonic() - started)
    finally:
        await vm.kill()
        await fs.stop()


async def run_image(work: Path, name: str, machine: MachineType, accel: AccelKind,
                    image: BuildResult, samples: Samples, tb_size_mb: int = 64) -> None:
    fs = await _start_share(work, name)
    config = vm_config(work, name, machine, accel, image.kernel, image.initrd, fs.socket_path,
                       tb_size_mb=tb_size_mb)
    started = time.monotonic()
    vm = await QemuVm.launch(QEMU, config, work / f"{name}-qemu.err")
    try:
        if image.has_agent:
            assert isinstance(config.agent, VirtioSerialAgent)
            # The health check runs alongside the console watch, as the vm backend would run
            # it, so the console markers do not delay it.
            async with AgentClient(config.agent.socket_path, call_timeout=30) as client:
                ready = asyncio.ensure_future(client.wait_ready(TIMEOUT_S))
                await vm.wait_for_console(INIT_DONE_MARKER, TIMEOUT_S)
                samples.init.append(time.monotonic() - started)
                await vm.wait_for_console(AGENT_LISTENING_MARKER, TIMEOUT_S)
                samples.listening.append(time.monotonic() - started)
                await ready
                samples.ready.append(time.monotonic() - started)
        else:
            await vm.wait_for_console(INIT_DONE_MARKER, TIMEOUT_S)
            samples.init.append(time.monotonic() - started)
    finally:
        await vm.shutdown()
        await fs.stop()


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "-"


def _range(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def report(results: dict[str, Samples], runs: int, accel: AccelKind, image: BuildResult,
           load: tuple[float, float], tb_size_mb: int = 64) -> str:
    command = (f"python3 -m bench.vm_boot --runs {runs} --machine {' '.join(results)} "
               f"--tb-size {tb_size_mb}")
    lines = [
        SECTION,
        "",
        f"Measured by `{command}` "
        f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} host cores, accel **{accel}**, "
        f"{runs} runs per row, medians with min-max).",
        f"Guest: kernel {image.kernel_version}, initrd {image.initrd_bytes / 2**20:.1f} MiB "
        f"({image.compression}), 1 vCPU, 256 MiB, TCG translation cache {tb_size_mb} MiB, "
        "virtio-fs + virtio-serial + virtio-rng devices.",
        "",
        "| machine | floor: init runs | floor: QEMU exits | image: init done "
        "| image: agent listening | image: agent answers Check | ready minus floor init |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for machine, s in results.items():
        overhead = (f"{statistics.median(s.ready) - statistics.median(s.floor_init):.2f}"
                    if s.ready and s.floor_init else "-")
        cells = [machine] + [f"{_median(v)} ({_range(v)})" for v in
                             (s.floor_init, s.floor_exit, s.init, s.listening, s.ready)]
        lines.append("| " + " | ".join([*cells, overhead]) + " |")
    lines += ["", f"All times in seconds from QEMU start. Host load average (1 min) was "
              f"{load[0]:.1f} at the start and {load[1]:.1f} at the end; other work ran on "
              "the host at the same time, which the min-max ranges show."]
    lines += [
        "",
        "The floor is the same kernel, accelerator, machine and devices, booting an initramfs "
        "that holds only a static busybox. Its init prints a line and runs `poweroff -f`. The "
        "image columns are the guest image's `crivm-guest: init done` line, the agent's "
        "`serving on` log line (both read from the console log), and the first agent `Check` "
        "answered over virtio-serial through `AgentClient.wait_ready`, which retries at most "
        "0.2 s apart. The gap above the floor comes from unpacking a larger initramfs, loading "
        "modules, starting Python and importing the agent. Under TCG all of that is emulated.",
        "",
    ]
    return "\n".join(lines)


def write_section(doc: Path, section: str, heading: str = SECTION) -> None:
    """Replace (or append) the section under ``heading``, leaving other sections as they are."""
    text = doc.read_text() if doc.exists() else "# crivm performance\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        body = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        body = "".join(lines[:start]) + section + ("\n" if end < len(lines) else "") + \
            "".join(lines[end:])
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(body.rstrip("\n") + "\n")


async def main_async(args: argparse.Namespace) -> int:
    image = await build(args.image_dir, args.cache_dir, progress=lambda m: print(m, flush=True))
    accel = await accelmod.choose_accel(args.accel, QEMU, Path("/run/crivm-bench"))
    print(f"accel {accel}; image {image.initrd} ({image.initrd_bytes / 2**20:.1f} MiB), "
          f"agent {'present' if image.has_agent else 'absent'}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="crivm-bench-vm-"))
    results: dict[str, Samples] = {}
    try:
        floor = work / "floor-initrd.img"
        floor_initrd(floor, Path(args.busybox))
        load_start = os.getloadavg()[0]
        for machine in args.machine:
            samples = results.setdefault(machine, Samples())
            for run in range(args.runs):
                name = f"{machine}-{run}"
                await run_floor(work, f"f{name}", machine, accel, image.kernel, floor, samples,
                                args.tb_size)
                await run_image(work, f"i{name}", machine, accel, image, samples, args.tb_size)
                ready = f"{samples.ready[-1]:.2f}" if samples.ready else "-"
                print(f"{machine} run {run + 1}/{args.runs}: floor init "
                      f"{samples.floor_init[-1]:.2f} s, exit {samples.floor_exit[-1]:.2f} s; "
                      f"image init {samples.init[-1]:.2f} s, ready {ready} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = report(results, args.runs, accel, image, (load_start, os.getloadavg()[0]),
                     args.tb_size)
    print(section)
    if not args.no_write:
        write_section(args.doc, section)
        print(f"wrote the VM boot section of {args.doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.vm_boot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--machine", nargs="+", choices=["q35", "microvm"],
                        default=["q35", "microvm"])
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    parser.add_argument("--tb-size", type=int, default=64, help="TCG translation cache, MiB")
    parser.add_argument("--image-dir", type=Path, default=DEFAULT_IMAGE_DIR)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--busybox", default="/bin/busybox")
    parser.add_argument("--doc", type=Path, default=PERFORMANCE_DOC)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.vm_boot needs root (virtiofsd namespaces, apt-get download)",
              file=sys.stderr)
        return 2
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
