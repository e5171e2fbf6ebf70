"""UpdateContainerResources: new cgroup limits for a running container, kept in its config."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime.cri_messages import container_config
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import backend_of, containers, pod_of, require_container


async def handle(
    daemon: Daemon, request: api_pb2.UpdateContainerResourcesRequest
) -> api_pb2.UpdateContainerResourcesResponse:
    ctr = require_container(daemon, request.container_id)
    pod = pod_of(daemon, ctr)
    await backend_of(daemon, pod).update_resources(pod, ctr, request.linux)
    config = container_config(ctr)
    config.linux.resources.CopyFrom(request.linux)
    containers(daemon).update(ctr.id, config=config.SerializeToString())
    return api_pb2.UpdateContainerResourcesResponse()
