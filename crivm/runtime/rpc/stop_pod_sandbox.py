"""StopPodSandbox: kill the pod's containers and infrastructure, detach its network.

Idempotent: a pod that is gone, or already stopped, is fine; the network is torn down even
when the infrastructure died on its own."""

from __future__ import annotations

import logging

from crivm.proto import api_pb2
from crivm.runtime import events
from crivm.runtime.backend import CONTAINER_EXITED, POD_NOTREADY
from crivm.runtime.cri_messages import pod_config
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import backend_of, containers, find_pod, refresh_container
from crivm.runtime.store import PodRecord

log = logging.getLogger(__name__)


async def handle(
    daemon: Daemon, request: api_pb2.StopPodSandboxRequest
) -> api_pb2.StopPodSandboxResponse:
    pod = find_pod(daemon, request.pod_sandbox_id)
    if pod is None:
        log.info("pod %s is already gone", request.pod_sandbox_id)
    else:
        await stop_pod(daemon, pod)
    return api_pb2.StopPodSandboxResponse()


async def stop_pod(daemon: Daemon, pod: PodRecord) -> None:
    """Shared with RemovePodSandbox."""
    backend = backend_of(daemon, pod)
    for ctr in containers(daemon).of_pod(pod.id):
        if ctr.state != CONTAINER_EXITED:
            # kubelet stops containers with their grace period before it stops the pod;
            # whatever still runs now is killed.
            await backend.stop_container(pod, ctr, 0)
            await refresh_container(daemon, pod, ctr)
    await backend.stop_sandbox(pod)
    config = pod_config(pod)
    if config.linux.security_context.namespace_options.network != api_pb2.NODE:
        await daemon.component("network").detach(pod.id, config)
    if pod.state != POD_NOTREADY:
        daemon.store.update_pod(pod.id, state=POD_NOTREADY)
        events.emit_sandbox(daemon, pod.id, api_pb2.CONTAINER_STOPPED_EVENT)
    log.info("stopped pod %s", pod.id, extra={"pod_id": pod.id})
