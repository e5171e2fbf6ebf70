"""VM pods through the CRI, beside the bare-QEMU floors measured in the same run.

    sudo python3 -m bench.vm_pods [--runs 3]

For each run, alternating so that host load drifts over all of them alike:
- a VM pod through crivm: RunPodSandbox (handler "vm") until it returns, and until its first
  container (a busybox sleeper) runs: RunPodSandbox + CreateContainer + StartContainer;
- the kernel-boot floor (bench.vm_boot's): the same QEMU, kernel, accelerator, machine, guest
  memory and devices booting a busybox-only initramfs, until its init prints a line;
- host memory: PSS of every process of the idle VM pod (QEMU, virtiofsd, supervisor, the
  container's stand-in, conmon) beside the idle floor: the same VM whose busybox init then
  sleeps; then again with EXTRA_CONTAINERS more sleepers in the pod, for the cost of one more
  container (its stand-in and conmon, and what the supervisor grows by relaying its stdio);
- the same for a pod of handler "vm-warm" (``warm_vms = 1``), which takes a VM the daemon
  booted ahead of it: the bench waits until the warm VM is ready before it starts the pod,
  and again (the pool boots the next one at once) before it moves on. The waiting warm VM's
  processes are left out of every pod's memory, and reported on their own
  (``--no-warm`` skips all of this).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import shutil
import stat
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import report
from bench.cleanup import sweep
from bench.cri_bench import RESULTS_DIR
from bench.cri_client import SLEEPER_COMMAND, TimedCri
from bench.daemons import BENCH_BRIDGE, PAUSE_IMAGE, RuntimeUnderTest, crivm_runtime, write_conflist
from bench.memory import process_memory, processes_mentioning
from bench.vm_boot import QEMU, Samples, _start_share, floor_initrd, run_floor, vm_config
from bench.workloads import SMALL_IMAGE
from crivm.guestimage import cpio, elf
from crivm.guestimage.build import DEFAULT_CACHE_DIR, DEFAULT_OUT_DIR, BuildResult, build
from crivm.hypervisor.qemu.cmdline import AccelKind, MachineType
from crivm.hypervisor.qemu.vm import QemuVm
from crivm.proto import api_pb2
from crivm.runtime.config import RuntimeHandler
from tests.fixtures import image_recipes
from tests.fixtures.images import push
from tests.fixtures.registries_conf import mirror_conf
from tests.fixtures.registry import _start_registry, _stop

log = logging.getLogger("bench.vm_pods")

MACHINE: MachineType = "q35"
ACCEL: AccelKind = "tcg"  # KVM guests do not boot on this kind of host (see DESIGN.md)
GUEST_MEMORY_MB = 256  # bench.vm_boot's floor size; crivm gets 128 + 128 overhead
# An idle TCG guest's memory keeps growing for a while after boot; read it this long after.
MEMORY_SETTLE_S = 15.0
IDLE_MARKER = "crivm-floor: idle"
IDLE_INIT = f"#!/bin/busybox sh\n/bin/busybox echo {IDLE_MARKER}\nexec /bin/busybox sleep 100000\n"
TIMEOUT_S = 240.0
EXTRA_CONTAINERS = 3

COLD, WARM = "vm", "vm-warm"
VM_HANDLER_TOML = f"""
[runtimes.{{name}}]
runtime_type = "vm"
kernel = "{{kernel}}"
initrd = "{{initrd}}"
guest_usr = "{{guest_usr}}"
usr_image = "{{usr_image}}"
machine = "{MACHINE}"
accel = "{ACCEL}"
default_memory_mb = {GUEST_MEMORY_MB - 128}
memory_overhead_mb = 128
tcg_tb_size_mb = {{tb_size}}
boot_timeout_s = {TIMEOUT_S}
warm_vms = {{warm_vms}}
"""


def idle_initrd(dest: Path, busybox: Path) -> None:
    """Like bench.vm_boot's floor initramfs, but its init sleeps instead of powering off."""
    if elf.needed_libraries(busybox):
        raise SystemExit(f"{busybox} is not static; install busybox-static")
    entries = [
        cpio.Entry("bin", stat.S_IFDIR | 0o755),
        cpio.Entry("bin/busybox", stat.S_IFREG | 0o755, data=busybox.read_bytes()),
        cpio.Entry("dev", stat.S_IFDIR | 0o755),
        cpio.Entry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1),
        cpio.Entry("init", stat.S_IFREG | 0o755, data=IDLE_INIT.encode()),
    ]
    out = io.BytesIO()
    cpio.write_archive(out, entries)
    dest.write_bytes(out.getvalue())


