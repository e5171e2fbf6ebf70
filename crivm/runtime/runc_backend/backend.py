"""RuncBackend: the oci runtime type, driving conmon + runc (or crun)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from crivm.errors import Unavailable
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
from crivm.runtime.runc_backend import container, exec_sync, sandbox, stream_io
from crivm.runtime.runc_backend.environment import RuncEnvironment
from crivm.runtime.runc_backend.host import probe_host
from crivm.runtime.runc_backend.oci import OciRuntime
from crivm.runtime.runc_backend.spec import cgroups_path
from crivm.runtime.stats.cgroups import read_cgroup
from crivm.runtime.stats.sample import ResourceSample
from crivm.runtime.store import ContainerRecord, PodRecord
from crivm.runtime.streaming.backend import Stdio

if TYPE_CHECKING:
    from crivm.storage.service import ImageService

log = logging.getLogger(__name__)


class RuncBackend:
    runtime_type = "oci"

    def __init__(self, name: str, handler: RuntimeHandler, config: Config) -> None:
        self.name = name
        self.handler = handler
        self.config = config
        self._services: BackendServices | None = None
        self._env: RuncEnvironment | None = None

    def readiness(self) -> Readiness:
        return binaries_readiness((("OCI runtime", self.handler.runtime_path),
                                   ("conmon", self.config.conmon_path)))

    def features(self) -> HandlerFeatures:
        return HandlerFeatures()

    def details(self) -> dict[str, Any]:
        return {}

    # -- wiring -------------------------------------------------------------------------

    @property
    def env(self) -> RuncEnvironment:
        if self._env is None:
            raise Unavailable(f"runtime handler {self.name} has not been opened")
        return self._env

    @property
    def images(self) -> ImageService:
        if self._services is None or "images" not in self._services.components:
            raise Unavailable("the image service is not part of this build")
        images: ImageService = self._services.components["images"]
        return images

    async def recover(self, services: BackendServices) -> None:
        self._services = services
        # Each handler keeps its own runtime state dir, so two handlers with different
        # runtime binaries never read each other's containers.
        self._env = RuncEnvironment(
            handler=self.name,
            conmon_path=self.config.conmon_path,
            runtime=OciRuntime(
                self.handler.runtime_path, os.path.join(self.config.runroot, "runc", self.name)
            ),
            runroot=self.config.runroot,
            root=self.config.root,
            host=probe_host(),
        )
        await self._env.open()
        await self._reconcile(services)

    async def close(self) -> None:
        if self._env is not None:
            await self._env.close()

    async def _reconcile(self, services: BackendServices) -> None:
        """Containers that exited while the daemon was down become exited in the store."""
        store = services.store
        pods = {p.id: p for p in store.list_pods() if p.handler == self.name}
        changed = 0
        for ctr in store.list_containers():
            if ctr.pod_id not in pods or ctr.state == CONTAINER_EXITED:
                continue
            status = await container.status(self.env, ctr)
            if status.state != CONTAINER_EXITED:
                container.watch_exit(self.env, ctr)
            if status.state != ctr.state:
                store.update_container(
                    ctr.id, state=status.state, finished_at=status.finished_at,
                    exit_code=status.exit_code, reason=status.reason, message=status.message,
                )
                changed += 1
        log.info("runtime handler %s: %d pods, %d container states updated after restart",
                 self.name, len(pods), changed)

    # -- pods -----------------------------------------------------------------------------

    async def start_sandbox(self, request: SandboxRequest) -> dict[str, Any]:
        return await sandbox.start(self.env, self.images, self.config.pause_image, request)

    async def stop_sandbox(self, pod: PodRecord) -> None:
        await sandbox.stop(self.env, pod)

    async def remove_sandbox(self, pod: PodRecord) -> None:
        await sandbox.remove(self.env, self.images, pod)

    async def sandbox_alive(self, pod: PodRecord) -> bool:
        return await sandbox.alive(self.env, pod)

    # -- containers -----------------------------------------------------------------------

    async def create_container(self, request: ContainerRequest) -> dict[str, Any]:
        target = None
        target_id = request.config.linux.security_context.namespace_options.target_id
        if target_id and self._services is not None:
            target = self._services.store.get_container(target_id)
        return await container.create(self.env, request, target)

    async def start_container(self, pod: PodRecord, ctr: ContainerRecord) -> dict[str, Any]:
        return await container.start(self.env, pod, ctr)

    async def stop_container(self, pod: PodRecord, ctr: ContainerRecord, timeout_s: float) -> None:
        await container.stop(self.env, ctr, timeout_s)
        if await container.release(self.env, ctr):
            await self.images.unmount_rootfs(ctr.id)

    async def remove_container(self, pod: PodRecord, ctr: ContainerRecord) -> None:
        await container.remove(self.env, ctr)

    async def container_status(self, pod: PodRecord, ctr: ContainerRecord) -> ContainerStatus:
        return await container.status(self.env, ctr)

    async def exec_sync(
        self,
        pod: PodRecord,
        ctr: ContainerRecord,
        cmd: list[str],
        timeout_s: float,
        max_output: int,
    ) -> ExecResult:
        layout = container.layout_of(self.env, ctr)
        return await exec_sync.exec_sync(
            self.env, layout, cmd, timeout_s, max_output, self.known_running(ctr)
        )

    async def exec_stream(
        self, pod: PodRecord, ctr: ContainerRecord, cmd: list[str], stdio: Stdio
    ) -> int:
        """Streaming exec (kubectl exec); see ``stream_io``."""
        layout = container.layout_of(self.env, ctr)
        return await stream_io.exec_stream(
            self.env, layout, cmd, stdio, self.known_running(ctr)
        )

    def known_running(self, ctr: ContainerRecord) -> bool:
        return container.known_running(self.env, ctr)

    async def attach_stream(self, pod: PodRecord, ctr: ContainerRecord, stdio: Stdio) -> None:
        """Attach to the container's stdio through conmon; see ``stream_io``."""
        config = api_pb2.ContainerConfig.FromString(ctr.config)
        layout = container.layout_of(self.env, ctr)
        await stream_io.attach_stream(layout, stdio, config.tty, config.stdin)

    async def update_resources(
        self,
        pod: PodRecord,
        ctr: ContainerRecord,
        resources: api_pb2.LinuxContainerResources,
    ) -> None:
        await container.update_resources(self.env, ctr, resources)

    async def reopen_log(self, pod: PodRecord, ctr: ContainerRecord) -> None:
        await container.reopen_log(self.env, ctr)

    # -- stats ----------------------------------------------------------------------------

    async def container_stats(self, pod: PodRecord, ctr: ContainerRecord) -> ResourceSample | None:
        parent = pod.extra.get("cgroup_parent")
        if not parent:
            return None
        return await asyncio.to_thread(read_cgroup, cgroups_path(str(parent), ctr.id))

    async def sandbox_stats(self, pod: PodRecord) -> ResourceSample | None:
        parent = pod.extra.get("cgroup_parent")
        if not parent:
            return None
        return await asyncio.to_thread(read_cgroup, str(parent))
