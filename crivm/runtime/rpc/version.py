"""Version: the runtime's name and the CRI API version it speaks."""

from __future__ import annotations

import crivm
from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon

# The version of the kubelet runtime API; crictl prints it as "Version".
KUBELET_API_VERSION = "0.1.0"


async def handle(daemon: Daemon, request: api_pb2.VersionRequest) -> api_pb2.VersionResponse:
    return api_pb2.VersionResponse(
        version=KUBELET_API_VERSION,
        runtime_name="crivm",
        runtime_version=crivm.__version__,
        runtime_api_version="v1",
    )
