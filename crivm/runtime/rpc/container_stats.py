"""ContainerStats: CPU, memory and writable-layer usage of one container."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import pod_of, require_container
from crivm.runtime.stats.collector import collector_of


async def handle(
    daemon: Daemon, request: api_pb2.ContainerStatsRequest
) -> api_pb2.ContainerStatsResponse:
    ctr = require_container(daemon, request.container_id)
    stats = await collector_of(daemon).container_stats(daemon, pod_of(daemon, ctr), ctr)
    return api_pb2.ContainerStatsResponse(stats=stats)
