"""VmBackend: the vm runtime type. Pods are QEMU VMs; containers run in them under the agent.

Containers go through the same conmon path as the runc backend: conmon drives crivm's own
OCI-runtime CLI (``crivm.shim.main``) instead of runc, and that CLI's container process is a
shim that proxies stdio and signals to the agent. Because the CLI speaks runc's verbs, the runc
backend's container code (status from conmon's exit files, stop, remove, exec_sync, attach,
log reopening) runs unchanged against it; only creating a container differs.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

from crivm.errors import CrivmError, InvalidArgument, Unavailable
from crivm.hypervisor.qemu.accel import choose_accel
from crivm.proto import api_pb2
from crivm.runtime.backend import (
    CONTAINER_EXITED,
    BackendServices,
    ContainerRequest,
    ContainerStatus,
    ExecResult,
    HandlerFeatures,
    Readiness,
    SandboxRequest,
    binaries_readiness,
)
from crivm.runtime.config import Config, RuntimeHandler
from crivm.runtime.runc_backend import container as runc_container
from crivm.runtime.runc_backend import exec_sync, stream_io
from crivm.runtime.runc_backend.environment import RuncEnvironment
from crivm.runtime.runc_backend.host import probe_host
from crivm.runtime.runc_backend.oci import OciRuntime
from crivm.runtime.stats.sample import ResourceSample
from crivm.runtime.store import ContainerRecord, PodRecord
from crivm.runtime.streaming.backend import Stdio
from crivm.runtime.vm_backend import (
    container,
    port_forward,
    sandbox,
    shim_launcher,
    stats,
    warm_pool,
)
from crivm.runtime.vm_backend.sandbox import VmEnvironment

log = logging.getLogger(__name__)


class VmBackend:
    runtime_type = "vm"

    def __init__(self, name: str, handler: RuntimeHandler, config: Config) -> None:
        self.name = name
        self.handler = handler
        self.config = config
        self._services: BackendServices | None = None
        self._vm: VmEnvironment | None = None
        self._oci: RuncEnvironment | None = None
        self._pool: warm_pool.WarmPool | None = None

    def readiness(self) -> Readiness:
        binaries = binaries_readiness((
            ("QEMU", self.handler.qemu_path), ("virtiofsd", self.handler.virtiofsd_path),
            ("conmon", self.config.conmon_path),
        ))
        if not binaries.ok:
            return binaries
        for path in self.config.guest_files(self.handler):
            if not path.is_file():
                return Readiness(False, "GuestImageMissing",
                                 f"{path} is missing; run `crivm guest-image build`")
        return Readiness(True)

    def features(self) -> HandlerFeatures:
        return HandlerFeatures()

    def details(self) -> dict[str, Any]:
        if self._pool is None:
            return {}
        return {"warm_vms": self._pool.info()}

    # -- wiring -------------------------------------------------------------------------

    @property
    def vm(self) -> VmEnvironment:
        if self._vm is None:
            raise Unavailable(f"runtime handler {self.name} has not been opened")
        return self._vm

    @property
    def oci(self) -> RuncEnvironment:
        """The runc backend's view of this handler: conmon driving the crivm shim CLI."""
        if self._oci is None:
            raise Unavailable(f"runtime handler {self.name} has not been opened")
        return self._oci

    async def recover(self, services: BackendServices) -> None:
        self._services = services
        runroot = self.config.runroot
        accel = await choose_accel(self.handler.accel, self.handler.qemu_path, Path(runroot))
        self._vm = VmEnvironment(self.name, self.handler, runroot, accel,
                                 kernel=str(self.config.guest_kernel(self.handler)),
                                 initrd=str(self.config.guest_initrd(self.handler)),
                                 usr_image=str(self.config.guest_usr_image(self.handler) or ""))
        shim = shim_launcher.write_launcher(os.path.join(runroot, "vm", "bin"))
        self._oci = RuncEnvironment(
            handler=self.name,
            conmon_path=self.config.conmon_path,
            runtime=OciRuntime(shim, os.path.join(runroot, "vm-shim", self.name),
                               console_socket_in_foreground=True),
            runroot=runroot,
            root=self.config.root,
            host=probe_host(),
        )
        await self._oci.open()
        await self._reconcile(services)
        in_use = {self._vm.paths_of(p).pod_dir for p in services.store.list_pods()}
        vm_handlers = [name for name, h in self.config.runtimes.items()
                       if h.runtime_type == "vm"]
        if await warm_pool.remove_leftovers(self._vm, in_use, vm_handlers):
            log.info("runtime handler %s: removed the warm VMs of an earlier daemon", self.name)
        if self.handler.warm_vms:
            self._pool = warm_pool.WarmPool(self._vm, self.handler.warm_vms)
            self._pool.start()

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        if self._oci is not None:
            await self._oci.close()

    async def _reconcile(self, services: BackendServices) -> None:
        """After a restart: VMs whose supervisor is gone count as stopped, and containers
        that exited meanwhile become exited, from conmon's exit files."""
        store = services.store
        pods = {p.id: p for p in store.list_pods() if p.handler == self.name}
        running = [p for p in pods.values() if await sandbox.alive(self.vm, p)]
        changed = 0
        for ctr in store.list_containers():
            if ctr.pod_id not in pods or ctr.state == CONTAINER_EXITED:
                continue
            status = await runc_container.status(self.oci, ctr)
            if status.state != ctr.state:
                store.update_container(
                    ctr.id, state=status.state, finished_at=status.finished_at,
                    exit_code=status.exit_code, reason=status.reason, message=status.message,
                )
                changed += 1
        log.info("runtime handler %s: %d VM pods (%d running), %d container states updated "
                 "after restart", self.name, len(pods), len(running), changed)

    # -- pods -----------------------------------------------------------------------------

    async def start_sandbox(self, request: SandboxRequest) -> dict[str, Any]:
        # A pod on the host network has no netns for a warm VM's tap to move into.
        if self._pool is None or not request.netns_path:
            return await sandbox.start(self.vm, request)
        try:
            return await self._start_on_warm_vm(self._pool, request)
        finally:
            # The next warm VM boots once this pod's start is over, not during it.
            self._pool.refill()

    async def _start_on_warm_vm(self, pool: warm_pool.WarmPool,
                                request: SandboxRequest) -> dict[str, Any]:
        # The pod's addresses first: a failed CNI ADD costs no warm VM.
        await request.ips()
        warm = pool.take(sandbox.vm_size(self.handler, request.config))
        if warm is None:
            return await sandbox.start(self.vm, request)
        try:
            return await warm_pool.claim(self.vm, warm, request)
        except InvalidArgument:
            raise  # the pod's own request (a sysctl the guest lacks): a boot would fail alike
        except (CrivmError, OSError) as exc:
            log.warning("pod %s: the warm VM failed (%s); booting one for it", request.pod.id,
                        exc, extra={"pod_id": request.pod.id})
        return await sandbox.start(self.vm, request)

    async def stop_sandbox(self, pod: PodRecord) -> None:
        await sandbox.stop(self.vm, pod)

    async def remove_sandbox(self, pod: PodRecord) -> None:
        await sandbox.remove(self.vm, pod)

    async def sandbox_alive(self, pod: PodRecord) -> bool:
        return await sandbox.alive(self.vm, pod)

    # -- containers -----------------------------------------------------------------------

    async def create_container(self, request: ContainerRequest) -> dict[str, Any]:
        return await container.create(self.vm, self.oci, request)

    async def start_container(self, pod: PodRecord, ctr: ContainerRecord) -> dict[str, Any]:
        # Created through conmon and the shim at CreateContainer: only the start is left.
        return await runc_container.start(self.oci, pod, ctr)

    async def stop_container(self, pod: PodRecord, ctr: ContainerRecord, timeout_s: float) -> None:
        await runc_container.stop(self.oci, ctr, timeout_s)

    async def remove_container(self, pod: PodRecord, ctr: ContainerRecord) -> None:
        await runc_container.remove(self.oci, ctr)
        await container.remove_shared(self.vm, pod, ctr)

    async def container_status(self, pod: PodRecord, ctr: ContainerRecord) -> ContainerStatus:
        return await runc_container.status(self.oci, ctr)

    def known_running(self, ctr: ContainerRecord) -> bool:
        # The container's conmon (whose child is the stand-in) is watched as on the runc path.
        return runc_container.known_running(self.oci, ctr)

    async def exec_sync(
        self,
        pod: PodRecord,
        ctr: ContainerRecord,
        cmd: list[str],
        timeout_s: float,
        max_output: int,
    ) -> ExecResult:
        layout = runc_container.layout_of(self.oci, ctr)
        return await exec_sync.exec_sync(self.oci, layout, cmd, timeout_s, max_output)

    async def exec_stream(
        self, pod: PodRecord, ctr: ContainerRecord, cmd: list[str], stdio: Stdio
    ) -> int:
        layout = runc_container.layout_of(self.oci, ctr)
        return await stream_io.exec_stream(self.oci, layout, cmd, stdio)

    async def attach_stream(self, pod: PodRecord, ctr: ContainerRecord, stdio: Stdio) -> None:
        config = api_pb2.ContainerConfig.FromString(ctr.config)
        layout = runc_container.layout_of(self.oci, ctr)
        await stream_io.attach_stream(layout, stdio, config.tty, config.stdin)

    async def port_forward_connect(self, pod: PodRecord, port: int) -> socket.socket:
        """Port-forward target: the guest's port (see ``port_forward``)."""
        return await port_forward.connect(pod, port)

    async def update_resources(
        self,
        pod: PodRecord,
        ctr: ContainerRecord,
        resources: api_pb2.LinuxContainerResources,
    ) -> None:
        await runc_container.update_resources(self.oci, ctr, resources)

    async def reopen_log(self, pod: PodRecord, ctr: ContainerRecord) -> None:
        await runc_container.reopen_log(self.oci, ctr)

    # -- stats ----------------------------------------------------------------------------

    async def container_stats(self, pod: PodRecord, ctr: ContainerRecord) -> ResourceSample | None:
        return await stats.container_sample(self.vm.paths_of(pod), ctr.id)

    async def sandbox_stats(self, pod: PodRecord) -> ResourceSample | None:
        return await stats.vm_host_sample(self.vm.paths_of(pod))

