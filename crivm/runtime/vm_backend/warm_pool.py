"""Warm VMs: a few VMs booted ahead of their pods, so RunPodSandbox skips the guest boot.

Under TCG the guest boot is most of a VM pod's start (docs/performance.md). A handler with
``warm_vms = N`` keeps N VMs booted, each alone in a network namespace of its own with a spare
tap, its shared directory mounted by the agent, the boot files paged out of QEMU, and its
processes at a low CPU priority so that a boot does not slow the pods already running.

RunPodSandbox takes one whose size (vCPUs, memory) is the pod's, once CNI ADD has given the
pod its addresses; other pods, and pods on the host network, boot their own. Taking a warm VM:

- writes the pod files into its shared directory;
- moves its tap into the pod netns and joins it to the CNI veth (``tap.adopt_tap``);
- gives the guest NIC the veth's MAC, addresses and routes, and the pod's DNS and sysctls;
- unpins its own netns (QEMU, virtiofsd and the supervisor stay in it: it holds nothing but
  loopback now), and gives its processes the daemon's priority.

From then on the VM is the pod's, for its life, as a booted one would be: a warm VM serves
one pod and is never reused, so no two pods share guest memory, RNG state or a kernel. The
pod's record names the VM's directory (``<runroot>/vm/warm-…``). When the pod's start is
over, the pool boots a replacement, one VM at a time, and backs off when boots fail. A warm
VM booted from guest image files that have changed since is discarded, not handed out.

A warm VM costs what an idle VM pod costs (docs/performance.md) while it waits. The pool's
VMs are not recorded: the daemon stops them when it stops, and when it starts it discards the
warm VM directories that no pod record names (an earlier daemon's, killed before it could
stop them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crivm.hypervisor.qemu import owner
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
# How often the pool looks for waiting VMs that stopped (a guest that powered off or crashed).
CHECK_INTERVAL_S = 30.0


@dataclass(frozen=True)
class WarmVm:
    vm: BootedVm
    # The VM's own netns, where its tap waits; pinned in its directory.
    netns_path: str
    # The MAC the guest NIC booted with; the pod's veth MAC replaces it.
    mac: str
    # The guest image files as they were when it booted (see image_stamp).
    image: tuple[tuple[int, int, int, int], ...]

    @property
    def paths(self) -> PodPaths:
        return self.vm.paths


def _random_mac() -> str:
    """A locally administered unicast MAC."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def image_stamp(env: VmEnvironment) -> tuple[tuple[int, int, int, int], ...]:
    """Device, inode, mtime and size of the guest kernel, initramfs and /usr image: a
    `crivm guest-image build` that replaced one changes it."""
    stamp = []
    for path in env.guest_files:
        try:
            st = os.stat(path)
        except OSError:
            stamp.append((0, 0, 0, 0))
            continue
        stamp.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stamp)


def _give_daemon_priority(supervisor_pid: int) -> None:
    """A taken VM runs as a booted one would: the supervisor, virtiofsd and QEMU (every thread,
    vCPUs among them) at the daemon's own nice, and each one's autogroup at 0, where a new
    session's starts."""
    if supervisor_pid <= 0:
        return
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    for pid in process_tree(supervisor_pid):
        owner.set_priority(pid, nice, group_nice=0)


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
    image = image_stamp(env)
    started = asyncio.get_running_loop().time()
    async with UndoSteps(extra) as undo:
        await sandbox.make_vm_dir(undo, paths)
        ns = await netns.create_netns(NETNS_PIN, paths.pod_dir)
        undo.add("remove the warm VM's netns", netns.remove_netns, ns.path)
        await tap.make_spare_tap(ns.path)
        vm = await sandbox.boot_vm(env, undo, paths, name, default_size(env), ns.path,
                                   tap.TAP_NAME, mac, started, nice=WARM_NICE)
        await sandbox.page_out_boot_files(int(vm.report.get("qemu_pid", 0)), env, extra)
        undo.commit()
    return WarmVm(vm, ns.path, mac, image)


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
        await asyncio.to_thread(_give_daemon_priority,
                                int(warm.vm.report.get("supervisor_pid", 0)))
        undo.commit()
    log.info("VM of pod %s ready in %.2f s from warm VM %s (booted in %.1f s ahead)",
             pod_id, loop.time() - started, os.path.basename(paths.pod_dir),
             warm.vm.boot_seconds, extra=extra)
    return sandbox.pod_extra(env, warm.vm, request, net, warm=True)