def pss_by_process(pids: list[int]) -> dict[str, dict[str, int]]:
    """{comm: {"count", "pss_kib", "rss_kib"}} over ``pids``."""
    groups: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "pss_kib": 0,
                                                             "rss_kib": 0})
    for pid in pids:
        memory = process_memory(pid)
        if memory is None:
            continue
        group = groups[memory.name]
        group["count"] += 1
        group["pss_kib"] += memory.pss_kib
        group["rss_kib"] += memory.rss_kib
    return dict(groups)


async def idle_floor_memory(work: Path, name: str, kernel: Path, initrd: Path,
                            tb_size_mb: int) -> dict[str, dict[str, int]]:
    fs = await _start_share(work, name)
    config = vm_config(work, name, MACHINE, ACCEL, kernel, initrd, fs.socket_path,
                       tb_size_mb=tb_size_mb)
    vm = await QemuVm.launch(QEMU, config, work / f"{name}-qemu.err")
    try:
        await vm.wait_for_console(IDLE_MARKER, TIMEOUT_S)
        await asyncio.sleep(MEMORY_SETTLE_S)
        # QEMU's own command line names the virtiofsd socket too: count each pid once.
        return pss_by_process(sorted({vm.pid, *processes_mentioning(str(fs.socket_path))}))
    finally:
        await vm.kill()
        await fs.stop()


def warm_vms(cri: TimedCri) -> dict[str, Any]:
    """The warm pool's state from Status (verbose)."""
    reply = cri.runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=10)
    info: dict[str, Any] = json.loads(reply.info["handlers"])[WARM]["warm_vms"]
    return info


def wait_warm(cri: TimedCri) -> float:
    """Until the warm VM is ready; how long that took."""
    started = time.perf_counter()
    while (info := warm_vms(cri))["ready"] < 1:
        if time.perf_counter() - started > TIMEOUT_S:
            raise RuntimeError(f"no warm VM after {TIMEOUT_S:.0f} s: {info}")
        time.sleep(0.25)
    return time.perf_counter() - started


def waiting_warm_dirs(runroot: Path, but: str = "") -> list[str]:
    return [str(d) + "/" for d in (runroot / "vm").glob("warm-*") if str(d) != but]


def _pids_naming(dirs: list[str]) -> set[int]:
    return set().union(*(processes_mentioning(d) for d in dirs))


def _pod_memory(runroot: Path, exclude: list[str]) -> dict[str, dict[str, int]]:
    """Every process naming the daemon's runroot, but those of the waiting warm VMs."""
    waiting = _pids_naming(exclude)
    return pss_by_process([pid for pid in processes_mentioning(str(runroot))
                           if pid != os.getpid() and pid not in waiting])


def _waiting_memory(runroot: Path) -> dict[str, dict[str, int]]:
    """The processes of the waiting warm VM (QEMU, virtiofsd, supervisor)."""
    return pss_by_process(sorted(_pids_naming(waiting_warm_dirs(runroot))))


def vm_pod_run(cri: TimedCri, runroot: Path, index: int,
               handler: str) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """One VM pod up to a running container; its memory when idle, and again with
    EXTRA_CONTAINERS more containers; then removed."""
    label = "VM" if handler == COLD else "VM (warm VM)"
    if handler == WARM:
        wait_warm(cri)
    config = cri.pod_config(f"{handler}-{index}")
    started = time.perf_counter()
    pod_id = cri.run_pod(config, f"{label} RunPodSandbox", handler=handler)
    ctr = cri.create(pod_id, config, "sleeper", SMALL_IMAGE, SLEEPER_COMMAND,
                     f"{label} CreateContainer")
    cri.start(ctr, f"{label} StartContainer")
    cri.samples[f"{label} RunPodSandbox until the first container runs"].append(
        time.perf_counter() - started)
    reply = cri.runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True), timeout=10)
    pod_dir = str(json.loads(reply.info["info"])["vm"]["pod_dir"])
    if handler == WARM:
        wait_warm(cri)  # the pool's next boot must not overlap the memory reading
    time.sleep(MEMORY_SETTLE_S)
    memory = _pod_memory(runroot, waiting_warm_dirs(runroot, but=pod_dir))
    for extra in range(EXTRA_CONTAINERS):
        more = cri.create(pod_id, config, f"sleeper{extra}", SMALL_IMAGE, SLEEPER_COMMAND)
        cri.start(more)
    time.sleep(MEMORY_SETTLE_S)
    more_memory = _pod_memory(runroot, waiting_warm_dirs(runroot, but=pod_dir))
    cri.stop_pod(pod_id)
    cri.remove_pod(pod_id)
    return memory, more_memory


