"""ReopenContainerLog: after kubelet rotated the log file, conmon opens a new one."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import backend_of, pod_of, require_container


async def handle(
    daemon: Daemon, request: api_pb2.ReopenContainerLogRequest
) -> api_pb2.ReopenContainerLogResponse:
    ctr = require_container(daemon, request.container_id)
    pod = pod_of(daemon, ctr)
    await backend_of(daemon, pod).reopen_log(pod, ctr)
    return api_pb2.ReopenContainerLogResponse()
