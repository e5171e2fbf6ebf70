"""Host memory of an idle guest-image VM (agent running) beside the idle busybox floor.

    sudo python3 -m bench.vm_memory [--runs 2] [--tb-size 64 16] [--balloon off on]
                                    [--memory 256] [--settle 15]

Each variant (TCG translation-cache size x free page reporting) boots two VMs per run, one
after the other, on the same QEMU, kernel, machine, guest memory size, accelerator and devices:
- the floor: an initramfs holding only a static busybox whose init prints a line and sleeps;
- the guest image: the real initramfs, until its agent answers Check over virtio-serial.
After ``--settle`` seconds of idling, it sums PSS (and its anonymous / file / shmem parts) from
/proc/<pid>/smaps_rollup over QEMU and virtiofsd. Guest RAM is a shared memfd, so the guest's
touched pages show up as shmem. The medians go to stdout and, with --write, to the
"VM memory: guest image vs floor" section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
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


async def measure(work: Path, name: str, machine: MachineType, accel: AccelKind, kernel: Path,
                  initrd: Path, variant: Variant, memory_mb: int, settle_s: float,
                  agent: bool) -> dict[str, int]:
    fs = await _start_share(work, name)
    config = vm_config(work, name, machine, accel, kernel, initrd, fs.socket_path,
                       memory_mb=memory_mb, tb_size_mb=variant.tb_size_mb)
    if variant.balloon:
        config = replace(config, balloon=Balloon())
    vm = await QemuVm.launch(QEMU, config, work / f"{name}-qemu.err")
    try:
        if agent:
            assert isinstance(config.agent, VirtioSerialAgent)
            async with AgentClient(config.agent.socket_path, call_timeout=30) as client:
                await client.wait_ready(TIMEOUT_S)
                # Stay connected while idling, as the pod's supervisor does.
                await asyncio.sleep(settle_s)
                return rollup_kib(vm_pids(vm, fs.socket_path))
        await vm.wait_for_console(IDLE_MARKER, TIMEOUT_S)
        await asyncio.sleep(settle_s)
        return rollup_kib(vm_pids(vm, fs.socket_path))
    finally:
        await vm.kill()
        await fs.stop()


def _mib(values: list[int]) -> str:
    return f"{statistics.median(values) / 1024:.1f}" if values else "-"


def report(results: dict[Variant, Readings], args: argparse.Namespace, image: BuildResult,
           load: tuple[float, float]) -> str:
    lines = [
        SECTION,
        "",
        f"Measured by `python3 -m bench.vm_memory --runs {args.runs} --tb-size "
        f"{' '.join(map(str, args.tb_size))} --balloon {' '.join(args.balloon)} --memory "
        f"{args.memory} --settle {args.settle:g}` ({time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} host cores, accel **{args.accel}**, machine {args.machine}, "
        f"{args.runs} runs per row, medians). Guest: kernel {image.kernel_version}, initrd "
        f"{image.initrd_bytes / 2**20:.1f} MiB, 1 vCPU, {args.memory} MiB. Load average (1 min) "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end.",
        "",
        "PSS in MiB of QEMU + virtiofsd, read after the guest idled for "
        f"{args.settle:g} s (the image: after its agent answered Check).",
        "",
        "| variant | floor PSS | image PSS | image - floor | floor anon / file / shmem "
        "| image anon / file / shmem |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant, r in results.items():
        delta = (statistics.median(r.image["Pss"]) - statistics.median(r.floor["Pss"])) / 1024
        parts = [" / ".join(_mib(side[f]) for f in FIELDS[1:]) for side in (r.floor, r.image)]
        lines.append(f"| {variant.label} | {_mib(r.floor['Pss'])} | {_mib(r.image['Pss'])} "
                     f"| {delta:+.1f} | {parts[0]} | {parts[1]} |")
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> int:
    image = await build(args.image_dir, args.cache_dir, progress=lambda m: print(m, flush=True))
    if not image.has_agent:
        print("the guest image has no agent", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="crivm-bench-vmmem-"))
    variants = [Variant(tb, balloon == "on") for tb in args.tb_size for balloon in args.balloon]
    results = {v: Readings() for v in variants}
    try:
        floor = work / "idle-initrd.img"
        busybox_initrd(floor, Path(args.busybox), IDLE_INIT)
        load_start = os.getloadavg()[0]
        for run in range(args.runs):
            for n, variant in enumerate(variants):
                name = f"{run}-{n}"
                common = (args.machine, args.accel, image.kernel)
                f = await measure(work, f"f{name}", *common, floor, variant, args.memory,
                                  args.settle, agent=False)
                i = await measure(work, f"i{name}", *common, image.initrd, variant,
                                  args.memory, args.settle, agent=True)
                for key in FIELDS:
                    results[variant].floor[key].append(f[key])
                    results[variant].image[key].append(i[key])
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
    parser.add_argument("--machine", choices=["q35", "microvm"], default="q35")
    parser.add_argument("--accel", choices=["kvm", "tcg"], default="tcg")
    parser.add_argument("--image-dir", type=Path, default=DEFAULT_IMAGE_DIR)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
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
