"""PodSandboxStatus: state, IPs, namespaces, labels; with verbose, the backend's details."""

from __future__ import annotations

import json

from crivm.proto import api_pb2
from crivm.runtime.cri_messages import pod_sandbox_status, pod_state
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import backend_of, require_pod


async def handle(
    daemon: Daemon, request: api_pb2.PodSandboxStatusRequest
) -> api_pb2.PodSandboxStatusResponse:
    pod = require_pod(daemon, request.pod_sandbox_id)
    alive = await backend_of(daemon, pod).sandbox_alive(pod)
    status = pod_sandbox_status(pod, pod_state(pod, alive))
    response = api_pb2.PodSandboxStatusResponse(status=status)
    if request.verbose:
        response.info["info"] = json.dumps({"handler": pod.handler, **pod.extra})
    return response
