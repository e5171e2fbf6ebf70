"""StartContainer: start a created container."""

from __future__ import annotations

import logging

from crivm.proto import api_pb2
from crivm.runtime import events
from crivm.runtime.backend import CONTAINER_RUNNING
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import backend_of, containers, pod_of, require_container
from crivm.runtime.store import now_ns

log = logging.getLogger(__name__)


async def handle(
    daemon: Daemon, request: api_pb2.StartContainerRequest
) -> api_pb2.StartContainerResponse:
    ctr = require_container(daemon, request.container_id)
    pod = pod_of(daemon, ctr)
    # Taken before the start: a short-lived process can exit before runc start returns, and
    # finished_at (conmon's exit file) must not precede started_at.
    started_at = now_ns()
    extra = await backend_of(daemon, pod).start_container(pod, ctr)
    containers(daemon).update(ctr.id, state=CONTAINER_RUNNING, started_at=started_at,
                              extra={**ctr.extra, **extra})
    events.emit_container(daemon, pod.id, ctr.id, api_pb2.CONTAINER_STARTED_EVENT)
    log.info("started container %s", ctr.id, extra={"container_id": ctr.id, "pod_id": pod.id})
    return api_pb2.StartContainerResponse()
