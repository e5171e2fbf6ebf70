"""ExecSync: run a command in a container, return its exit code and (capped) output."""

from __future__ import annotations

from crivm.errors import InvalidArgument
from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import backend_of, pod_of, require_container

# Per stream, like CRI-O and containerd: kubelet probes must not balloon the daemon.
MAX_OUTPUT_BYTES = 16 * 1024 * 1024


async def handle(daemon: Daemon, request: api_pb2.ExecSyncRequest) -> api_pb2.ExecSyncResponse:
    if not request.cmd:
        raise InvalidArgument("exec needs a command")
    ctr = require_container(daemon, request.container_id)
    pod = pod_of(daemon, ctr)
    result = await backend_of(daemon, pod).exec_sync(
        pod, ctr, list(request.cmd), float(request.timeout), MAX_OUTPUT_BYTES
    )
    return api_pb2.ExecSyncResponse(
        stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code
    )
