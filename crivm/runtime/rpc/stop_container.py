"""StopContainer: the stop signal, then SIGKILL after the timeout. A container that is gone
or already exited is fine."""

from __future__ import annotations

import logging

from crivm.proto import api_pb2
from crivm.runtime.backend import CONTAINER_EXITED
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import backend_of, find_container, pod_of, refresh_container

log = logging.getLogger(__name__)


async def handle(
    daemon: Daemon, request: api_pb2.StopContainerRequest
) -> api_pb2.StopContainerResponse:
    ctr = find_container(daemon, request.container_id)
    if ctr is None:
        log.info("container %s is already gone", request.container_id)
        return api_pb2.StopContainerResponse()
    pod = pod_of(daemon, ctr)
    if ctr.state != CONTAINER_EXITED:
        await backend_of(daemon, pod).stop_container(pod, ctr, float(request.timeout))
        await refresh_container(daemon, pod, ctr)
    return api_pb2.StopContainerResponse()
