"""Host memory of an idle guest-image VM (agent running) beside the idle busybox floor.

    sudo python3 -m bench.vm_memory [--runs 2] [--tb-size 64 16] [--balloon off on]
                                    [--memory 256] [--settle 15] [--vms 1] [--write]

Each variant (TCG translation-cache size x free page reporting) boots these, one after the
other, on the same QEMU, kernel, machine, guest memory size, accelerator and devices:
- the floor: an initramfs holding only a static busybox whose init prints a line and sleeps;
- with free page reporting on, also that floor loading virtio_balloon (taken from the guest
  image), since without the driver the floor cannot hand freed memory back;
- the guest image: the real initramfs, until its agent answers Check over virtio-serial.
``--vms N`` runs N such VMs at once from the same files, so that the page cache behind the
kernel and initrd is split between them as it is between pods, and reports PSS per VM.
After ``--settle`` seconds of idling, it sums PSS (and its anonymous / file / shmem parts) from
/proc/<pid>/smaps_rollup over QEMU and virtiofsd. Guest RAM is a shared memfd, so the guest's
touched pages show up as shmem; QEMU maps the kernel and initrd files, which shows up as file.
The medians go to stdout and, with --write, to the "VM memory: guest image vs floor" section of
docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.memory import processes_mentioning
from bench.vm_boot import (
    DEFAULT_CACHE_DIR,
    DEFAULT_IMAGE_DIR,
    PERFORMANCE_DOC,
    QEMU,
    _start_share,
    busybox_initrd,
    vm_config,
    write_section,
)
from crivm.guestimage.build import BuildResult, build
from crivm.hypervisor.qemu.cmdline import AccelKind, Balloon, MachineType, VirtioSerialAgent
from crivm.hypervisor.qemu.vm import QemuVm
from crivm.runtime.vm_backend.agent_client import AgentClient

SECTION = "## VM memory: guest image vs floor"
IDLE_MARKER = "crivm-floor: idle"
IDLE_INIT = f"#!/bin/busybox sh\n/bin/busybox echo {IDLE_MARKER}\nexec /bin/busybox sleep 1000000\n"
TIMEOUT_S = 120.0
# smaps_rollup keys, in kB.
FIELDS = ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")


# What the floor needs for free page reporting, in load order (see /etc/crivm/modules).
BALLOON_MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                   "virtio_pci", "virtio_balloon")


def read_newc(data: bytes) -> dict[str, bytes]:
    """{path: body} of the regular files and symlinks in an uncompressed newc archive."""
    members: dict[str, bytes] = {}
    pos = 0
    while data[pos:pos + 6] == b"070701":
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        body_start = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            break
        members[name] = data[body_start:body_start + size]
        pos = (body_start + size + 3) & ~3
    return members


def balloon_floor_initrd(dest: Path, busybox: Path, image_initrd: Path) -> None:
    """The idle floor plus the guest image's virtio_balloon module and its dependencies, so that
    the floor too hands the memory it freed after boot back to the host."""
    members = read_newc(image_initrd.read_bytes())
    paths = dict(line.split() for line in members["etc/crivm/modules"].decode().splitlines())
    kver = next(name.split("/")[3] for name in members if name.startswith("usr/lib/modules/"))
    lines = ["#!/bin/busybox sh"]
    files: dict[str, bytes] = {}
    for module in BALLOON_MODULES:
        if module not in paths:
            continue  # built into this kernel
        files[f"{module}.ko"] = members[f"usr/lib/modules/{kver}/{paths[module]}"]
        lines.append(f"/bin/busybox insmod /{module}.ko")
    lines += [f"/bin/busybox echo {IDLE_MARKER}", "exec /bin/busybox sleep 1000000", ""]
    busybox_initrd(dest, busybox, "\n".join(lines), files)


@dataclass(frozen=True)
class Variant:
    tb_size_mb: int
    balloon: bool

    @property
    def label(self) -> str:
        reporting = "on" if self.balloon else "off"
        return f"tb-size {self.tb_size_mb} MiB, free page reporting {reporting}"


@dataclass
class Readings:
    """One list of per-run totals (KiB) per smaps field, for the floor and for the image."""

    floor: dict[str, list[int]] = field(default_factory=lambda: {f: [] for f in FIELDS})
    # With free page reporting on: the floor that loads virtio_balloon too.
    floor_reporting: dict[str, list[int]] = field(
        default_factory=lambda: {f: [] for f in FIELDS})
    image: dict[str, list[int]] = field(default_factory=lambda: {f: [] for f in FIELDS})


def vm_pids(vm: QemuVm, fs_socket: Path) -> set[int]:
    """QEMU and virtiofsd (with its sandboxed child). QEMU's command line names the virtiofsd
    socket too, hence a set: a pid counted twice would double its PSS."""
    return {vm.pid, *processes_mentioning(str(fs_socket))}


def rollup_kib(pids: set[int]) -> dict[str, int]:
    totals = dict.fromkeys(FIELDS, 0)
    for pid in sorted(pids):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in totals:
                totals[key] += int(rest.split()[0])
    return totals


async def _one_vm(work: Path, name: str, machine: MachineType, accel: AccelKind, kernel: Path,
                  initrd: Path, variant: Variant, memory_mb: int, settle_s: float, agent: bool,
                  together: asyncio.Barrier) -> dict[str, int]:
    fs = await _start_share(work, name)
    config = vm_config(work, name, machine, accel, kernel, initrd, fs.socket_path,
                       memory_mb=memory_mb, tb_size_mb=variant.tb_size_mb)
    config = replace(config, balloon=Balloon() if variant.balloon else None)
    vm = await QemuVm.launch(QEMU, config, work / f"{name}-qemu.err")
    try:
        async with contextlib.AsyncExitStack() as stack:
            if agent:
                assert isinstance(config.agent, VirtioSerialAgent)
                client = await stack.enter_async_context(
                    AgentClient(config.agent.socket_path, call_timeout=30))
                # Stays connected while idling, as the pod's supervisor does.
                await client.wait_ready(TIMEOUT_S)
            else:
                await vm.wait_for_console(IDLE_MARKER, TIMEOUT_S)
            async with asyncio.timeout(TIMEOUT_S):
                await together.wait()  # every VM of the group is up
            await asyncio.sleep(settle_s)
            reading = rollup_kib(vm_pids(vm, fs.socket_path))
            async with asyncio.timeout(TIMEOUT_S):
                await together.wait()  # nobody stops before everyone has read
            return reading
    finally:
        await vm.kill()
        await fs.stop()


async def measure(work: Path, name: str, machine: MachineType, accel: AccelKind, kernel: Path,
                  initrd: Path, variant: Variant, memory_mb: int, settle_s: float, agent: bool,
                  vms: int) -> dict[str, int]:
    """PSS per VM (the mean over ``vms`` VMs that run at the same time from the same kernel and
    initrd files, so the page cache behind those files is split between them)."""
    together = asyncio.Barrier(vms)
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(_one_vm(work, f"{name}-{i}", machine, accel, kernel, initrd,
                                           variant, memory_mb, settle_s, agent, together))
                 for i in range(vms)]
    readings = [task.result() for task in tasks]
    return {key: sum(r[key] for r in readings) // vms for key in FIELDS}


def _mib(values: list[int]) -> str:
    return f"{statistics.median(values) / 1024:.1f}" if values else "-"


def report(results: dict[Variant, Readings], args: argparse.Namespace, image: BuildResult,
           load: tuple[float, float]) -> str:
    lines = [
        SECTION,
        "",
        f"Measured by `python3 -m bench.vm_memory --runs {args.runs} --tb-size "
        f"{' '.join(map(str, args.tb_size))} --balloon {' '.join(args.balloon)} --memory "
        f"{args.memory} --settle {args.settle:g} --vms {args.vms}"
        f"{' --prebuilt --image-dir ' + str(args.image_dir) if args.prebuilt else ''}` "
        f"({time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} host cores, accel **{args.accel}**, machine {args.machine}, "
        f"{args.runs} runs per row, medians). Guest: kernel {image.kernel_version}, initrd "
        f"{image.initrd_bytes / 2**20:.1f} MiB, 1 vCPU, {args.memory} MiB. Load average (1 min) "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end.",
        "",
        f"PSS in MiB of QEMU + virtiofsd per VM ({args.vms} at a time), read after the guest "
        f"idled for {args.settle:g} s (the image: after its agent answered Check).",
        "",
        "| variant | floor | floor + virtio_balloon | image | image - floor "
        "| image - floor + virtio_balloon | anon / file / shmem: floor, image |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for variant, r in results.items():
        image_pss = statistics.median(r.image["Pss"])
        deltas = [f"{(image_pss - statistics.median(side['Pss'])) / 1024:+.1f}"
                  if side["Pss"] else "-" for side in (r.floor, r.floor_reporting)]
        parts = ["/".join(_mib(side[f]) for f in FIELDS[1:]) for side in (r.floor, r.image)]
        lines.append(f"| {variant.label} | {_mib(r.floor['Pss'])} "
                     f"| {_mib(r.floor_reporting['Pss'])} | {_mib(r.image['Pss'])} "
                     f"| {deltas[0]} | {deltas[1]} | {parts[0]}, {parts[1]} |")
    return "\n".join(lines) + "\n"


def prebuilt(image_dir: Path) -> BuildResult:
    """An image built earlier (e.g. by an older checkout, for a before/after comparison)."""
    manifest = json.loads((image_dir / "manifest.json").read_text())
    initrd = image_dir / "initrd.img"
    return BuildResult(image_dir / "vmlinuz", initrd, image_dir / "manifest.json",
                       manifest["kernel_version"], initrd.stat().st_size, 0.0, cached=True,
                       has_agent=bool(manifest.get("agent_files")))


async def main_async(args: argparse.Namespace) -> int:
    if args.prebuilt:
        image = prebuilt(args.image_dir)
    else:
        image = await build(args.image_dir, args.cache_dir,
                            progress=lambda m: print(m, flush=True))
    if not image.has_agent:
        print("the guest image has no agent", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="crivm-bench-vmmem-"))
    variants = [Variant(tb, balloon == "on") for tb in args.tb_size for balloon in args.balloon]
    results = {v: Readings() for v in variants}
    try:
        floor, floor_reporting = work / "idle-initrd.img", work / "idle-balloon-initrd.img"
        busybox_initrd(floor, Path(args.busybox), IDLE_INIT)
        balloon_floor_initrd(floor_reporting, Path(args.busybox), image.initrd)
        load_start = os.getloadavg()[0]
        for run in range(args.runs):
            for n, variant in enumerate(variants):
                name = f"{run}-{n}"
                common = (args.machine, args.accel, image.kernel)
                f = await measure(work, f"f{name}", *common, floor, variant, args.memory,
                                  args.settle, agent=False, vms=args.vms)
                i = await measure(work, f"i{name}", *common, image.initrd, variant,
                                  args.memory, args.settle, agent=True, vms=args.vms)
                for key in FIELDS:
                    results[variant].floor[key].append(f[key])
                    results[variant].image[key].append(i[key])
                if variant.balloon:
                    fr = await measure(work, f"r{name}", *common, floor_reporting, variant,
                                       args.memory, args.settle, agent=False, vms=args.vms)
                    for key in FIELDS:
                        results[variant].floor_reporting[key].append(fr[key])
                print(f"run {run + 1}/{args.runs} {variant.label}: floor {f['Pss'] / 1024:.1f} "
                      f"MiB, image {i['Pss'] / 1024:.1f} MiB PSS", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = report(results, args, image, (load_start, os.getloadavg()[0]))
    print(section)
    if args.write:
        write_section(args.doc, section, SECTION)
        print(f"wrote the {SECTION[3:]!r} section of {args.doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.vm_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--tb-size", type=int, nargs="+", default=[64, 16])
    parser.add_argument("--balloon", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--memory", type=int, default=256, help="guest MiB")
    parser.add_argument("--settle", type=float, default=15.0, help="idle seconds before reading")
    parser.add_argument("--vms", type=int, default=1,
                        help="VMs per measurement, running at once; PSS is per VM")
    parser.add_argument("--machine", choices=["q35", "microvm"], default="q35")
    parser.add_argument("--accel", choices=["kvm", "tcg"], default="tcg")
    parser.add_argument("--image-dir", type=Path, default=DEFAULT_IMAGE_DIR)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--prebuilt", action="store_true",
                        help="use the image in --image-dir as it is, without building")
    parser.add_argument("--busybox", default="/bin/busybox")
    parser.add_argument("--doc", type=Path, default=PERFORMANCE_DOC)
    parser.add_argument("--write", action="store_true", help="update docs/performance.md")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.vm_memory needs root (virtiofsd namespaces)", file=sys.stderr)
        return 2
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
