"""A VM pod's infrastructure: shared dir, tap, and the supervisor that runs virtiofsd + QEMU.

Start order, each step with its undo: pod dir, shared mount, pod files, tap in the pod netns,
the supervisor (which boots the VM inside the netns), then, through the agent, the shared
directory mount and the guest network. Stop asks the supervisor to quit the VM; remove also
deletes the tap, the mounts and the pod dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google import protobuf

from crivm.errors import CrivmError, DeadlineExceeded, FailedPrecondition, Unavailable
from crivm.hypervisor.qemu import page_out
from crivm.netbridge import tap
from crivm.netbridge.netns import netns_argv_prefix
from crivm.netbridge.tap import GuestNetwork
from crivm.proto import api_pb2
from crivm.runtime.backend import SandboxRequest
from crivm.runtime.config import RuntimeHandler
from crivm.runtime.runc_backend.environment import wait_pid_gone
from crivm.runtime.runc_backend.pod_files import hosts_file, resolv_conf
from crivm.runtime.store import PodRecord
from crivm.runtime.undo import UndoSteps
from crivm.runtime.vm_backend import guest_network, shared_dir
from crivm.runtime.vm_backend.agent_client import AgentClient
from crivm.shim.vm_spec import GUEST_SHARED_DIR, SHARED_TAG, PodPaths, VmSpec

log = logging.getLogger(__name__)

SUPERVISOR_MODULE = "crivm.shim.supervisor_entry"
# QMP quit, then the supervisor's own SIGKILL fallback, must fit in this.
STOP_TIMEOUT_S = 20.0
MIB = 1024 * 1024
# The pod files live here inside the shared dir, and so in the guest.
POD_FILES_DIR = "pod"
POD_DIR_ID_CHARS = 20


class VmStartError(CrivmError):
    """The pod's VM did not come up; the message carries the supervisor's reason."""


@dataclass(frozen=True)
class VmEnvironment:
    handler_name: str
    handler: RuntimeHandler
    runroot: str
    accel: str
    # The guest image, resolved once from the handler (or `crivm guest-image build`'s output).
    kernel: str
    initrd: str
    # The /usr image on virtio-pmem; "" when the initramfs carries /usr.
    usr_image: str = ""

    def pod_paths(self, pod_id: str) -> PodPaths:
        # unix socket paths must fit in 108 bytes; a prefix of the random id is unique enough
        # (and a clash fails the create rather than sharing a directory).
        return PodPaths(os.path.join(self.runroot, "vm", pod_id[:POD_DIR_ID_CHARS]))

    @property
    def guest_files(self) -> tuple[str, ...]:
        """The files its VMs boot from: kernel, initramfs, and the /usr image if any."""
        return tuple(path for path in (self.kernel, self.initrd, self.usr_image) if path)

    def paths_of(self, pod: PodRecord) -> PodPaths:
        """A running pod's files: where its record says (a warm VM keeps the directory it
        was booted in), else under its id."""
        vm = pod.extra.get("vm")
        pod_dir = vm.get("pod_dir") if isinstance(vm, dict) else None
        return PodPaths(str(pod_dir)) if pod_dir else self.pod_paths(pod.id)


def vm_size(handler: RuntimeHandler, config: api_pb2.PodSandboxConfig) -> tuple[int, int]:
    """(vCPUs, memory MiB): the pod's limits (or the handler's defaults) plus the overhead."""
    resources = config.linux.resources
    memory_mb = handler.default_memory_mb
    if resources.memory_limit_in_bytes > 0:
        memory_mb = max(memory_mb, math.ceil(resources.memory_limit_in_bytes / MIB))
    vcpus = handler.default_vcpus
    if resources.cpu_quota > 0 and resources.cpu_period > 0:
        vcpus = max(vcpus, math.ceil(resources.cpu_quota / resources.cpu_period))
    vcpus = min(vcpus, os.cpu_count() or 1)
    return vcpus, memory_mb + handler.memory_overhead_mb


def guest_pod_file(name: str) -> str:
    return f"{GUEST_SHARED_DIR}/{POD_FILES_DIR}/{name}"


def write_pod_files(paths: PodPaths, config: api_pb2.PodSandboxConfig,
                    ips: tuple[str, ...]) -> None:
    directory = os.path.join(paths.shared_dir, POD_FILES_DIR)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    files = {
        "hostname": (config.hostname or "localhost") + "\n",
        "hosts": hosts_file(config.hostname, ips),
        "resolv.conf": resolv_conf(config.dns_config) if config.HasField("dns_config") else "",
    }
    for name, text in files.items():
        Path(directory, name).write_text(text)


def _python_env() -> dict[str, str]:
    """The supervisor runs with ``python -S`` (no site, no .pth hooks) and imports the same crivm
    and protobuf as the daemon, installed or from a checkout.

    site's .pth hooks (the editable finder, CA bundles through importlib.resources) cost the
    supervisor ~1 MiB PSS (measured: its imports 15.4 MiB with site, 14.4 without), once per
    pod; protobuf is the one package the supervisor needs from site-packages.
    """
    package_root = str(Path(__file__).resolve().parents[3])
    protobuf_root = str(Path(protobuf.__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_root, protobuf_root, env.get("PYTHONPATH", "")) if p
    )
    return env


async def _launch_supervisor(spec: VmSpec, netns_path: str, timeout_s: float) -> dict[str, Any]:
    argv = [sys.executable, "-S", "-m", SUPERVISOR_MODULE, spec.paths.spec]
    if netns_path:
        argv = netns_argv_prefix(netns_path) + argv
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=_python_env(), start_new_session=True,
        )
    except OSError as exc:
        raise Unavailable(f"cannot start the VM supervisor: {exc.strerror}") from exc
    reported = asyncio.ensure_future(proc.communicate())
    try:
        stdout, stderr = await asyncio.wait_for(asyncio.shield(reported), timeout_s)
    except asyncio.CancelledError:
        # Given up on (a RunPodSandbox cancelled, a daemon stopping a warm VM's boot): the
        # supervisor may be starting QEMU right now. Let it report first, so that the undo
        # step that stops it finds its pid file instead of leaving it to run.
        await asyncio.wait({reported}, timeout=timeout_s)
        raise
    except TimeoutError as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.wait({reported}, timeout=5.0)
        await proc.wait()
        raise DeadlineExceeded(f"the VM supervisor of {spec.name} did not report within "
                               f"{timeout_s:.0f} s") from exc
    try:
        report: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = {"ok": False, "error": stderr.decode(errors="replace").strip()[-2000:]}
    if proc.returncode != 0 or not report.get("ok"):
        raise VmStartError(f"VM of pod {spec.name} did not start: {report.get('error')}")
    return report


def _console_tail(paths: PodPaths, lines: int = 8) -> str:
    try:
        text = Path(paths.console_log).read_text(errors="replace")
    except OSError:
        return "(no console output)"
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


async def _wait_agent(agent: AgentClient, paths: PodPaths, timeout_s: float) -> None:
    """Wait for the agent's health check; give up early when the VM is already gone (a guest
    that panicked), with the end of its console in the error."""
    ready = asyncio.ensure_future(agent.wait_ready(timeout_s))
    try:
        while not ready.done():
            await asyncio.wait({ready}, timeout=0.5)
            if not ready.done() and not supervisor_pid(paths):
                raise VmStartError(f"the VM stopped before its agent answered; console: "
                                   f"{_console_tail(paths)}")
        ready.result()
    finally:
        ready.cancel()
        await asyncio.gather(ready, return_exceptions=True)


def supervisor_pid(paths: PodPaths) -> int:
    """The supervisor's pid if it still runs (checked against its command line, so a reused
    pid is never mistaken for it), else 0."""
    try:
        pid = int(Path(paths.supervisor_pidfile).read_text().strip() or 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return 0
    return pid if paths.spec.encode() in cmdline else 0


async def page_out_boot_files(qemu_pid: int, env: VmEnvironment,
                              extra: dict[str, str]) -> None:
    """The guest unpacked its initramfs long ago, and read most of /usr only while it booted;
    QEMU's mappings of those files would otherwise stay resident for the pod's life (see
    crivm.hypervisor.qemu.page_out). QEMU unmaps them; the host's page cache keeps them as
    clean, reclaimable pages (measured with fincore), so what the guest touches again is mapped
    back without I/O while they stay cached."""
    if qemu_pid <= 0:
        return
    for path in (env.initrd, env.usr_image):
        if not path:
            continue
        try:
            advised = await asyncio.to_thread(page_out.page_out_file, qemu_pid, path)
        except page_out.PageOutError as exc:
            log.warning("pages of %s stay in QEMU: %s", path, exc, extra=extra)
            continue
        log.debug("QEMU %d gave back %d KiB of %s", qemu_pid, advised // 1024, path,
                  extra=extra)


async def stop_supervisor(paths: PodPaths, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the supervisor (it quits the VM and virtiofsd), SIGKILL it if it lingers; its
    children die with it through PR_SET_PDEATHSIG."""
    pid = supervisor_pid(paths)
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not await wait_pid_gone(pid, timeout_s):
        log.warning("VM supervisor %d ignored SIGTERM; killing it", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await wait_pid_gone(pid, 5.0)


def _check_guest_files(env: VmEnvironment) -> None:
    """Fail before anything is made when the guest image is not there (a handler pointing at
    files that were never built or were removed), rather than from inside QEMU's start."""
    for path in env.guest_files:
        if not os.path.isfile(path):
            raise FailedPrecondition(
                f"runtime handler {env.handler_name}: guest image file {path} is missing; "
                "run `crivm guest-image build`")


@dataclass(frozen=True)
class BootedVm:
    """A VM whose agent answered and mounted the shared directory."""

    paths: PodPaths
    vcpus: int
    memory_mb: int
    # The supervisor's report: its pid, QEMU's and virtiofsd's.
    report: dict[str, Any]
    boot_seconds: float


async def make_vm_dir(undo: UndoSteps, paths: PodPaths) -> None:
    """The VM's directory and its shared directory (virtiofsd serves it)."""
    # Made before its undo step: a name that clashes fails here, and never removes the other's.
    os.makedirs(paths.pod_dir, mode=0o700)
    undo.add("remove the pod directory", shutil.rmtree, paths.pod_dir, True)
    undo.add("unmount the shared directory", shared_dir.remove_shared_dir, paths.shared_dir)
    await asyncio.to_thread(shared_dir.make_shared_dir, paths.shared_dir)


async def boot_vm(env: VmEnvironment, undo: UndoSteps, paths: PodPaths, name: str,
                  size: tuple[int, int], netns_path: str, tap_name: str, mac: str,
                  started: float, nice: int = 0) -> BootedVm:
    """Start the supervisor (virtiofsd, QEMU) in ``netns_path``, wait for the agent, and have
    it mount the shared directory. The directory (``make_vm_dir``) and the tap must exist.
    ``started`` (loop time) is when the start began: the boot timeout counts from it, and so
    does ``boot_seconds`` (until the agent answered)."""
    handler = env.handler
    vcpus, memory_mb = size
    loop = asyncio.get_running_loop()
    spec = VmSpec(
        name=name, pod_dir=paths.pod_dir, qemu_path=handler.qemu_path,
        virtiofsd_path=handler.virtiofsd_path,
        kernel=env.kernel, initrd=env.initrd, usr_image=env.usr_image,
        machine=handler.machine, accel=env.accel, tcg_tb_size_mb=handler.tcg_tb_size_mb,
        free_page_reporting=handler.free_page_reporting, vcpus=vcpus, memory_mb=memory_mb,
        tap_name=tap_name, mac=mac, nice=nice,
    )
    Path(paths.spec).write_text(spec.to_json())
    undo.add("stop the VM", stop_supervisor, paths)
    report = await _launch_supervisor(spec, netns_path, handler.boot_timeout_s)
    booted = loop.time()
    async with AgentClient(paths.mux_socket) as agent:
        await _wait_agent(agent, paths, max(1.0, handler.boot_timeout_s - (booted - started)))
        ready = loop.time()
        await agent.mount(SHARED_TAG, GUEST_SHARED_DIR)
    return BootedVm(paths, vcpus, memory_mb, report, ready - started)


async def configure_guest(paths: PodPaths, config: api_pb2.PodSandboxConfig,
                          net: GuestNetwork | None, booted_mac: str = "") -> None:
    """The pod's network, DNS and sysctls in the guest (``booted_mac``: see
    ``guest_network.configure``)."""
    async with AgentClient(paths.mux_socket) as agent:
        dns = config.dns_config if config.HasField("dns_config") else None
        await guest_network.configure(agent, net, dns, booted_mac)
        if config.linux.sysctls:
            await agent.set_sysctls(config.linux.sysctls)


def pod_extra(env: VmEnvironment, vm: BootedVm, request: SandboxRequest,
              net: GuestNetwork | None, warm: bool) -> dict[str, Any]:
    return {
        "vm": {
            "pod_dir": vm.paths.pod_dir,
            "supervisor_pid": vm.report.get("supervisor_pid", 0),
            "qemu_pid": vm.report.get("qemu_pid", 0),
            "virtiofsd_pid": vm.report.get("virtiofsd_pid", 0),
            "vcpus": vm.vcpus,
            "memory_mb": vm.memory_mb,
            "accel": env.accel,
            "tap": net.tap_name if net else "",
            "boot_seconds": round(vm.boot_seconds, 2),
            "warm": warm,
        },
        "netns_path": request.netns_path,
    }


async def start(env: VmEnvironment, request: SandboxRequest) -> dict[str, Any]:
    """Boot the pod's VM: its directory, pod files and tap first (QEMU opens the tap by name
    in the pod netns), then the VM, then the guest's network."""
    _check_guest_files(env)
    pod_id = request.pod.id
    config = request.config
    extra = {"pod_id": pod_id}
    paths = env.pod_paths(pod_id)
    size = vm_size(env.handler, config)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with UndoSteps(extra) as undo:
        await make_vm_dir(undo, paths)
        await asyncio.to_thread(write_pod_files, paths, config, await request.ips())
        net = None
        if request.netns_path:
            undo.add("remove the tap", tap.detach_tap, request.netns_path)
            net = await tap.attach_tap(request.netns_path)
        vm = await boot_vm(env, undo, paths, pod_id, size, request.netns_path,
                           net.tap_name if net else "", net.mac if net else "", started)
        await configure_guest(paths, config, net)
        undo.commit()
    await page_out_boot_files(int(vm.report.get("qemu_pid", 0)), env, extra)
    log.info("VM of pod %s ready in %.1f s (agent after %.1f s; %d vCPU, %d MiB, %s)",
             pod_id, loop.time() - started, vm.boot_seconds, vm.vcpus, vm.memory_mb,
             env.accel, extra=extra)
    return pod_extra(env, vm, request, net, warm=False)


async def stop(env: VmEnvironment, pod: PodRecord) -> None:
    await stop_supervisor(env.paths_of(pod))
    netns_path = str(pod.extra.get("netns_path", ""))
    if netns_path:
        await tap.detach_tap(netns_path)


async def remove(env: VmEnvironment, pod: PodRecord) -> None:
    await stop(env, pod)
    paths = env.paths_of(pod)
    await asyncio.to_thread(shared_dir.remove_shared_dir, paths.shared_dir)
    await asyncio.to_thread(shutil.rmtree, paths.pod_dir, True)


def vm_running(paths: PodPaths) -> bool:
    """The VM's supervisor runs and still serves its agent socket."""
    return bool(supervisor_pid(paths)) and os.path.exists(paths.mux_socket)


async def alive(env: VmEnvironment, pod: PodRecord) -> bool:
    return vm_running(env.paths_of(pod))