def _total_mib(groups: dict[str, dict[str, int]]) -> float:
    return sum(g["pss_kib"] for g in groups.values()) / 1024


def render(payload: dict[str, Any]) -> str:
    floor = payload["floor_boot_s"]
    lines = [
        f"- runs: {payload['runs']}, machine {MACHINE}, accel {ACCEL}, guest {GUEST_MEMORY_MB} "
        f"MiB, TCG translation cache {payload.get('tb_size_mb', 64)} MiB (pod and floors), "
        f"the pod's /usr from {payload.get('guest_usr', 'initramfs')}, "
        f"kernel {payload['kernel']}; load average (1 min) {payload['load'][0]:.1f} / "
        f"{payload['load'][1]:.1f}",
        "",
        "| what | median s | min-max s |",
        "| --- | ---: | ---: |",
        f"| floor: QEMU start until the busybox init runs | {statistics.median(floor):.2f} "
        f"| {min(floor):.2f}-{max(floor):.2f} |",
    ]
    for op, values in payload["samples"].items():
        lines.append(f"| {op} | {statistics.median(values):.2f} "
                     f"| {min(values):.2f}-{max(values):.2f} |")
    lines.append("")
    for label in ("VM", "VM (warm VM)"):
        values = payload["samples"].get(f"{label} RunPodSandbox until the first container runs")
        if values:
            ratio = statistics.median(values) / statistics.median(floor)
            lines.append(f"{label} pod start / floor: {ratio:.2f}  ")
    pod, bare = payload["pod_memory"], payload["floor_memory"]
    sides = [("VM pod", pod), ("idle floor", bare)]
    if payload.get("warm_pod_memory"):
        sides.insert(1, ("VM pod (warm VM)", payload["warm_pod_memory"]))
    if payload.get("waiting_warm_memory"):
        sides.append(("a waiting warm VM", payload["waiting_warm_memory"]))
    lines += ["", "| host memory (PSS MiB, median run) | "
              + " | ".join(name for name, _ in sides) + " |",
              "| --- |" + " ---: |" * len(sides)]
    names = sorted({name for _, side in sides for run in side for name in run})
    for name in names:
        cells = [statistics.median([run.get(name, {}).get("pss_kib", 0) / 1024 for run in side])
                 for _, side in sides]
        lines.append(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    lines.append("| **total** | " + " | ".join(
        f"{statistics.median([_total_mib(r) for r in side]):.1f}" for _, side in sides) + " |")
    more = payload.get("pod_memory_more") or []
    if more:
        lines += ["", f"| each of {EXTRA_CONTAINERS} more containers in the pod (PSS MiB, median "
                      "run) | per container |", "| --- | ---: |"]
        for name in sorted({name for run in pod + more for name in run}):
            growth = [(after.get(name, {}).get("pss_kib", 0)
                       - before.get(name, {}).get("pss_kib", 0)) / 1024 / EXTRA_CONTAINERS
                      for before, after in zip(pod, more, strict=True)]
            lines.append(f"| {name} | {statistics.median(growth):+.1f} |")
        total = [(_total_mib(after) - _total_mib(before)) / EXTRA_CONTAINERS
                 for before, after in zip(pod, more, strict=True)]
        lines.append(f"| **total** | {statistics.median(total):+.1f} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    image: BuildResult = asyncio.run(build(DEFAULT_OUT_DIR, DEFAULT_CACHE_DIR))
    work = Path(tempfile.mkdtemp(prefix="crivm-vmbench-", dir="/tmp"))
    (work / "registry").mkdir()
    registry, registry_process = _start_registry(work / "registry", auth=False)
    crivm: RuntimeUnderTest | None = None
    payload: dict[str, Any] = {"runs": args.runs, "kernel": image.kernel_version,
                               "tb_size_mb": args.tb_size, "guest_usr": args.guest_usr}
    floor_samples = Samples()
    pod_memory: list[dict[str, dict[str, int]]] = []
    pod_memory_more: list[dict[str, dict[str, int]]] = []
    floor_memory: list[dict[str, dict[str, int]]] = []
    warm_pod_memory: list[dict[str, dict[str, int]]] = []
    waiting_warm_memory: list[dict[str, dict[str, int]]] = []
    try:
        (work / "pause-build").mkdir()
        binary = image_recipes.compile_pause(work / "pause-build")
        push(registry, "pause", ("3.9",), image_recipes.pause_image(binary))
        push(registry, "library/busybox", ("latest",), image_recipes.busybox_image())
        registries_conf = work / "registries.conf"
        registries_conf.write_text(mirror_conf(registry.host))
        write_conflist(work / "cni", work / "ipam")
        floor_boot, floor_idle = work / "floor.cpio", work / "idle.cpio"
        floor_initrd(floor_boot, image_recipes.BUSYBOX_BINARY)
        idle_initrd(floor_idle, image_recipes.BUSYBOX_BINARY)
        pmem = args.guest_usr == "pmem"
        handlers = [(COLD, 0)] + ([] if args.no_warm else [(WARM, 1)])
        extra = "".join(VM_HANDLER_TOML.format(
            name=name, kernel=image.kernel, initrd=image.boot_initrd if pmem else image.initrd,
            guest_usr=args.guest_usr, usr_image=image.usr_image if pmem else "",
            tb_size=args.tb_size, warm_vms=warm) for name, warm in handlers)
        crivm = crivm_runtime(work / "crivm", registries_conf, work / "cni", extra_toml=extra)
        crivm.start()
        assert crivm.channel is not None
        cri = TimedCri(crivm.channel, str(work / "pod-logs"))
        cri.pull(PAUSE_IMAGE)
        cri.pull(SMALL_IMAGE)
        payload["load"] = [os.getloadavg()[0]]
        for index in range(args.runs):
            asyncio.run(run_floor(work, f"floor{index}", MACHINE, ACCEL, image.kernel,
                                  floor_boot, floor_samples, tb_size_mb=args.tb_size))
            runroot = work / "crivm" / "run"
            if not args.no_warm:
                wait_warm(cri)  # idle, not booting, while the cold pod is measured
            memory, more_memory = vm_pod_run(cri, runroot, index, COLD)
            pod_memory.append(memory)
            pod_memory_more.append(more_memory)
            if not args.no_warm:
                waiting_warm_memory.append(_waiting_memory(runroot))
                memory, _ = vm_pod_run(cri, runroot, index, WARM)
                warm_pod_memory.append(memory)
                wait_warm(cri)
            floor_memory.append(asyncio.run(idle_floor_memory(work, f"idle{index}",
                                                              image.kernel, floor_idle,
                                                              args.tb_size)))
            log.info("run %d/%d done", index + 1, args.runs)
        payload["load"].append(os.getloadavg()[0])
        payload["floor_boot_s"] = floor_samples.floor_init
        payload["samples"] = dict(cri.samples)
        payload["pod_memory"] = pod_memory
        payload["pod_memory_more"] = pod_memory_more
        payload["floor_memory"] = floor_memory
        payload["warm_pod_memory"] = warm_pod_memory
        payload["waiting_warm_memory"] = waiting_warm_memory
        # The daemon's own account of each pod's start (VM ready, agent answered).
        payload["daemon_vm_ready"] = [line for line in crivm.log_path.read_text().splitlines()
                                      if "VM of pod" in line or "warm VM" in line]
    finally:
        if crivm is not None:
            if crivm.channel is not None:
                try:
                    TimedCri(crivm.channel, "").remove_all_pods()
                except Exception:  # noqa: BLE001 - the sweep below reports what is left
                    log.exception("removing the VM pods failed")
            crivm.stop()
        _stop(registry_process)
        payload["leaks"] = sweep(work, BENCH_BRIDGE)
        shutil.rmtree(work, ignore_errors=True)
    return payload


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tb-size", type=int, default=RuntimeHandler().tcg_tb_size_mb,
                        help="TCG translation cache MiB of the pod's handler and the floors "
                             "(default: the vm handler's default)")
    parser.add_argument("--guest-usr", choices=("pmem", "initramfs"), default="pmem",
                        help="where the pod's guest gets /usr (the vm handler's guest_usr; "
                             "default pmem, the handler's default on q35)")
    parser.add_argument("--no-warm", action="store_true",
                        help="skip the warm-VM handler (warm_vms = 1) and its pods")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    payload = run(args)
    markdown = render(payload)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report.write_json(args.out / f"vm-{stamp}.json", payload)
    (args.out / f"vm-{stamp}.md").write_text(markdown)
    print(markdown)
    return 1 if payload["leaks"] else 0


if __name__ == "__main__":
    sys.exit(main())
