"""StreamContainerStats: ListContainerStats in chunks, for nodes with many containers."""

from __future__ import annotations

from collections.abc import AsyncIterator

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.rpc.list_container_stats import list_stats

CHUNK = 100


async def handle(
    daemon: Daemon, request: api_pb2.StreamContainerStatsRequest
) -> AsyncIterator[api_pb2.StreamContainerStatsResponse]:
    stats = await list_stats(daemon, request.filter)
    for start in range(0, len(stats), CHUNK):
        yield api_pb2.StreamContainerStatsResponse(container_stats=stats[start:start + CHUNK])
