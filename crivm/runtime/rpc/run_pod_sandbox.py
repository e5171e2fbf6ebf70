"""RunPodSandbox: the pod's network, then its infrastructure on the handler's backend."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from crivm.errors import AlreadyExists, InvalidArgument
from crivm.proto import api_pb2
from crivm.runtime import events
from crivm.runtime.backend import POD_NOTREADY, POD_READY, SandboxRequest
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import new_id
from crivm.runtime.store import PodRecord, now_ns
from crivm.runtime.undo import UndoSteps

log = logging.getLogger(__name__)


async def handle(
    daemon: Daemon, request: api_pb2.RunPodSandboxRequest
) -> api_pb2.RunPodSandboxResponse:
    pod_id = await _run(daemon, request.config, request.runtime_handler)
    return api_pb2.RunPodSandboxResponse(pod_sandbox_id=pod_id)


def _check(daemon: Daemon, config: api_pb2.PodSandboxConfig) -> None:
    meta = config.metadata
    if not (meta.name and meta.namespace and meta.uid):
        raise InvalidArgument("pod metadata needs name, namespace and uid")
    rows = daemon.store.query(
        "SELECT id FROM pods WHERE name = ? AND namespace = ? AND uid = ? AND attempt = ?",
        (meta.name, meta.namespace, meta.uid, meta.attempt),
    )
    if rows:
        raise AlreadyExists(
            f"pod {meta.namespace}/{meta.name} attempt {meta.attempt} exists as {rows[0][0]}"
        )


async def _run(daemon: Daemon, config: api_pb2.PodSandboxConfig, runtime_handler: str) -> str:
    _check(daemon, config)
    handler = daemon.handlers.resolve(runtime_handler, dict(config.annotations))
    backend = daemon.handlers.get(handler)
    meta = config.metadata
    pod = PodRecord(
        id=new_id(), name=meta.name, namespace=meta.namespace, uid=meta.uid,
        attempt=meta.attempt, handler=handler, state=POD_NOTREADY, created_at=now_ns(),
        config=config.SerializeToString(),
    )
    log_extra = {"pod_id": pod.id, "handler": handler}
    log.info("running pod %s/%s on handler %s", meta.namespace, meta.name, handler,
             extra=log_extra)
    host_network = config.linux.security_context.namespace_options.network == api_pb2.NODE
    async with UndoSteps(log_extra) as undo:
        daemon.store.add_pod(pod)
        undo.add("delete the pod's store row", daemon.store.delete_pod, pod.id)
        netns_path = ""
        addresses: asyncio.Future[tuple[str, ...]] = asyncio.get_running_loop().create_future()
        if host_network:
            addresses.set_result(())
        else:
            network = daemon.component("network")
            undo.add("detach the pod from the network", network.detach, pod.id, config)
            netns_path = await network.create_namespace(pod.id)
            # CNI ADD runs while the backend starts the infrastructure in the netns.
            addresses = asyncio.ensure_future(network.add(pod.id, config, netns_path))
            undo.add("wait for the pod's CNI ADD to end", _settle, addresses)
        request = SandboxRequest(pod, config, netns_path, addresses)
        extra = await backend.start_sandbox(request)
        ips = await request.ips()
        extra = {**extra, "ips": list(ips), "netns_path": netns_path}
        undo.add("remove the pod's infrastructure", backend.remove_sandbox,
                 dataclasses.replace(pod, extra=extra))
        daemon.store.update_pod(pod.id, state=POD_READY, extra=extra)
        undo.commit()
    for event_type in (api_pb2.CONTAINER_CREATED_EVENT, api_pb2.CONTAINER_STARTED_EVENT):
        events.emit_sandbox(daemon, pod.id, event_type)
    log.info("pod %s is ready with IPs %s", pod.id, ", ".join(ips) or "(host network)",
             extra=log_extra)
    return pod.id


async def _settle(addresses: asyncio.Future[tuple[str, ...]]) -> None:
    """Let a CNI ADD that is still running end before DEL undoes it; its error, if any,
    was already raised to the backend (or does not matter any more)."""
    with contextlib.suppress(Exception):
        await addresses
