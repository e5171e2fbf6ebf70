"""RemovePodSandbox: stop the pod if needed, remove its containers, its infrastructure and
its rows. Removing a pod that is gone succeeds."""

from __future__ import annotations

import logging

from crivm.proto import api_pb2
from crivm.runtime import events
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import backend_of, containers, find_pod
from crivm.runtime.rpc.remove_container import remove_container
from crivm.runtime.rpc.stop_pod_sandbox import stop_pod
from crivm.runtime.store import PodRecord

log = logging.getLogger(__name__)


async def handle(
    daemon: Daemon, request: api_pb2.RemovePodSandboxRequest
) -> api_pb2.RemovePodSandboxResponse:
    pod = find_pod(daemon, request.pod_sandbox_id)
    if pod is None:
        log.info("pod %s is already gone", request.pod_sandbox_id)
    else:
        await _remove(daemon, pod)
    return api_pb2.RemovePodSandboxResponse()


async def _remove(daemon: Daemon, pod: PodRecord) -> None:
    # Stopping again is cheap and idempotent, and makes sure the network is detached.
    await stop_pod(daemon, pod)
    for ctr in containers(daemon).of_pod(pod.id):
        await remove_container(daemon, pod, ctr)
    await backend_of(daemon, pod).remove_sandbox(pod)
    events.emit_sandbox(daemon, pod.id, api_pb2.CONTAINER_DELETED_EVENT)
    daemon.store.delete_pod(pod.id)
    containers(daemon).forget_pod(pod.id)
    log.info("removed pod %s", pod.id, extra={"pod_id": pod.id})
