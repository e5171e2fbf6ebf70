"""PodSandboxStats: the pod's CPU, memory, network and processes, and its containers'."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import require_pod
from crivm.runtime.stats.collector import collector_of


async def handle(
    daemon: Daemon, request: api_pb2.PodSandboxStatsRequest
) -> api_pb2.PodSandboxStatsResponse:
    pod = require_pod(daemon, request.pod_sandbox_id)
    stats = await collector_of(daemon).pod_stats(daemon, pod)
    return api_pb2.PodSandboxStatsResponse(stats=stats)
