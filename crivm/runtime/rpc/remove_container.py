"""RemoveContainer: kill it if it still runs, then delete it, its rootfs and its row.
Removing a container that is gone succeeds."""

from __future__ import annotations

import logging

from crivm.proto import api_pb2
from crivm.runtime import events
from crivm.runtime.backend import CONTAINER_EXITED
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import backend_of, containers, find_container, pod_of
from crivm.runtime.store import ContainerRecord, PodRecord

log = logging.getLogger(__name__)


async def handle(
    daemon: Daemon, request: api_pb2.RemoveContainerRequest
) -> api_pb2.RemoveContainerResponse:
    ctr = find_container(daemon, request.container_id)
    if ctr is None:
        log.info("container %s is already gone", request.container_id)
    else:
        await remove_container(daemon, pod_of(daemon, ctr), ctr)
    return api_pb2.RemoveContainerResponse()


async def remove_container(daemon: Daemon, pod: PodRecord, ctr: ContainerRecord) -> None:
    """Shared with RemovePodSandbox."""
    backend = backend_of(daemon, pod)
    if ctr.state != CONTAINER_EXITED:
        await backend.stop_container(pod, ctr, 0)
    await backend.remove_container(pod, ctr)
    await daemon.component("images").remove_rootfs(ctr.id)
    containers(daemon).delete(ctr.id)
    events.emit_container(daemon, pod.id, ctr.id, api_pb2.CONTAINER_DELETED_EVENT)
    log.info("removed container %s", ctr.id, extra={"container_id": ctr.id, "pod_id": pod.id})