async def remove_leftovers(env: VmEnvironment, in_use: set[str],
                           vm_handlers: Iterable[str]) -> int:
    """Discard the warm VMs an earlier daemon left (killed before it could stop them): the
    ``warm-*`` directories no pod record names (``in_use``: the pods' ``vm.pod_dir``), of this
    handler or of no configured vm handler (the others' pools may be booting already). One
    that cannot be removed is logged and left; it must not stop the daemon."""
    parent = Path(env.runroot, "vm")
    if not parent.is_dir():
        return 0
    others = {warm_prefix(name) for name in vm_handlers} - {warm_prefix(env.handler_name)}
    removed = 0
    for pod_dir in sorted(parent.glob(WARM_PREFIX + "*")):
        if str(pod_dir) in in_use or any(pod_dir.name.startswith(p) for p in others):
            continue
        log.info("discarding warm VM %s left by an earlier daemon", pod_dir.name)
        try:
            await discard(PodPaths(str(pod_dir)))
        except Exception:  # noqa: BLE001 - the next start tries again
            log.exception("could not discard warm VM %s", pod_dir.name)
            continue
        removed += 1
    return removed


class WarmPool:
    """Keeps ``size`` warm VMs of one handler booted; see the module's docstring."""

    def __init__(self, env: VmEnvironment, size: int) -> None:
        self.env = env
        self.size = size
        self._ready: list[WarmVm] = []
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._discards: set[asyncio.Task[None]] = set()
        self.failures = 0
        self.last_error = ""
        self.retry_in_s = 0.0

    def start(self) -> None:
        if self.size > 0 and self._task is None:
            self._task = asyncio.create_task(self._keep_filled(), name="warm-vm-pool")
            self._wanted.set()

    def info(self) -> dict[str, Any]:
        return {"size": self.size, "ready": len(self._ready), "failures": self.failures,
                "last_error": self.last_error, "retry_in_s": self.retry_in_s}

    def take(self, size: tuple[int, int]) -> WarmVm | None:
        """A warm VM of this size, still running and booted from the current guest image, or
        None. The pool boots the next one on ``refill()``, once the pod's start is over."""
        if size != default_size(self.env):
            return None
        image = image_stamp(self.env)
        while self._ready:
            warm = self._ready.pop(0)
            if warm.image != image:
                log.info("warm VM %s was booted from an older guest image; discarding it",
                         os.path.basename(warm.paths.pod_dir))
            elif not sandbox.vm_running(warm.paths):
                log.warning("warm VM %s stopped while it waited; discarding it",
                            os.path.basename(warm.paths.pod_dir))
            else:
                return warm
            self._discard_later(warm.paths)
        return None

    def refill(self) -> None:
        self._wanted.set()

    def _discard_later(self, paths: PodPaths) -> None:
        task = asyncio.create_task(self._discard(paths))
        self._discards.add(task)
        task.add_done_callback(self._discards.discard)

    async def _discard(self, paths: PodPaths) -> None:
        try:
            await discard(paths)
        except Exception:  # noqa: BLE001 - logged; the next daemon start tries again
            log.exception("could not discard warm VM %s", os.path.basename(paths.pod_dir))

    def _prune(self) -> None:
        """Drop waiting VMs that stopped, so that the pool replaces them."""
        for warm in [w for w in self._ready if not sandbox.vm_running(w.paths)]:
            log.warning("warm VM %s stopped while it waited; replacing it",
                        os.path.basename(warm.paths.pod_dir))
            self._ready.remove(warm)
            self._discard_later(warm.paths)

    async def _keep_filled(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), CHECK_INTERVAL_S)
            self._wanted.clear()
            self._prune()
            while len(self._ready) < self.size:
                try:
                    warm = await boot_warm(self.env)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a failed boot must not end the pool
                    self.failures += 1
                    self.last_error = str(exc)
                    self.retry_in_s = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (self.failures - 1))
                    log.warning("runtime handler %s: a warm VM did not boot (%s); next try "
                                "in %.0f s", self.env.handler_name, exc, self.retry_in_s)
                    await asyncio.sleep(self.retry_in_s)
                    continue
                self.failures, self.last_error, self.retry_in_s = 0, "", 0.0
                self._ready.append(warm)
                log.info("runtime handler %s: warm VM %s ready (booted in %.1f s)",
                         self.env.handler_name, os.path.basename(warm.paths.pod_dir),
                         warm.vm.boot_seconds)

    async def close(self) -> None:
        """Stop booting (a boot under way is undone), and stop every warm VM no pod took."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        ready, self._ready = self._ready, []
        for warm in ready:
            self._discard_later(warm.paths)
        await asyncio.gather(*self._discards)
