"""StreamPodSandboxStats: ListPodSandboxStats in chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.rpc.list_pod_sandbox_stats import list_stats

CHUNK = 50


async def handle(
    daemon: Daemon, request: api_pb2.StreamPodSandboxStatsRequest
) -> AsyncIterator[api_pb2.StreamPodSandboxStatsResponse]:
    stats = await list_stats(daemon, request.filter)
    for start in range(0, len(stats), CHUNK):
        yield api_pb2.StreamPodSandboxStatsResponse(pod_sandbox_stats=stats[start:start + CHUNK])
