"""Warm VMs: a few VMs booted ahead of their pods, so RunPodSandbox skips the guest boot.

Under TCG the guest boot is most of a VM pod's start (docs/performance.md). A handler with
``warm_vms = N`` keeps N VMs booted, each alone in a network namespace of its own with a spare
tap, its shared directory mounted by the agent, the boot files paged out of QEMU, and its
processes at a low CPU priority so that a boot does not slow the pods already running.

RunPodSandbox takes one whose size (vCPUs, memory) is the pod's; other pods, and pods on the
host network, boot their own. Taking a warm VM:

- moves its tap into the pod netns and joins it to the CNI veth (``tap.adopt_tap``);
- writes the pod files into its shared directory;
- gives the guest NIC the veth's MAC, addresses and routes, and the pod's DNS and sysctls;
- unpins its own netns (QEMU, virtiofsd and the supervisor stay in it: it holds nothing but
  loopback now), and raises its processes to normal priority.

From then on the VM is the pod's, for its life, as a booted one would be: a warm VM serves
one pod and is never reused, so no two pods share guest memory, RNG state or a kernel. The
pod's record names the VM's directory (``<runroot>/vm/warm-…``). The pool boots a
replacement at once, one VM at a time, and backs off when boots fail.

A warm VM costs what an idle VM pod costs (docs/performance.md) while it waits. The pool's
VMs are not recorded: the daemon stops them when it stops, and removes any it finds from an
earlier daemon when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crivm.netbridge import netns, tap
from crivm.proto import api_pb2
from crivm.runtime.backend import SandboxRequest
from crivm.runtime.undo import UndoSteps
from crivm.runtime.vm_backend import sandbox, shared_dir
from crivm.runtime.vm_backend.sandbox import BootedVm, VmEnvironment
from crivm.runtime.vm_backend.stats import process_tree
from crivm.shim.vm_spec import PodPaths

log = logging.getLogger(__name__)

WARM_PREFIX = "warm-"
# A warm VM's directory: warm-<handler tag>-<random>, 20 characters like a pod's.
HANDLER_TAG_CHARS = 6
NETNS_PIN = "netns"
# A warm VM boots at this niceness, and goes to 0 when a pod takes it.
WARM_NICE = 10
# After a failed boot the pool waits this long, doubling per failure up to the maximum.
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 300.0


@dataclass(frozen=True)
class WarmVm:
    vm: BootedVm
    # The VM's own netns, where its tap waits; pinned in its directory.
    netns_path: str
    # The MAC the guest NIC booted with; the pod's veth MAC replaces it.
    mac: str

    @property
    def paths(self) -> PodPaths:
        return self.vm.paths


def _random_mac() -> str:
    """A locally administered unicast MAC."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def _renice(pids: list[int], nice: int) -> None:
    """Every thread of these processes and their descendants (QEMU's vCPU threads among
    them); a process that is gone meanwhile is fine."""
    for pid in {p for root in pids if root > 0 for p in process_tree(root)}:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)


async def discard(paths: PodPaths) -> None:
    """Stop a VM that is not (or no longer) a pod's, and remove everything it had."""
    await sandbox.stop_supervisor(paths)
    pin = os.path.join(paths.pod_dir, NETNS_PIN)
    if os.path.exists(pin):
        await netns.remove_netns(pin)
    await asyncio.to_thread(shared_dir.remove_shared_dir, paths.shared_dir)
    await asyncio.to_thread(shutil.rmtree, paths.pod_dir, True)


async def boot_warm(env: VmEnvironment) -> WarmVm:
    """Boot one VM for no pod yet, at the handler's default size."""
    prefix = warm_prefix(env.handler_name)
    name = prefix + secrets.token_hex(8)[: sandbox.POD_DIR_ID_CHARS - len(prefix)]
    paths = PodPaths(os.path.join(env.runroot, "vm", name))
    mac = _random_mac()
    extra = {"vm": name}
    async with UndoSteps(extra) as undo:
        await asyncio.to_thread(sandbox.make_vm_dir, undo, paths)
        ns = await netns.create_netns(NETNS_PIN, paths.pod_dir)
        undo.add("remove the warm VM's netns", netns.remove_netns, ns.path)
        await tap.make_spare_tap(ns.path)
        vm = await sandbox.boot_vm(env, undo, paths, name, default_size(env), ns.path,
                                   tap.TAP_NAME, mac, nice=WARM_NICE)
        await sandbox.page_out_boot_files(int(vm.report.get("qemu_pid", 0)), env, extra)
        undo.commit()
    return WarmVm(vm, ns.path, mac)


