"""ContainerStatus: state, exit code and reason, times, image, mounts, log path."""

from __future__ import annotations

import json

from crivm.proto import api_pb2
from crivm.runtime import wire
from crivm.runtime.cri_messages import container_status
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import containers, pod_of, refresh_container, require_container


async def handle(
    daemon: Daemon, request: api_pb2.ContainerStatusRequest
) -> api_pb2.ContainerStatusResponse | wire.Encoded:
    ctr = require_container(daemon, request.container_id)
    pod = pod_of(daemon, ctr)
    ctr = await refresh_container(daemon, pod, ctr)
    if not request.verbose:
        # kubelet asks without verbose, and asks often: answered from the row's cached encoding.
        return wire.Encoded(containers(daemon).status(ctr))
    response = api_pb2.ContainerStatusResponse(status=container_status(ctr))
    response.info["info"] = json.dumps({"sandboxID": pod.id, "handler": pod.handler, **ctr.extra})
    return response
