"""PortForward: check the pod and ports, return a single-use URL of the streaming server."""

from __future__ import annotations

from crivm.errors import InvalidArgument
from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import require_pod
from crivm.runtime.streaming.server import StreamingServer
from crivm.runtime.streaming.tokens import PortForwardSpec


async def handle(
    daemon: Daemon, request: api_pb2.PortForwardRequest
) -> api_pb2.PortForwardResponse:
    for port in request.port:
        if not 0 < port <= 0xFFFF:
            raise InvalidArgument(f"port {port} is not a TCP port")
    pod = require_pod(daemon, request.pod_sandbox_id)
    server: StreamingServer = daemon.component("streaming")
    spec = PortForwardSpec(pod.id, tuple(request.port))
    return api_pb2.PortForwardResponse(url=server.url_for(spec))