def warm_prefix(handler_name: str) -> str:
    """Each handler's warm VMs by name, so one handler's start never discards another's."""
    tag = hashlib.sha256(handler_name.encode()).hexdigest()[:HANDLER_TAG_CHARS]
    return f"{WARM_PREFIX}{tag}-"


def default_size(env: VmEnvironment) -> tuple[int, int]:
    """(vCPUs, memory MiB) of a pod that asks for no more than the handler's defaults."""
    return sandbox.vm_size(env.handler, api_pb2.PodSandboxConfig())


async def claim(env: VmEnvironment, warm: WarmVm, request: SandboxRequest) -> dict[str, Any]:
    """Make a warm VM the pod's (see the module's docstring); on failure the VM is discarded
    and nothing of it is left."""
    pod_id = request.pod.id
    config = request.config
    extra = {"pod_id": pod_id}
    loop = asyncio.get_running_loop()
    started = loop.time()
    paths = warm.paths
    async with UndoSteps(extra) as undo:
        undo.add("discard the warm VM", discard, paths)
        await asyncio.to_thread(sandbox.write_pod_files, paths, config, await request.ips())
        undo.add("remove the tap", tap.detach_tap, request.netns_path)
        net = await tap.adopt_tap(warm.netns_path, request.netns_path)
        await sandbox.configure_guest(paths, config, net, booted_mac=warm.mac)
        await netns.remove_netns(warm.netns_path)
        report = warm.vm.report
        await asyncio.to_thread(_renice, [int(report.get("supervisor_pid", 0))], 0)
        undo.commit()
    log.info("VM of pod %s ready in %.2f s from warm VM %s (booted in %.1f s ahead)",
             pod_id, loop.time() - started, os.path.basename(paths.pod_dir),
             warm.vm.boot_seconds, extra=extra)
    return sandbox.pod_extra(env, warm.vm, request, net, warm=True)


async def remove_leftovers(env: VmEnvironment) -> int:
    """Discard this handler's warm VMs that an earlier daemon left (it died before it could
    stop them)."""
    parent = Path(env.runroot, "vm")
    found = sorted(parent.glob(warm_prefix(env.handler_name) + "*")) if parent.is_dir() else []
    for pod_dir in found:
        log.info("discarding warm VM %s left by an earlier daemon", pod_dir.name)
        await discard(PodPaths(str(pod_dir)))
    return len(found)


class WarmPool:
    """Keeps ``size`` warm VMs of one handler booted; see the module's docstring."""

    def __init__(self, env: VmEnvironment, size: int) -> None:
        self.env = env
        self.size = size
        self._ready: list[WarmVm] = []
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failures = 0
        self.last_error = ""

    def start(self) -> None:
        if self.size > 0 and self._task is None:
            self._task = asyncio.create_task(self._keep_filled(), name="warm-vm-pool")
            self._wanted.set()

    def info(self) -> dict[str, Any]:
        return {"size": self.size, "ready": len(self._ready), "failures": self.failures,
                "last_error": self.last_error}

    def take(self, size: tuple[int, int]) -> WarmVm | None:
        """A warm VM of this size whose supervisor still runs, or None; the pool refills."""
        if size != default_size(self.env):
            return None
        while self._ready:
            warm = self._ready.pop(0)
            self._wanted.set()
            if sandbox.supervisor_pid(warm.paths) and os.path.exists(warm.paths.mux_socket):
                return warm
            log.warning("warm VM %s stopped while it waited; discarding it",
                        os.path.basename(warm.paths.pod_dir))
            self._discard_later(warm.paths)
        return None

    def _discard_later(self, paths: PodPaths) -> None:
        task = asyncio.create_task(discard(paths))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _keep_filled(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            while len(self._ready) < self.size:
                try:
                    warm = await boot_warm(self.env)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a failed boot must not end the pool
                    self.failures += 1
                    self.last_error = str(exc)
                    delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (self.failures - 1))
                    log.warning("runtime handler %s: a warm VM did not boot (%s); next try "
                                "in %.0f s", self.env.handler_name, exc, delay)
                    await asyncio.sleep(delay)
                    continue
                self.failures, self.last_error = 0, ""
                self._ready.append(warm)
                log.info("runtime handler %s: warm VM %s ready (booted in %.1f s)",
                         self.env.handler_name, os.path.basename(warm.paths.pod_dir),
                         warm.vm.boot_seconds)

    async def close(self) -> None:
        """Stop booting, and stop every warm VM no pod took."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        ready, self._ready = self._ready, []
        await asyncio.gather(*(discard(warm.paths) for warm in ready))
