"""ListPodSandbox, filtered by id prefix, state and labels."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime.cri_messages import labels_match, pod_config, pod_sandbox, pod_state
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import backend_of


async def handle(
    daemon: Daemon, request: api_pb2.ListPodSandboxRequest
) -> api_pb2.ListPodSandboxResponse:
    wanted = request.filter
    response = api_pb2.ListPodSandboxResponse()
    for pod in daemon.store.list_pods():
        if wanted.id and not pod.id.startswith(wanted.id):
            continue
        if not labels_match(pod_config(pod).labels, wanted.label_selector):
            continue
        state = pod_state(pod, await backend_of(daemon, pod).sandbox_alive(pod))
        if wanted.HasField("state") and wanted.state.state != state:
            continue
        response.items.append(pod_sandbox(pod, state))
    return response
