"""ListContainers, filtered by id prefix, pod id prefix, state and labels."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime.cri_messages import container, container_config, labels_match
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import refresh_container


async def handle(
    daemon: Daemon, request: api_pb2.ListContainersRequest
) -> api_pb2.ListContainersResponse:
    wanted = request.filter
    pods = {pod.id: pod for pod in daemon.store.list_pods()}
    response = api_pb2.ListContainersResponse()
    for ctr in daemon.store.list_containers():
        if wanted.id and not ctr.id.startswith(wanted.id):
            continue
        if wanted.pod_sandbox_id and not ctr.pod_id.startswith(wanted.pod_sandbox_id):
            continue
        if not labels_match(container_config(ctr).labels, wanted.label_selector):
            continue
        ctr = await refresh_container(daemon, pods[ctr.pod_id], ctr)
        item = container(ctr)
        if wanted.HasField("state") and wanted.state.state != item.state:
            continue
        response.containers.append(item)
    return response
